"""salatrain_kernels: Triton kernels for the hybrid's two mixers, each beside a pure-PyTorch reference.

    lightning_attn   fixed-decay linear attention (Lightning), forward and backward
    infllmv2_attn    InfLLM-V2 block-sparse attention (scoring, selection, attention)

On CPU the Triton kernels run only under ``TRITON_INTERPRET=1`` (set before importing this package);
``backend="auto"`` picks Triton on CUDA tensors and the PyTorch reference elsewhere.
"""
from .lightning import lightning_attn
from .infllm_v2 import infllmv2_attn

__all__ = ["lightning_attn", "infllmv2_attn"]
