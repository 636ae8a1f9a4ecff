"""Losses over the vocabulary computed a chunk of tokens at a time, so full-vocabulary logits (of one model,
or of student and teacher together) are never all in memory.

Two ways, the same sums:
- fused (the default whenever the head's weight is a plain tensor): each chunk's logits are made once, the
  row-wise loss and its gradient with respect to the logits come from one kernel (``salatrain_kernels.
  logit_loss``), and the gradients with respect to the hidden states and the head weight are formed right
  there, in the forward. Nothing is recomputed: per chunk two matmuls forward (student and teacher logits)
  and two for the gradients, against four and two for the checkpointed way, and two passes over the logits
  instead of ~15 elementwise passes over fp32 copies.
- checkpointed (ZeRO-3, whose partitioned head weight exists only inside the module's own call): each chunk
  under activation checkpointing, its logits recomputed in the backward pass.

Legend: M target tokens, H hidden size, V vocabulary. Both losses return sums over tokens (the trainer divides
by the global number of targets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class Head:
    """A model's output head: logits = linear(h × scale) (``scale`` is MiniCPM's μP logit scale, else 1)."""

    linear: nn.Linear
    scale: float = 1.0

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h * self.scale if self.scale != 1.0 else h)

    @property
    def fusable(self) -> bool:
        """The weight is a whole tensor (not a ZeRO-3 partition) and there is no bias."""
        return self.linear.bias is None and not hasattr(self.linear.weight, "ds_id")


def _logit_rows():
    from salatrain_kernels.logit_loss import logit_loss_rows

    return logit_loss_rows


class _FusedLinearLoss(torch.autograd.Function):
    """Σ over rows of the logit loss of linear(h × scale) (KL to the teacher's logits when ``ht`` is given,
    else cross-entropy), and Σ of the student's cross-entropy as a statistic. Gradients with respect to h and
    the weight are formed chunk by chunk in the forward; the backward scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, h, weight, ht, t_weight, target, scale, t_scale, temperature, chunk, with_grad):
        rows = _logit_rows()
        need_w = with_grad and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if with_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        ce = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            e = min(s + chunk, h.shape[0])
            hc = h[s:e] * scale if scale != 1.0 else h[s:e]
            logits = F.linear(hc, weight)
            t_logits = None
            if ht is not None:
                t_logits = F.linear(ht[s:e] * t_scale if t_scale != 1.0 else ht[s:e], t_weight)
            l_rows, ce_rows = rows(logits, t_logits, target[s:e], temperature, logits if with_grad else None)
            loss += l_rows.sum()
            ce += ce_rows.sum()
            del t_logits
            if with_grad:  # logits now hold d loss / d logits
                gh = logits @ weight
                grad_h[s:e] = gh * scale if scale != 1.0 else gh
                if need_w:
                    grad_w += (logits.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce)
        return loss, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is None:
            raise RuntimeError("the fused logit loss was computed without gradients (under no_grad)")
        gh = grad_h * grad_loss.to(grad_h.dtype)
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None, None


def _fused(h, head: Head, ht, t_head: Head | None, target, chunk, temperature):
    with_grad = torch.is_grad_enabled() and (h.requires_grad or head.linear.weight.requires_grad)
    t_weight = t_head.linear.weight.detach() if t_head is not None else None
    t_scale = t_head.scale if t_head is not None else 1.0
    ht = ht.detach() if ht is not None else None
    return _FusedLinearLoss.apply(h, head.linear.weight, ht, t_weight, target, float(head.scale), float(t_scale),
                                  float(temperature), int(chunk), with_grad)


def _ce_chunk(h_mH, target_m, head):
    return F.cross_entropy(head(h_mH).float(), target_m, reduction="sum")


def chunked_cross_entropy(h_MH: torch.Tensor, target_M: torch.Tensor, head: Head, chunk: int) -> torch.Tensor:
    """Σ over tokens of −log p(target) with p = softmax(head(h))."""
    if head.fusable:
        return _fused(h_MH, head, None, None, target_M, chunk, 1.0)[0]
    total = h_MH.new_zeros((), dtype=torch.float32)
    for s in range(0, h_MH.shape[0], chunk):
        total = total + checkpoint(_ce_chunk, h_MH[s : s + chunk], target_M[s : s + chunk], head, use_reentrant=False)
    return total


def _kl_chunk(hs_mH, ht_mH, target_m, s_head, t_head, temperature):
    s_logits = s_head(hs_mH).float()
    with torch.no_grad():
        t_logp = torch.log_softmax(t_head(ht_mH).float() / temperature, dim=-1)
    s_logp = torch.log_softmax(s_logits / temperature, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum() * temperature**2
    ce = F.cross_entropy(s_logits.detach(), target_m, reduction="sum")
    return kl, ce


def chunked_kl(hs_MH: torch.Tensor, ht_MH: torch.Tensor, target_M: torch.Tensor, s_head: Head, t_head: Head,
               chunk: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ KL(teacher ‖ student) × T², Σ student cross-entropy (a statistic, no gradient)) over the tokens.

    hs/ht are the student's and the teacher's final hidden states at the same positions; the teacher's
    logits are computed inside each chunk without gradient.
    """
    if s_head.fusable and t_head.fusable:
        return _fused(hs_MH, s_head, ht_MH, t_head, target_M, chunk, temperature)
    kl = hs_MH.new_zeros((), dtype=torch.float32)
    ce = kl.detach().clone()
    for s in range(0, hs_MH.shape[0], chunk):
        k, c = checkpoint(_kl_chunk, hs_MH[s : s + chunk], ht_MH[s : s + chunk], target_M[s : s + chunk], s_head,
                          t_head, temperature, use_reentrant=False)
        kl, ce = kl + k, ce + c
    return kl, ce
