"""Row-wise logit losses for training: KL(teacher ‖ student) with temperature, or next-token cross-entropy,
each with its gradient with respect to the student's logits, in one pass pair over the vocabulary.

    logit_loss_rows(logits, teacher, target, temperature=1.0, grad_out=None, *, backend="auto")
        -> (loss [m] fp32, ce [m] fp32); see naive.py for the exact definitions.

backend: "auto" (Triton on CUDA, the PyTorch reference elsewhere), "triton" (on CPU only under
TRITON_INTERPRET=1), "torch".
"""
from __future__ import annotations

from ..utils import resolve_backend
from .naive import logit_loss_rows_torch

__all__ = ["logit_loss_rows", "logit_loss_rows_torch"]


def logit_loss_rows(logits, teacher, target, temperature=1.0, grad_out=None, *, backend="auto"):
    backend = resolve_backend(backend, logits)
    if logits.dim() != 2 or target.shape != logits.shape[:1] or (teacher is not None and teacher.shape != logits.shape):
        raise ValueError(f"logits [m, V], teacher [m, V] or None and target [m]; got {tuple(logits.shape)}, "
                         f"{None if teacher is None else tuple(teacher.shape)}, {tuple(target.shape)}")
    if backend == "torch":
        return logit_loss_rows_torch(logits, teacher, target, temperature, grad_out)
    from .row import logit_loss_rows_triton

    return logit_loss_rows_triton(logits, teacher, target, temperature, grad_out)
