"""Row-wise logit losses: the Triton kernel and the PyTorch reference against autograd of the definitions."""

import pytest
import torch

from salatrain_kernels.logit_loss import logit_loss_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _oracle(s, t, target, temperature):
    """Loss rows and their gradient by autograd of the textbook definitions, in float64."""
    s = s.double().requires_grad_()
    if t is None:
        loss = torch.nn.functional.cross_entropy(s, target, reduction="none")
    else:
        p_t = torch.softmax(t.double() / temperature, -1)
        loss = (p_t * (p_t.log() - torch.log_softmax(s / temperature, -1))).sum(-1) * temperature**2
    grad, = torch.autograd.grad(loss.sum(), s)
    ce = torch.nn.functional.cross_entropy(s.detach(), target, reduction="none")
    return loss.detach(), ce, grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("teacher,temperature", [(False, 1.0), (True, 1.0), (True, 2.0)])
@pytest.mark.parametrize("vocab", [37, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_match_autograd_of_the_definition(backend, teacher, temperature, vocab, dtype):
    g = torch.Generator().manual_seed(vocab)
    m = 5
    s = (3 * torch.randn(m, vocab, generator=g)).to(DEVICE, dtype)
    t = (3 * torch.randn(m, vocab, generator=g)).to(DEVICE, dtype) if teacher else None
    target = torch.randint(0, vocab, (m,), generator=g).to(DEVICE)
    ref_loss, ref_ce, ref_grad = _oracle(s, t, target, temperature)
    grad = torch.full_like(s, float("nan"))
    loss, ce = logit_loss_rows(s, t, target, temperature, grad, backend=backend)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert torch.allclose(loss.double(), ref_loss, atol=tol, rtol=tol)
    assert torch.allclose(ce.double(), ref_ce, atol=tol, rtol=tol)
    assert torch.allclose(grad.double(), ref_grad, atol=tol, rtol=tol)


def test_gradient_written_in_place_over_the_logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 50, generator=g).to(DEVICE)
    t = torch.randn(3, 50, generator=g).to(DEVICE)
    target = torch.tensor([1, 2, 3], device=DEVICE)
    _, _, ref_grad = _oracle(s, t, target, 1.0)
    loss, _ = logit_loss_rows(s, t, target, 1.0, grad_out=s, backend="triton")
    assert torch.allclose(s.double(), ref_grad, atol=1e-5)
    assert torch.isfinite(loss).all()
