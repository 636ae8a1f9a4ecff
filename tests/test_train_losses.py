"""The fused vocabulary losses equal the checkpointed ones (values and gradients of hidden states and head)."""

import pytest
import torch
from torch import nn

from salatrain.train.losses import Head, chunked_cross_entropy, chunked_kl


class _Partitioned(nn.Linear):
    """A head whose weight looks like a ZeRO-3 partition (``ds_id``), so the checkpointed way runs."""

    def __init__(self, src: nn.Linear):
        super().__init__(src.in_features, src.out_features, bias=False, dtype=src.weight.dtype)
        self.weight = src.weight
        self.weight.ds_id = 0


def _setup(scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    m, hidden, vocab = 37, 16, 53
    head = nn.Linear(hidden, vocab, bias=False, dtype=torch.float64)
    teacher = nn.Linear(hidden, vocab, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g, dtype=torch.float64))
        teacher.weight.copy_(torch.randn(vocab, hidden, generator=g, dtype=torch.float64))
    hs = torch.randn(m, hidden, generator=g, dtype=torch.float64)
    ht = torch.randn(m, hidden, generator=g, dtype=torch.float64)
    target = torch.randint(0, vocab, (m,), generator=g)
    return Head(head, scale), Head(teacher, 1.5), hs, ht, target


def _grads(fn, head, hs):
    hs = hs.clone().requires_grad_()
    head.linear.weight.grad = None
    out = fn(hs)
    (out[0] if isinstance(out, tuple) else out).mul(0.7).backward()
    return out, hs.grad, head.linear.weight.grad.clone()


@pytest.mark.parametrize("scale", [1.0, 0.25])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_kl_equals_checkpointed(scale, temperature):
    head, teacher, hs, ht, target = _setup(scale)
    assert head.fusable and teacher.fusable
    fused = _grads(lambda h: chunked_kl(h, ht, target, head, teacher, 10, temperature), head, hs)
    slow_head, slow_teacher = Head(_Partitioned(head.linear), scale), Head(_Partitioned(teacher.linear), 1.5)
    assert not slow_head.fusable
    slow = _grads(lambda h: chunked_kl(h, ht, target, slow_head, slow_teacher, 10, temperature), slow_head, hs)
    for a, b in zip(fused[0], slow[0]):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5)
    assert torch.allclose(fused[1], slow[1], rtol=1e-5, atol=1e-5)
    assert torch.allclose(fused[2], slow[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_fused_cross_entropy_equals_checkpointed(scale):
    head, _, hs, _, target = _setup(scale, seed=1)
    fused = _grads(lambda h: chunked_cross_entropy(h, target, head, 8), head, hs)
    slow_head = Head(_Partitioned(head.linear), scale)
    slow = _grads(lambda h: chunked_cross_entropy(h, target, slow_head, 8), slow_head, hs)
    assert torch.allclose(fused[0].double(), slow[0].double(), rtol=1e-5)
    assert torch.allclose(fused[1], slow[1], rtol=1e-5, atol=1e-5)
    assert torch.allclose(fused[2], slow[2], rtol=1e-5, atol=1e-5)


def test_frozen_head_gets_no_gradient_and_no_grad_mode_computes_none():
    head, teacher, hs, ht, target = _setup(1.0)
    head.linear.weight.requires_grad_(False)
    h = hs.clone().requires_grad_()
    kl, _ = chunked_kl(h, ht, target, head, teacher, 16)
    kl.backward()
    assert h.grad is not None and head.linear.weight.grad is None
    with torch.no_grad():
        again, _ = chunked_kl(hs, ht, target, head, teacher, 16)
    assert torch.allclose(again, kl.detach())
