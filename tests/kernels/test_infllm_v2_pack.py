"""InfLLM-V2 with small groups (fewer than 16 query heads per K/V head): a per-query gathered tile pads the group to
16 rows, so neighbouring queries can fill the padding and share their gathered blocks at no extra matmul rows.
``PACK_SMALL_GROUPS`` does that with ``share_tokens=1``; explicit ``share_tokens`` tiles take the group padded to a
power of two per query (not 16). Forward and every gradient against the PyTorch reference, the per-query gather
kernels poisoned so that only the shared ones can produce the result.

    python -m pytest tests/kernels/test_infllm_v2_pack.py -q
"""
import pytest
import torch

from salatrain_kernels.infllm_v2 import infllmv2_attn, infllmv2_attn_torch
from salatrain_kernels.infllm_v2.layout import DocLayout
from salatrain_kernels.infllm_v2.plan import AttnPlan
from salatrain_kernels.infllm_v2.shared import pack_share

from tests.kernels.test_infllm_v2 import (FULL_CASES, SMALL, assert_close, grads, interpreter, make_qkv,
                                          record_tile_use, shared_case_matches)


def _plan(heads, kv_heads, batch=1, seqlen_q=64, **kw):
    q, k, _ = make_qkv(batch, seqlen_q, 64, heads, kv_heads, 16)
    return AttnPlan(DocLayout.build(q, k, None), heads, kv_heads, 16, torch.bfloat16, 16, 0.25, 32, **kw)


@pytest.mark.parametrize("group, share", [(1, 16), (2, 8), (3, 4), (4, 4), (5, 2), (8, 2), (16, 1), (32, 1)])
def test_pack_share_fills_sixteen_rows(group, share):
    assert pack_share(group) == share


@pytest.mark.parametrize("heads, kv_heads, share, rows, max_union", [
    (9, 3, 4, 4, 1.0),     # G=3: 4 queries x 4 slots = 16 rows, the size of one per-query tile: always shares
    (4, 2, 2, 8, 1.0),     # G=2, two queries: 8 slots each (a tile is at least 16 rows)
    (4, 2, 16, 2, 0.5),    # G=2, 16 queries: 32 rows, more than a per-query tile: the overlap rule stays
    (32, 2, 4, 16, 0.5),   # G=16: unchanged
])
def test_shared_tile_rows(heads, kv_heads, share, rows, max_union, monkeypatch):
    from salatrain_kernels.infllm_v2 import plan as plan_mod

    monkeypatch.setattr(plan_mod, "PACK_SMALL_GROUPS", False)
    p = _plan(heads, kv_heads, share_tokens=share, share_max_union=0.5)
    assert (p._shared_meta()["M"], p.share, p.share_max_union) == (rows, share, max_union)


@pytest.mark.parametrize("pack", [True, False])
def test_packing_is_the_share_one_rule(pack, monkeypatch):
    from salatrain_kernels.infllm_v2 import plan as plan_mod

    monkeypatch.setattr(plan_mod, "PACK_SMALL_GROUPS", pack)
    assert _plan(9, 3).share == (4 if pack else 1)
    assert _plan(32, 2).share == 1  # a full group: nothing to pack
    assert _plan(9, 3, dq_mode="atomic").share == 1  # the atomic dq pass takes per-query lists
    assert _plan(9, 3, share_tokens=2).share == 2  # an explicit share is kept
    # decoding (one query row per document): tiles share only within a document, so nothing packs or shares
    assert _plan(9, 3, batch=4, seqlen_q=1).share == 1
    assert _plan(32, 2, batch=4, seqlen_q=1, share_tokens=4).share == 1


PACK_CASES = ["g2_exact", "g3_odd_d32", "varlen_3docs", "chunked_prefill", "decode", "straddle_dense_len",
              "forced_exceed_k", "window_24", "g1_mha"]


@interpreter
@pytest.mark.parametrize("gpu_path", [False, True], ids=["interpreter-tiles", "gpu-code-path"])
@pytest.mark.parametrize("case", PACK_CASES)
def test_packed_small_groups_match_reference(case, gpu_path, monkeypatch):
    from salatrain_kernels.infllm_v2 import plan as plan_mod

    monkeypatch.setattr(plan_mod, "PACK_SMALL_GROUPS", True)
    if gpu_path:
        monkeypatch.setattr(plan_mod, "INTERPRETER_TOKENS", 1)
    c = FULL_CASES.get(case) or dict(shape=(1, 110, 110, 3, 3, 16))  # g1_mha: 16 queries a tile
    shared_case_matches(c, len(case) + 31, monkeypatch)


@interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf keys' scores, masked after
@pytest.mark.parametrize("kv_loads", ["tma", "pointer"])
@pytest.mark.parametrize("window", [16, 0], ids=["window-split", "own-block-gathered"])
def test_tiles_spanning_two_documents_do_not_share(window, kv_loads, monkeypatch):
    """Packed tiles take consecutive sparse rows; a tile whose rows span two documents would put one document's
    blocks in the same matmul as the other's rows, where a masked probability (0) times an infinite K/V value is NaN.
    Such tiles go through the per-query kernels: the first document's output and gradients stay the reference's
    with the second document's K/V infinite (and without that rule they are NaN)."""
    from salatrain_kernels.infllm_v2 import plan as plan_mod

    monkeypatch.setattr(plan_mod, "PACK_SMALL_GROUPS", True)
    monkeypatch.setattr(plan_mod, "INTERPRETER_TOKENS", 1)
    spans = record_tile_use(monkeypatch)
    q, k, v = make_qkv(1, 150, 150, 2, 1, 16, seed=19)  # G = 2: eight queries a tile
    cu = torch.tensor([0, 75, 150], dtype=torch.int32)  # row 75 starts the second document, inside a tile
    with torch.no_grad():
        k[:, 75:] = float("inf")
        v[:, 75:] = float("inf")
    kwargs = dict(SMALL, window_size=window, cu_seqlens=cu)
    out = infllmv2_attn(q, k, v, backend="triton", kv_loads=kv_loads, **kwargs)
    ref = infllmv2_attn_torch(q, k, v, **kwargs)
    assert any(0 in tiles for tiles in spans) and any(1 in tiles for tiles in spans)
    assert torch.isfinite(ref[:, :75]).all()
    assert_close(out[:, :75], ref[:, :75])
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):  # the first document's rows
        assert torch.isfinite(want[:, :75]).all()
        assert_close(got[:, :75], want[:, :75], atol=1e-4, rtol=1e-4)
