"""PyTorch reference of the row-wise logit losses (same signature as the Triton kernel in ``row.py``).

    logit_loss_rows_torch(logits, teacher, target, temperature, grad_out) -> (loss [m], ce [m])

    logits       [m, V] student logits (any float dtype; computed in fp32, or fp64 for fp64 inputs)
    teacher      [m, V] teacher logits, or None
    target       [m] int64 next-token ids (every row is a target)
    temperature  KL temperature T (teacher given); the LM loss (no teacher) uses T = 1
    grad_out     None, or a [m, V] tensor (may be ``logits`` itself) that receives d loss_row / d logits

    teacher given:  loss = T² · KL(softmax(t/T) ‖ softmax(s/T)),  grad = T · (softmax(s/T) − softmax(t/T))
    no teacher:     loss = logsumexp(s) − s[target],                grad = softmax(s) − onehot(target)
    ce (both)     = logsumexp(s) − s[target], the student's cross-entropy at T = 1 (a statistic)
"""
from __future__ import annotations

import torch


def logit_loss_rows_torch(logits, teacher, target, temperature=1.0, grad_out=None):
    fp = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    s = logits.to(fp)
    lse = torch.logsumexp(s, dim=-1)
    ce = lse - s.gather(1, target.view(-1, 1)).squeeze(1)
    if teacher is None:
        loss = ce
        if grad_out is not None:
            g = torch.softmax(s, dim=-1)
            g.scatter_add_(1, target.view(-1, 1), -torch.ones_like(g[:, :1]))
            grad_out.copy_(g)
        return loss, ce
    log_ps = torch.log_softmax(s / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher.to(fp) / temperature, dim=-1)
    pt = log_pt.exp()
    loss = (pt * (log_pt - log_ps)).sum(-1) * temperature**2
    if grad_out is not None:
        grad_out.copy_(temperature * (log_ps.exp() - pt))
    return loss, ce
