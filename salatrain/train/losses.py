"""Losses over the vocabulary computed a chunk of tokens at a time, so full-vocabulary logits (of one model,
or of student and teacher together) are never all in memory: each chunk's logits are recomputed in the
backward pass (activation checkpointing of the chunk).

Legend: M target tokens, H hidden size, V vocabulary. ``head`` maps hidden states [m, H] to logits [m, V].
Both losses return sums over tokens (the trainer divides by the global number of targets).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Head = Callable[[torch.Tensor], torch.Tensor]


def _ce_chunk(h_mH, target_m, head):
    return F.cross_entropy(head(h_mH).float(), target_m, reduction="sum")


def chunked_cross_entropy(h_MH: torch.Tensor, target_M: torch.Tensor, head: Head, chunk: int) -> torch.Tensor:
    """Σ over tokens of −log p(target) with p = softmax(head(h))."""
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
    kl = hs_MH.new_zeros((), dtype=torch.float32)
    ce = kl.detach().clone()
    for s in range(0, hs_MH.shape[0], chunk):
        k, c = checkpoint(_kl_chunk, hs_MH[s : s + chunk], ht_MH[s : s + chunk], target_M[s : s + chunk], s_head,
                          t_head, temperature, use_reentrant=False)
        kl, ce = kl + k, ce + c
    return kl, ce
