"""InfLLM-V2's gathered-block kernels with K/V loaded through tensor descriptors (``kv_loads="tma"``, the default:
Hopper's bulk tensor copies when compiled; the interpreter runs the same descriptor loads on CPU) and by pointers
(``kv_loads="pointer"``) against the PyTorch reference, forward and every gradient, on the GPU code path (one query
per program, one 64-key block per step) and with shared blocks. Compiled on a GPU machine,
tests/kernels/test_infllm_v2.py::test_gpu_full_op covers both.

    python -m pytest tests/kernels/test_infllm_v2_descriptors.py -q
"""
import pytest
import torch

from salatrain_kernels import utils
from salatrain_kernels.infllm_v2 import infllmv2_attn, infllmv2_attn_torch
from salatrain_kernels.infllm_v2.attn_steps import kv_descriptors
from salatrain_kernels.infllm_v2.plan import AttnPlan

from tests.kernels.test_infllm_v2 import assert_close, grads, interpreter, make_qkv

pytestmark = interpreter
# block 64 (one block per gather step), window 64: the window goes to the local kernels (every gathered block
# lies wholly before it); window 0: the gathered lists hold the query's own, partly visible block
SETTINGS = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, topk=2, dense_len=128)


@pytest.fixture(autouse=True)
def gpu_code_path(monkeypatch):
    from salatrain_kernels.infllm_v2 import plan

    monkeypatch.setattr(utils, "POISON", True)
    monkeypatch.setattr(plan, "INTERPRETER_TOKENS", 1)


def _check(q, k, v, kv_loads, **kwargs):
    out = infllmv2_attn(q, k, v, backend="triton", kv_loads=kv_loads, **kwargs)
    ref = infllmv2_attn_torch(q, k, v, **{n: x for n, x in kwargs.items() if not n.startswith("share_")})
    assert_close(out, ref)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kv_loads", ["tma", "pointer"])
@pytest.mark.parametrize("window", [64, 0], ids=["window-split", "own-block-gathered"])
@pytest.mark.parametrize("share", [1, 2])
def test_kv_loads_match_reference(window, share, kv_loads):
    q, k, v = make_qkv(1, 330, 330, 2, 1, 16, seed=13)
    cu = torch.tensor([0, 260, 330], dtype=torch.int32)
    _check(q, k, v, kv_loads, window_size=window, cu_seqlens=cu, share_tokens=share, share_max_union=1.0, **SETTINGS)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf keys' scores, masked after
def test_descriptor_loads_mask_other_documents_rows():
    """Window 0: a query of the first document gathers its own last block, whose rows past the document belong to
    the next one. A descriptor load takes the whole block; those rows must not reach the first document's output
    even when they are infinite (a masked probability 0 times inf is NaN)."""
    q, k, v = make_qkv(1, 200, 200, 2, 1, 16, seed=17)
    cu = torch.tensor([0, 100, 200], dtype=torch.int32)
    with torch.no_grad():
        v[:, 100:128] = float("inf")
        k[:, 100:128] = float("inf")
    kwargs = dict(SETTINGS, window_size=0, dense_len=64, cu_seqlens=cu)
    out = infllmv2_attn(q, k, v, backend="triton", kv_loads="tma", **kwargs)
    ref = infllmv2_attn_torch(q, k, v, **kwargs)
    assert torch.isfinite(ref[:, :100]).all()
    assert_close(out[:, :100], ref[:, :100])


def test_descriptor_eligibility():
    k3 = torch.randn(50, 2, 16)
    assert kv_descriptors(k3, k3, 64, 16) is not None
    assert kv_descriptors(k3[:, :, 1:], k3[:, :, 1:], 64, 16) is None  # base not 16-byte aligned
    odd = torch.randn(50, 2, 3)
    assert kv_descriptors(odd, odd, 64, 4) is None  # head stride of 12 bytes
    d24 = torch.randn(50, 2, 24)
    assert kv_descriptors(d24, d24, 64, 32) is None  # head dim 24 in tiles of 32


def test_unknown_kv_loads_value_raises():
    q, k, v = make_qkv(1, 150, 150, 2, 1, 16)
    with pytest.raises(ValueError, match="kv_loads"):
        infllmv2_attn(q, k, v, backend="triton", kv_loads="bulk", window_size=64, **SETTINGS)
    with pytest.raises(ValueError, match="kv_loads"):  # the plan checks it too (the interface passes it through)
        AttnPlan(None, 2, 1, 16, torch.float32, 64, 0.25, 0, kv_loads="bulk")
