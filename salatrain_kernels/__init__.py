"""salatrain_kernels: Triton kernels for the hybrid's two mixers, each beside a pure-PyTorch reference.

    lightning_attn   fixed-decay linear attention (Lightning), forward and backward
    infllmv2_attn    InfLLM-V2 block-sparse attention (scoring, selection, attention)
    logit_loss_rows  row-wise KL(teacher ‖ student) / cross-entropy over the vocabulary, with the logit gradient
    self_test        checks a kernel against its reference on a small case of the caller's shapes

One folder per op (lightning/, infllm_v2/, logit_loss/), its reference in ``naive.py`` (torch only; the model
runs and exports the mixers' ones), shared launch helpers in utils.py. Imports nothing of salatrain.

On CPU the Triton kernels run only under ``TRITON_INTERPRET=1`` (set before importing the kernel modules);
``backend="auto"`` picks Triton on CUDA tensors and the PyTorch reference elsewhere.

Attributes load lazily: importing the package is cheap and cannot fail (transformers probes any importable
top-level ``kernels`` package, which this folder is when the repository root is on ``sys.path``).
"""

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` that imports ``exports[name]`` (a module relative to ``package``) on first use."""

    def __getattr__(name):
        if name in exports:
            return getattr(importlib.import_module(exports[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


_EXPORTS = {
    "lightning_attn": ".lightning",
    "infllmv2_attn": ".infllm_v2",
    "logit_loss_rows": ".logit_loss",
    "self_test": ".selftest",
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
