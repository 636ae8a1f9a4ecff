"""The start-up self-test passes for the real kernels and stops a broken one with a clear error."""

import pytest
import torch

import salatrain_kernels
from salatrain_kernels import lightning as lightning_pkg
from salatrain_kernels.selftest import KernelSelfTestError, self_test

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_lightning_self_test_passes():
    self_test("lightning_attn", device=torch.device(DEVICE), dtype=torch.float32, num_heads=2, head_dim=16,
              seq_len=80)


@pytest.mark.parametrize("rules", [{}, dict(dense_len_mode="sequence", local_blocks="block")])
def test_infllmv2_self_test_passes(rules):
    self_test("infllmv2_attn", device=torch.device(DEVICE), dtype=torch.float32, num_heads=2, num_kv_heads=1,
              head_dim=16, **rules)


def test_rms_norm_self_test_passes_and_stops_a_broken_kernel(monkeypatch):
    from salatrain_kernels.lightning import fused

    self_test("rms_norm", device=torch.device(DEVICE), dtype=torch.float32, num_heads=1, num_kv_heads=1, head_dim=576)
    real = fused.rms_norm
    monkeypatch.setattr(fused, "rms_norm", lambda *a, **kw: real(*a, **kw) * 1.1)  # fault injection
    with pytest.raises(KernelSelfTestError, match=r"rms_norm \(forward\) self-test failed .* output relative error"):
        self_test("rms_norm", device=torch.device(DEVICE), dtype=torch.float32, head_dim=576)


def test_broken_kernel_is_stopped(monkeypatch):
    real = lightning_pkg.lightning_attn

    def off_by_a_bit(q, k, v, decay, **kw):  # fault injection: a kernel that is slightly wrong
        o, s = real(q, k, v, decay, **kw)
        return o * 1.1, s

    monkeypatch.setattr(lightning_pkg, "lightning_attn", off_by_a_bit)
    with pytest.raises(KernelSelfTestError, match="lightning_attn self-test failed .* output relative error"):
        self_test("lightning_attn", device=torch.device(DEVICE), dtype=torch.float32, num_heads=2, head_dim=16,
                  seq_len=80)
    assert salatrain_kernels.self_test is self_test
