"""InfLLM-V2 kernels vs their PyTorch references (naive.py: the ``*_torch`` functions, what backend="torch"
runs): each stage alone, then the full op, forward and every gradient.

CPU: Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), fp32, small parameters (block 16, kernel 8,
stride 4, topk 3, window 16, dense_len 32), odd lengths, G in {1, 3, 16}, varlen, Tq < Tk, both normalisers,
each combination of the two selection rules (salatrain's and MiniCPM-SALA's forms; those tests run compiled on
a GPU machine).
Every kernel output starts NaN-poisoned, so an element a kernel forgets to write fails the comparison.
GPU (skipped without CUDA): real shapes (T = 4096/8192, D = 128, block 64) in fp32 and bf16 with the rule
|out - ref| <= 2 |out_torch - ref| + eps, where out_torch is plain PyTorch attention in the same precision
(tests/helpers/naive.py, explicit logits).

    python -m pytest tests/kernels/test_infllm_v2.py -q
"""
import math

import pytest
import torch

from salatrain_kernels import utils
from salatrain_kernels.infllm_v2 import (
    infllmv2_attn,
    infllmv2_attn_torch,
    infllmv2_block_attn,
    infllmv2_block_attn_torch,
    infllmv2_block_scores,
    infllmv2_block_scores_torch,
    infllmv2_select,
    infllmv2_select_torch,
)
from salatrain_kernels.infllm_v2.interface import dense_causal_sdpa, dense_prefix_rows
from salatrain_kernels.infllm_v2.layout import clear_layout_cache
from salatrain_kernels.infllm_v2.params import SparseParams
from tests.helpers.naive import infllmv2_block_attn_naive, selection_margin

SMALL = dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, topk=3, window_size=16, dense_len=32)
SCORING = ("block_size", "kernel_size", "kernel_stride")
SELECTION = ("block_size", "init_blocks", "topk", "window_size")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
# small-shape tests run the kernels under the Triton interpreter; on a GPU machine the real-shape tests run instead
DEVICE = "cuda" if CUDA else "cpu"  # where tests of argument checks call the triton backend (the interpreter on CPU)
interpreter = pytest.mark.skipif(CUDA, reason="interpreter test (CPU machines); GPU tests cover compiled kernels")


def pick(params, names):
    return {n: params[n] for n in names}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(utils, "POISON", True)


def make_qkv(batch, seqlen_q, seqlen_k, heads, kv_heads, dim, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, seqlen_q, heads, dim), (batch, seqlen_k, kv_heads, dim), (batch, seqlen_k, kv_heads, dim)]
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def random_lists(batch, kv_heads, seqlen_q, slots, num_blocks, seed=0):
    """Distinct block ids in random order with -1 holes anywhere (the op must not assume a layout)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.full((batch, kv_heads, seqlen_q, slots), -1, dtype=torch.int32)
    for b in range(batch):
        for h in range(kv_heads):
            for i in range(seqlen_q):
                count = int(torch.randint(0, slots + 1, (1,), generator=gen))
                chosen = torch.randperm(num_blocks, generator=gen)[:count]
                where = torch.randperm(slots, generator=gen)[: chosen.numel()]
                idx[b, h, i, where] = chosen.int()
    return idx


def grads(out, inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    return torch.autograd.grad(out, inputs, grad_out)


def assert_close(actual, expected, atol=2e-5, rtol=2e-5):
    assert not torch.isnan(actual).any(), "NaN in output (an element left unwritten?)"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------- (a) scoring
SCORE_CASES = {
    "g2_odd": dict(batch=1, seqlen_q=101, seqlen_k=101, heads=4, kv_heads=2, dim=16),
    "g16": dict(batch=1, seqlen_q=70, seqlen_k=70, heads=16, kv_heads=1, dim=32),
    "g1_decode_chunk": dict(batch=2, seqlen_q=9, seqlen_k=90, heads=2, kv_heads=2, dim=16),
    "g3_varlen": dict(batch=1, seqlen_q=123, seqlen_k=123, heads=3, kv_heads=1, dim=16, cu=[0, 40, 53, 123]),
    # long enough that full tiles have column steps every row sees whole (both passes' unmasked steps, SPLIT_MASKS):
    # 8-query tiles at G = 16, 64-query tiles at G = 2 (with a partial tile at each document's end)
    "g16_long": dict(batch=1, seqlen_q=420, seqlen_k=420, heads=16, kv_heads=1, dim=16),
    "g2_long_varlen": dict(batch=1, seqlen_q=700, seqlen_k=700, heads=4, kv_heads=2, dim=16, cu=[0, 37, 700]),
}


@interpreter
@pytest.mark.parametrize("normalizer", ["exact", "coarse"])
@pytest.mark.parametrize("case", list(SCORE_CASES))
@pytest.mark.parametrize("split", [True, False], ids=["unmasked-steps-first", "every-step-masked"])
def test_block_scores_match_reference(case, normalizer, split, monkeypatch):
    from salatrain_kernels.infllm_v2 import score

    monkeypatch.setattr(score, "SPLIT_MASKS", split)
    c = dict(SCORE_CASES[case])
    cu = c.pop("cu", None)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, _ = make_qkv(**{n: c[n] for n in ("batch", "seqlen_q", "seqlen_k", "heads", "kv_heads", "dim")})
    kwargs = dict(pick(SMALL, SCORING), normalizer=normalizer, cu_seqlens=cu)
    out = infllmv2_block_scores(q.detach(), k.detach(), backend="triton", **kwargs)
    ref = infllmv2_block_scores_torch(q.detach(), k.detach(), **kwargs)
    assert out.shape == ref.shape
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite) and (out[~finite] == -math.inf).all()
    assert_close(out[finite], ref[finite], atol=1e-6, rtol=1e-5)


@interpreter
def test_block_scores_three_windows_per_block_pair():
    """kernel_size 12 / stride 4: two windows from the previous block reach into each block."""
    q, k, _ = make_qkv(1, 90, 90, 4, 2, 16, seed=3)
    kwargs = dict(block_size=16, kernel_size=12, kernel_stride=4)
    out = infllmv2_block_scores(q.detach(), k.detach(), backend="triton", **kwargs)
    ref = infllmv2_block_scores_torch(q.detach(), k.detach(), **kwargs)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite)
    assert_close(out[finite], ref[finite], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------- (b) selection
def tie_heavy_scores(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, shape, generator=gen).float() / 3
    scores[scores == 1] = -math.inf
    scores[..., 2] = -0.0
    return scores


@interpreter
@pytest.mark.parametrize(
    "shape,kwargs",
    [
        ((2, 2, 150, 10), dict(SMALL)),
        ((1, 3, 37, 10), dict(SMALL, seqlen_k=150)),
        ((1, 2, 150, 10), dict(SMALL, topk=2, init_blocks=3)),  # forced blocks exceed K: lowest indices win
        ((1, 1, 40, 600), dict(block_size=16, init_blocks=2, topk=50, window_size=64, seqlen_k=9600)),
        ((1, 2, 170, 8), dict(SMALL, cu=[0, 50, 61, 170])),
    ],
)
@pytest.mark.parametrize("ties", [False, True, "signed"])
@pytest.mark.parametrize("local_blocks", ["token", "block"])
def test_select_matches_reference(shape, kwargs, ties, local_blocks):
    """The kernel's lists equal the reference's exactly: scores in [0, 1), tie-heavy ones (with -inf and -0.0), and
    scores of both signs (the order-preserving integer keys must rank negative floats below positive ones)."""
    kwargs = dict(kwargs)
    cu = kwargs.pop("cu", None)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    seqlen_k = kwargs.pop("seqlen_k", None)
    gen = torch.Generator().manual_seed(0)
    if ties == "signed":
        scores = torch.randn(shape, generator=gen) * 10.0 ** torch.randint(-30, 30, shape, generator=gen)
    else:
        scores = tie_heavy_scores(shape) if ties else torch.rand(shape, generator=gen)
    sel = dict(pick(kwargs, SELECTION), seqlen_k=seqlen_k, cu_seqlens=cu, local_blocks=local_blocks)
    out = infllmv2_select(scores, backend="triton", **sel)
    assert torch.equal(out, infllmv2_select_torch(scores, **sel))


# -------------------------------------------------------------------------------- (c) attention on given blocks
ATTN_CASES = {
    "g16_dense_prefix": dict(batch=1, seqlen_q=96, seqlen_k=96, heads=16, kv_heads=1, dim=16, dense_len=40),
    "g3_odd": dict(batch=1, seqlen_q=77, seqlen_k=77, heads=3, kv_heads=1, dim=32, dense_len=0),
    "g1_chunk": dict(batch=2, seqlen_q=20, seqlen_k=83, heads=2, kv_heads=2, dim=16, dense_len=70),
    "decode": dict(batch=2, seqlen_q=1, seqlen_k=101, heads=4, kv_heads=1, dim=16, dense_len=0),
    "varlen": dict(batch=1, seqlen_q=110, seqlen_k=110, heads=4, kv_heads=2, dim=16, dense_len=20, cu=[0, 47, 60, 110]),
}


@interpreter
@pytest.mark.parametrize("case", list(ATTN_CASES) + ["varlen_sequence_rule"])
def test_block_attn_matches_reference(case):
    """varlen_sequence_rule: the documents of 47 and 50 keys >= dense_len 20 use their lists at every row, the
    one of 13 keys attends densely."""
    mode = "sequence" if case == "varlen_sequence_rule" else "position"
    c = dict(ATTN_CASES["varlen" if mode == "sequence" else case])
    cu, dense_len = c.pop("cu", None), c.pop("dense_len")
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v = make_qkv(**c)
    num_blocks = -(-c["seqlen_k"] // 16) if cu is None else 3  # varlen: ids valid in every document
    idx = random_lists(c["batch"], c["kv_heads"], c["seqlen_q"], 5, num_blocks)
    kwargs = dict(block_size=16, dense_len=dense_len, cu_seqlens=cu, dense_len_mode=mode)
    out = infllmv2_block_attn(q, k, v, idx, backend="triton", **kwargs)
    ref = infllmv2_block_attn_torch(q, k, v, idx, **kwargs)
    assert_close(out, ref)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------- full op
FULL_CASES = {
    "g2_exact": dict(shape=(1, 112, 112, 4, 2, 16)),
    "g2_coarse": dict(shape=(1, 112, 112, 4, 2, 16), normalizer="coarse"),
    "g3_odd_d32": dict(shape=(1, 97, 97, 3, 1, 32)),
    "g16": dict(shape=(1, 80, 80, 16, 1, 16)),
    "varlen_3docs": dict(shape=(1, 130, 130, 4, 2, 16), cu=[0, 45, 58, 130]),
    "varlen_coarse": dict(shape=(1, 130, 130, 2, 1, 16), cu=[0, 72, 79, 130], normalizer="coarse"),
    "chunked_prefill": dict(shape=(2, 24, 100, 6, 2, 16)),
    "decode": dict(shape=(2, 1, 101, 4, 1, 16)),
    "straddle_dense_len": dict(shape=(1, 100, 100, 2, 1, 16), dense_len=61),
    "forced_exceed_k": dict(shape=(1, 100, 100, 4, 2, 16), topk=1),  # window not split off: all blocks gathered
    "window_24": dict(shape=(1, 120, 120, 2, 1, 16), window_size=24),
}


@interpreter
@pytest.mark.parametrize("case", list(FULL_CASES))
def test_full_op_matches_reference(case):
    c = dict(FULL_CASES[case])
    cu = c.pop("cu", None)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v = make_qkv(*c.pop("shape"), seed=len(case))
    kwargs = dict(SMALL, cu_seqlens=cu, **c)
    out = infllmv2_attn(q, k, v, backend="triton", **kwargs)
    ref = infllmv2_attn_torch(q, k, v, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(got, want, atol=1e-4, rtol=1e-4)


SHARE_CASES = ["g2_exact", "g3_odd_d32", "g16", "varlen_3docs", "chunked_prefill", "decode", "straddle_dense_len",
               "forced_exceed_k", "window_24"]


@interpreter
@pytest.mark.parametrize("case, share", [(c, 4) for c in SHARE_CASES] + [("g2_exact", 2), ("varlen_3docs", 8),
                                                                          ("g16", 8), ("window_24", 2)])
def test_shared_blocks_match_reference(case, share, monkeypatch):
    """share_tokens > 1: neighbouring queries walk the union of their block lists with per-query masks (and tiles
    that straddle documents or end short); outputs and every gradient as the reference."""
    shared_case_matches(FULL_CASES[case], len(case) + share, monkeypatch, share_tokens=share, share_max_union=1.0)


def shared_case_matches(case: dict, seed: int, monkeypatch, **options) -> None:
    """A FULL_CASES case through the shared-block kernels (options: share_tokens, ...): output and every gradient as
    the reference. With one document the per-query gather kernels must not run (with several, the tiles that span
    two take them)."""
    from salatrain_kernels.infllm_v2 import plan

    c = dict(case)
    cu = c.pop("cu", None)
    if cu is None and c["shape"][0] == 1:
        monkeypatch.setattr(plan, "gather_fwd", None)
        monkeypatch.setattr(plan, "gather_dq", None)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v = make_qkv(*c.pop("shape"), seed=seed)
    kwargs = dict(SMALL, cu_seqlens=cu, **c)
    out = infllmv2_attn(q, k, v, backend="triton", **options, **kwargs)
    ref = infllmv2_attn_torch(q, k, v, **kwargs)
    assert_close(out, ref)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(got, want, atol=1e-4, rtol=1e-4)


def record_tile_use(monkeypatch) -> list:
    """Run the real union_lists inside the plan and record, per call, which tiles share (a list of 0/1 per tile)."""
    from salatrain_kernels.infllm_v2 import plan, shared

    chosen = []

    def spy(*args):
        out = shared.union_lists(*args)
        chosen.append(out[3].flatten().tolist())
        return out

    monkeypatch.setattr(plan, "union_lists", spy)
    return chosen


@interpreter
@pytest.mark.parametrize("gpu_path", [False, True], ids=["interpreter-tiles", "gpu-code-path"])
@pytest.mark.parametrize("case, share, max_union", [("g2_exact", 16, 0.15), ("varlen_3docs", 16, 0.2),
                                                    ("chunked_prefill", 16, 0.5), ("g3_odd_d32", 8, 0.2),
                                                    ("window_24", 16, 0.15), ("g16", 2, 0.5)])
def test_sharing_only_where_lists_overlap(case, share, max_union, gpu_path, monkeypatch):
    """share_max_union < 1: tiles whose union list is short enough share (shared kernels), the others' queries take
    their own lists (gather kernels), in one call; both kinds of tile occur here, and outputs and every gradient
    match the reference (a row written by neither kernel, or overwritten by the wrong one, fails). Tiles of more
    than 16 rows (share x the group padded to a power of two): smaller ones always share (test_infllm_v2_pack.py)."""
    from salatrain_kernels.infllm_v2 import plan

    if gpu_path:
        monkeypatch.setattr(plan, "INTERPRETER_TOKENS", 1)
    chosen = record_tile_use(monkeypatch)
    c = dict(FULL_CASES[case])
    cu = c.pop("cu", None)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v = make_qkv(*c.pop("shape"), seed=len(case) + 5)
    kwargs = dict(SMALL, cu_seqlens=cu, **c)
    out = infllmv2_attn(q, k, v, backend="triton", share_tokens=share, share_max_union=max_union, **kwargs)
    ref = infllmv2_attn_torch(q, k, v, **kwargs)
    uses = [u for tiles in chosen for u in tiles]
    assert 0 in uses and 1 in uses, f"expected both sharing and unshared tiles, got {uses}"
    assert_close(out, ref)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(got, want, atol=1e-4, rtol=1e-4)


ATOMIC_DQ_CASES = ["g2_exact", "g16", "varlen_3docs", "chunked_prefill", "decode", "straddle_dense_len",
                   "forced_exceed_k", "window_24"]


@interpreter
@pytest.mark.parametrize("case", ATOMIC_DQ_CASES + ["released_rules"])
def test_atomic_dq_matches_reference(case, monkeypatch):
    """dq_mode="atomic": the sparse rows' gathered dq comes from the dk/dv pass over the blocks' query lists (the
    per-query dq kernel must not run), with and without the local window split, across documents, chunked
    prefill and decoding rows, under both forms of the rules; outputs and every gradient as the reference."""
    from salatrain_kernels.infllm_v2 import plan

    monkeypatch.setattr(plan, "gather_dq", None)
    rules = case == "released_rules"
    c = dict(FULL_CASES["g2_exact" if rules else case])
    cu = c.pop("cu", None)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v = make_qkv(*c.pop("shape"), seed=len(case) + 11)
    kwargs = dict(SMALL, cu_seqlens=cu, **c)
    if rules:
        kwargs.update(dense_len_mode="sequence", local_blocks="block", dense_len=40)
    out = infllmv2_attn(q, k, v, backend="triton", dq_mode="atomic", **kwargs)
    ref = infllmv2_attn_torch(q, k, v, **kwargs)
    assert_close(out, ref)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_dq_mode_is_checked():
    q, k, v = make_qkv(1, 40, 40, 2, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="dq_mode must be one of gather, atomic"):
        infllmv2_attn(q, k, v, backend="triton", dq_mode="fast", **dict(SMALL, dense_len=0))


@interpreter
@pytest.mark.parametrize("mode, local", [("sequence", "block"), ("position", "block")])
def test_shared_blocks_under_the_released_rules(mode, local):
    q, k, v = make_qkv(1, 120, 120, 4, 2, 16, seed=3)
    kwargs = dict(SMALL, dense_len_mode=mode, local_blocks=local, dense_len=40)
    out = infllmv2_attn(q, k, v, backend="triton", share_tokens=4, share_max_union=1.0, **kwargs)  # every tile
    ref = infllmv2_attn_torch(q, k, v, **kwargs)
    assert_close(out, ref)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_union_lists_merge_neighbouring_selections():
    """The union of a tile's lists: each block once, ascending, with the bits of the queries that chose it; only
    the entries the gather kernels take (counts), tiles cut at the end of the rows."""
    from salatrain_kernels.infllm_v2.shared import union_lists

    idx3 = torch.tensor([[[0, 2, 5], [2, 3, -1], [5, 7, 9], [1, -1, -1], [4, 6, 8]]], dtype=torch.int32)
    counts = torch.tensor([[3, 2, 2, 1, 3]], dtype=torch.int32)  # row 2 takes 5, 7 (not 9)
    rows = torch.tensor([0, 1, 2, 3, 4])
    union, bits, count, use = union_lists(idx3, counts, rows, torch.zeros(5, dtype=torch.long), 10, 2)
    assert count.tolist() == [[4, 3, 3]] and use.tolist() == [[1, 1, 1]]  # max_union 1: every tile shares
    for max_union, want in ((0.8, [[1, 0, 0]]), (0.79, [[0, 0, 0]])):  # tile 0: 4 of 5 entries, the others 3 of 3
        assert union_lists(idx3, counts, rows, torch.zeros(5, dtype=torch.long), 10, 2, max_union)[3].tolist() == want
    assert union[0, 0, :4].tolist() == [0, 2, 3, 5] and bits[0, 0, :4].tolist() == [1, 3, 2, 1]
    assert union[0, 1, :3].tolist() == [1, 5, 7] and bits[0, 1, :3].tolist() == [2, 1, 1]
    assert union[0, 2, :3].tolist() == [4, 6, 8] and bits[0, 2, :3].tolist() == [1, 1, 1]
    for bad in (3, 32):
        with pytest.raises(ValueError, match="share_tokens"):
            union_lists(idx3, counts, rows, torch.zeros(5, dtype=torch.long), 10, bad)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="share_max_union"):
            infllmv2_attn(*make_qkv(1, 40, 40, 2, 1, 16, device=DEVICE), backend="triton", share_tokens=2,
                          share_max_union=bad, **SMALL)


@interpreter
def test_full_op_in_row_chunks(monkeypatch):
    """A tiny budget for the fp32 partial outputs forces several row chunks (varlen: chunks cut documents)."""
    from salatrain_kernels.infllm_v2 import plan

    monkeypatch.setattr(plan, "PART_BUDGET_BYTES", 1024)  # chunks of one tile (64 rows)
    q, k, v = make_qkv(1, 150, 150, 4, 2, 16, seed=11)
    kwargs = dict(SMALL, cu_seqlens=torch.tensor([0, 70, 81, 150], dtype=torch.int32))
    out = infllmv2_attn(q, k, v, backend="triton", **kwargs)
    ref = infllmv2_attn_torch(q, k, v, **kwargs)
    assert_close(out, ref)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(got, want, atol=1e-4, rtol=1e-4)


@interpreter
@pytest.mark.parametrize("keys, dq_mode, chunk", [(None, "gather", 3), (8, "gather", 3), (8, "atomic", 3),
                                                  (None, "gather", 0), (8, "atomic", 0)],
                         ids=["whole-block", "half-block-programs", "half-block-programs-atomic-dq",
                              "whole-list-no-atomics", "whole-list-no-atomics-half-block-atomic-dq"])
def test_dkdv_blocks_in_several_chunks(keys, dq_mode, chunk, monkeypatch):
    """Gathered dk/dv with a block's queries cut into chunks of 3 (several programs add into one block's dk/dv,
    as on the GPU, where a chunk holds 256), and with each chunk's keys split over two programs (DKDV_KEYS, half of
    the 16-key blocks): every gradient as the reference; the chunks cover the entries block by block, consecutively
    (the grid's spare programs after them). Chunk 0: one program per block takes its whole list and adds dk/dv
    without atomics (onto the local window's part, which must not be lost)."""
    from salatrain_kernels.infllm_v2 import plan

    monkeypatch.setattr(plan, "INTERPRETER_DKDV_CHUNK", chunk)
    monkeypatch.setattr(plan, "DKDV_KEYS", keys)
    maps = []
    real_key_map = plan.AttnPlan.key_map

    def spy(self, idx3, counts):
        out = real_key_map(self, idx3, counts)
        maps.append(out)
        return out

    monkeypatch.setattr(plan.AttnPlan, "key_map", spy)
    c = dict(FULL_CASES["varlen_3docs"])
    cu = torch.tensor(c.pop("cu"), dtype=torch.int32)
    q, k, v = make_qkv(*c.pop("shape"), seed=23)
    kwargs = dict(SMALL, cu_seqlens=cu, **c)
    out = infllmv2_attn(q, k, v, backend="triton", dq_mode=dq_mode, **kwargs)
    ref = infllmv2_attn_torch(q, k, v, **kwargs)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(got, want, atol=1e-4, rtol=1e-4)
    (key, e0, e1), n_chunks, entry_row = maps[0][0], int(maps[0][1]), maps[0][2]
    if chunk:
        assert n_chunks > key.unique().numel(), "expected blocks with several chunks"
    else:
        assert n_chunks == key[:n_chunks].unique().numel(), "expected one chunk per block"
    assert (e1[:n_chunks] > e0[:n_chunks]).all()
    assert (key[1:n_chunks] >= key[:n_chunks - 1]).all() and (e0[1:n_chunks] == e1[:n_chunks - 1]).all()
    assert int(e0[0]) == 0 and int(e1[n_chunks - 1]) <= entry_row.numel()


@interpreter
@pytest.mark.parametrize("prefetch", [False, True], ids=["pipelined", "prefetched"])
@pytest.mark.parametrize("dq_mode", ["gather", "atomic"])
def test_dkdv_many_steps_per_program(prefetch, dq_mode, monkeypatch):
    """Gathered dk/dv programs that walk their queries in many steps of 2 queries with a partial last step (chunks of
    7 entries): every gradient as the reference, with each step's rows loaded in the step (the pipeliner's loop) and
    one step ahead (DKDV_PREFETCH: during step i the rows of step i + 1 and the entry rows of step i + 2)."""
    from salatrain_kernels.infllm_v2 import plan

    monkeypatch.setattr(plan, "DKDV_PREFETCH", prefetch)
    monkeypatch.setattr(plan, "INTERPRETER_DKDV_CHUNK", 7)
    c = dict(FULL_CASES["varlen_3docs"])
    cu = torch.tensor(c.pop("cu"), dtype=torch.int32)
    shape = c.pop("shape")
    monkeypatch.setattr(plan, "INTERPRETER_DKDV_ROWS", 2 * utils.next_pow2(shape[3] // shape[4]))
    maps = []
    real_key_map = plan.AttnPlan.key_map

    def spy(self, idx3, counts):
        maps.append((self.dkdv_rows, self.dkdv_prefetch, real_key_map(self, idx3, counts)))
        return maps[-1][2]

    monkeypatch.setattr(plan.AttnPlan, "key_map", spy)
    q, k, v = make_qkv(*shape, seed=29)
    kwargs = dict(SMALL, cu_seqlens=cu, **c)
    out = infllmv2_attn(q, k, v, backend="triton", dq_mode=dq_mode, **kwargs)
    ref = infllmv2_attn_torch(q, k, v, **kwargs)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(got, want, atol=1e-4, rtol=1e-4)
    rows, used_prefetch, ((_, e0, e1), n_chunks, _) = maps[0][0], maps[0][1], maps[0][2][:3]
    n = int(n_chunks)
    assert used_prefetch is prefetch
    assert int((e1[:n] - e0[:n]).max()) == 7, "expected chunks of 7 entries: 4 steps of 2 queries, the last partial"


LOCAL_DKDV_CASES = {
    # the local dk/dv kernel's 128-key tiles take 32-query steps: on the diagonal, inside every row's range, and past
    # the window's start. dense rows: tile 0 has steps inside every row's range at queries [128, 288) (dense_len 300)
    "dense_rows": dict(shape=(1, 320, 320, 4, 2, 16), dense_len=300),
    # a 160-token window: one step per tile inside every row's range ([128, 160) and [256, 288)), masked ones around
    "wide_window": dict(shape=(1, 384, 384, 2, 1, 16), window_size=160),
    # queries from position 130 (chunked prefill): steps off the tiles' grid, inside every row's range from 258 to 290
    "chunked_off_grid": dict(shape=(2, 200, 330, 4, 2, 16), dense_len=300),
}


@interpreter
@pytest.mark.parametrize("local", ["token", "block"])
@pytest.mark.parametrize("case", list(LOCAL_DKDV_CASES))
def test_local_dkdv_over_every_kind_of_query_step(case, local):
    """The local window's dk/dv at lengths where key tiles have query steps of every kind (on the diagonal, inside
    every row's range, past the window's start; a kernel that skips masks where it may must get each right): every
    gradient as the reference, under both local rules."""
    c = dict(LOCAL_DKDV_CASES[case])
    q, k, v = make_qkv(*c.pop("shape"), seed=len(case))
    kwargs = dict(SMALL, **{**c, "local_blocks": local})
    out = infllmv2_attn(q, k, v, backend="triton", **kwargs)
    ref = infllmv2_attn_torch(q, k, v, **kwargs)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(got, want, atol=1e-4, rtol=1e-4)


@interpreter
def test_full_op_gpu_code_path(monkeypatch):
    """One query per gather program and one 64-key block per step: the code path the GPU runs."""
    from salatrain_kernels.infllm_v2 import plan

    monkeypatch.setattr(plan, "INTERPRETER_TOKENS", 1)
    q, k, v = make_qkv(1, 200, 200, 2, 1, 16, seed=5)
    kwargs = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, topk=2, window_size=64, dense_len=128)
    out = infllmv2_attn(q, k, v, backend="triton", **kwargs)
    ref = infllmv2_attn_torch(q, k, v, **kwargs)
    assert_close(out, ref)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(got, want, atol=1e-4, rtol=1e-4)


@interpreter
def test_all_blocks_visible_equals_dense():
    """topk + window blocks >= every block: sparse selection must reproduce dense causal attention."""
    q, k, v = make_qkv(1, 100, 100, 4, 2, 16, seed=7)
    sparse = infllmv2_attn(q, k, v, backend="triton", **dict(SMALL, topk=8, dense_len=0))
    dense = infllmv2_attn(q, k, v, backend="triton", **dict(SMALL, dense_len=10**9))
    ref = infllmv2_attn_torch(q, k, v, **dict(SMALL, dense_len=10**9))
    assert_close(sparse, ref)
    assert_close(dense, ref)
    for got, want in zip(grads(sparse, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode,local", [("position", "token"), ("position", "block"), ("sequence", "token"),
                                        ("sequence", "block")])
def test_dense_prefix_rows_are_dense_causal_attention(mode, local):
    """The rows infllmv2_attn's SDPA fast path takes (dense_prefix_rows: the rule's dense rows and those with at
    most K blocks up to them) have the reference's output and gradients of dense causal attention under every
    rule, and the first row after them already does not: the boundary is where the selection starts to matter."""
    kwargs = dict(SMALL, dense_len=0 if mode == "position" else 80, dense_len_mode=mode, local_blocks=local)
    q, k, v = make_qkv(1, 160, 160, 4, 2, 16, seed=11)
    prefix = dense_prefix_rows(160, SparseParams(**kwargs))
    assert prefix == (SMALL["topk"] + SMALL["window_size"] // SMALL["block_size"]) * SMALL["block_size"] == 64
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    dense_ins = [x.clone().requires_grad_() for x in (q, k, v)]
    sparse = infllmv2_attn_torch(*ins, **kwargs)
    dense = infllmv2_attn_torch(*dense_ins, **dict(SMALL, dense_len=10**9))
    assert_close(sparse[:, :prefix], dense[:, :prefix])
    assert (sparse[:, prefix:] - dense[:, prefix:]).abs().amax(dim=(0, 2, 3))[:16].max() > 1e-3
    grad_out = torch.randn(sparse[:, :prefix].shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(sparse[:, :prefix], ins, grad_out)
    want = torch.autograd.grad(dense[:, :prefix], dense_ins, grad_out)
    for g, w in zip(got, want):
        assert_close(g, w, atol=1e-5, rtol=1e-5)
    # a rule-dense prefix longer than K blocks is taken whole
    assert dense_prefix_rows(160, SparseParams(**dict(kwargs, dense_len=100, dense_len_mode="position"))) == 100
    assert dense_prefix_rows(60, SparseParams(**dict(kwargs, dense_len=80, dense_len_mode="sequence"))) == 80


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (2, 2)])
def test_dense_prefix_sdpa_shares_kv_heads_like_the_reference(heads, kv_heads):
    """The fast path's SDPA call (K/V heads shared by enable_gqa on [B, H, T, D] views of sliced [B, T, H, D]
    tensors) is the reference's dense causal attention, forward and backward, query head h reading KV head
    h // (heads / kv_heads)."""
    q, k, v = make_qkv(2, 96, 96, heads, kv_heads, 16, seed=5)
    prefix = 70  # a slice of the leaves, as the op takes it: strided views, not contiguous tensors
    ref_ins = [x.detach()[:, :prefix].clone().requires_grad_() for x in (q, k, v)]
    got = dense_causal_sdpa(*(x[:, :prefix] for x in (q, k, v)), 16**-0.5)
    want = infllmv2_attn_torch(*ref_ins, **dict(SMALL, dense_len=10**9))
    assert_close(got, want, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn(got.shape, generator=torch.Generator().manual_seed(3))
    for g, w in zip(torch.autograd.grad(got, (q, k, v), grad_out), torch.autograd.grad(want, ref_ins, grad_out)):
        assert_close(g[:, :prefix], w, atol=1e-5, rtol=1e-5)
        assert not g[:, prefix:].any()


@needs_cuda
@pytest.mark.parametrize("mode,local", [("position", "token"), ("sequence", "block")])
def test_gpu_sdpa_prefix_covers_all_visible_rows(mode, local):
    """bf16 at T = 4096: the SDPA fast path (the first 768 rows under the released rules, where K = 12 blocks of
    64 see every block, and 1024 under the position rule) against the same call with every row in Triton."""
    q, k, v, _ = gpu_case(1, 4096, 4096, 32, 2, torch.bfloat16, seed=5)
    kwargs = dict(GPU, dense_len_mode=mode, local_blocks=local)
    runs = {}
    for name, dtype, sdpa in (("fast", torch.bfloat16, True), ("slow", torch.bfloat16, False),
                              ("ref", torch.float32, False)):
        ins = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out = infllmv2_attn(*ins, backend="triton", dense_prefix_sdpa=sdpa, **kwargs)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(q.device, dtype)
        runs[name] = (out, *torch.autograd.grad(out, ins, grad_out))
    for fast, slow, ref in zip(runs["fast"], runs["slow"], runs["ref"]):
        within_rule(fast, ref, slow, eps=1e-3)


@pytest.mark.parametrize("topk", [17, 18, 64, 5000])
@pytest.mark.parametrize("code_path", ["interpreter", "gpu"])
def test_any_topk_up_to_and_past_the_number_of_blocks(monkeypatch, topk, code_path):
    """topk near, at and far past the number of blocks (19 here) on every path: the full op (both the
    interpreter's many-queries-per-program gather and the one-query GPU code path; compiled on a GPU), forward
    and gradients, and the selection stage, whose lists keep K = topk + window/block slots (-1 past the blocks
    that exist)."""
    from salatrain_kernels.infllm_v2 import plan

    if code_path == "gpu" and not CUDA:
        monkeypatch.setattr(plan, "INTERPRETER_TOKENS", 1)
    dev = "cuda" if CUDA else "cpu"
    q, k, v = (x.to(dev).detach().requires_grad_() for x in make_qkv(1, 300, 300, 2, 1, 16, seed=topk))
    kwargs = dict(SMALL, topk=topk, window_size=32, dense_len=64)
    out = infllmv2_attn(q, k, v, backend="triton", **kwargs)
    ref = infllmv2_attn_torch(q, k, v, **kwargs)
    assert_close(out, ref)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(got, want, atol=1e-4, rtol=1e-4)
    scores = infllmv2_block_scores_torch(q.detach(), k.detach(), **pick(kwargs, SCORING))
    sel = infllmv2_select(scores, backend="triton", **pick(kwargs, SELECTION))
    want = infllmv2_select_torch(scores, **pick(kwargs, SELECTION))
    assert sel.shape[-1] == topk + 2 and torch.equal(sel, want)


# ----------------------------------------------------------------------- the two selection rules, both forms
# K = topk 2 + window 16 / block 16 = 3 blocks (48 tokens) < dense_len 80: the dense_len rules differ at rows 48..79
# of a long document, the local-window rules at rows with t % 16 != 15 (the token window holds one block there).
# These run wherever the kernels do: the interpreter on CPU, compiled on a GPU machine (fp32 both).
RULES = [(mode, local) for mode in ("position", "sequence") for local in ("token", "block")]
RULE_SMALL = dict(SMALL, topk=2, dense_len=80)
RULE_CASES = {
    "prefill_odd": dict(shape=(1, 131, 131, 4, 2, 16)),
    "short_doc": dict(shape=(1, 77, 77, 2, 1, 16)),  # shorter than dense_len: dense under both dense_len rules
    "varlen_both_sides": dict(shape=(1, 200, 200, 4, 2, 16), cu=[0, 101, 130, 200]),  # 101 >= dense_len > 29, 70
    "chunked_prefill": dict(shape=(2, 24, 100, 6, 2, 16)),  # position: the chunk straddles dense_len
    "decode": dict(shape=(2, 1, 101, 4, 1, 16)),
    "window_24_g16": dict(shape=(1, 97, 97, 16, 1, 16), window_size=24),  # window split off under "block" only
    "no_split_coarse": dict(shape=(1, 90, 90, 3, 1, 32), topk=1, normalizer="coarse"),  # all blocks gathered
}
DEV = "cuda" if CUDA else "cpu"


def rule_case(case, mode, local):
    c = dict(RULE_CASES[case])
    cu = c.pop("cu", None)
    q, k, v = make_qkv(*c.pop("shape"), seed=len(case), device=DEV)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    return q, k, v, dict(RULE_SMALL, cu_seqlens=cu, dense_len_mode=mode, local_blocks=local, **c)


@pytest.mark.parametrize("case", list(RULE_CASES))
@pytest.mark.parametrize("mode,local", RULES)
def test_full_op_matches_reference_under_each_rule(mode, local, case):
    q, k, v, kwargs = rule_case(case, mode, local)
    out = infllmv2_attn(q, k, v, backend="triton", **kwargs)
    ref = infllmv2_attn_torch(q, k, v, **kwargs)
    assert out.shape == q.shape
    assert_close(out, ref)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["prefill_odd", "varlen_both_sides", "chunked_prefill", "window_24_g16"])
def test_rule_cases_tell_the_rules_apart(case):
    """The cases above would pass with the rules ignored unless each form changes the reference's output there."""
    outs = {}
    for mode, local in RULES:
        q, k, v, kwargs = rule_case(case, mode, local)
        outs[mode, local] = infllmv2_attn_torch(q.detach(), k.detach(), v.detach(), **kwargs)
    for other in RULES[1:]:
        assert (outs[other] - outs["position", "token"]).abs().max() > 1e-3, other


@pytest.mark.parametrize("mode,local", RULES[1:])
def test_full_op_rules_gpu_code_path_in_row_chunks(monkeypatch, mode, local):
    """Block 64 (one block per gather step, one query per gather program: the GPU code path under the
    interpreter too), partial outputs in row chunks of one tile that cut the documents, a document long enough
    for the sequence rule beside a shorter one."""
    from salatrain_kernels.infllm_v2 import plan

    monkeypatch.setattr(plan, "INTERPRETER_TOKENS", 1)
    monkeypatch.setattr(plan, "PART_BUDGET_BYTES", 1024)
    q, k, v = make_qkv(1, 330, 330, 2, 1, 16, seed=9, device=DEV)
    kwargs = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, topk=2, window_size=64,
                  dense_len=240, cu_seqlens=torch.tensor([0, 260, 330], dtype=torch.int32, device=DEV),
                  dense_len_mode=mode, local_blocks=local)
    out = infllmv2_attn(q, k, v, backend="triton", **kwargs)
    ref = infllmv2_attn_torch(q, k, v, **kwargs)
    assert_close(out, ref)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_unknown_rule_values_raise():
    q, k, v = make_qkv(1, 40, 40, 4, 2, 16, device=DEV)
    for bad in (dict(dense_len_mode="document"), dict(local_blocks="window")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            infllmv2_attn(q, k, v, backend="triton", **SMALL, **bad)
    with pytest.raises(ValueError, match="local_blocks"):
        infllmv2_select(torch.zeros(1, 2, 40, 3, device=DEV), backend="triton", local_blocks="window",
                        **pick(SMALL, SELECTION))


def test_auto_backend_on_cpu_is_reference():
    q, k, v = make_qkv(1, 50, 50, 2, 1, 16)
    assert torch.equal(infllmv2_attn(q, k, v, **SMALL), infllmv2_attn_torch(q, k, v, **SMALL))


def test_poisoning_is_active():
    assert torch.isnan(utils.new_empty((3,), torch.float32, "cpu")).all()
    assert (utils.new_empty((3,), torch.int32, "cpu") == torch.iinfo(torch.int32).min).all()


@pytest.mark.parametrize(
    "call",
    [
        lambda q, k, v: infllmv2_attn(q, k[:, :10], v[:, :10], backend="triton", **SMALL),  # Tq > Tk
        lambda q, k, v: infllmv2_attn(q, k, v, backend="triton", **dict(SMALL, normalizer="approx")),
        lambda q, k, v: infllmv2_attn(q, k, v, backend="triton", **dict(SMALL, block_size=24)),
        lambda q, k, v: infllmv2_attn(q, k, v, backend="cuda", **SMALL),
        lambda q, k, v: infllmv2_attn(q, k, v, cu_seqlens=torch.tensor([0, 20, 40]), **SMALL),  # not int32
    ],
)
def test_invalid_arguments_raise(call):
    q, k, v = make_qkv(1, 40, 40, 4, 2, 16)
    with pytest.raises(ValueError):
        call(q, k, v)


# ------------------------------------------------------------------------------------------- GPU, real shapes
GPU = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, topk=8, window_size=256, dense_len=1024)


def within_rule(out, ref, lowp, eps=1e-5):
    """flash-attention's rule: |out - ref| <= 2 |out_torch_lowp - ref| + eps (max norms)."""
    err, base = (out.float() - ref.float()).abs().max().item(), (lowp.float() - ref.float()).abs().max().item()
    assert err <= 2 * base + eps, f"kernel error {err:.3e} > 2 x torch error {base:.3e} + {eps}"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalizer", ["exact", "coarse"])
def test_gpu_scores_and_selection(dtype, normalizer):
    q, k, _ = make_qkv(1, 4096, 4096, 16, 1, 128, dtype=dtype, device="cuda")
    q, k = q.detach(), k.detach()
    kwargs = dict(pick(GPU, SCORING), normalizer=normalizer)
    out = infllmv2_block_scores(q, k, backend="triton", **kwargs)
    ref = infllmv2_block_scores_torch(q.float(), k.float(), **kwargs)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: compressed keys are rounded to bf16 for tl.dot
    assert_close(out[finite], ref[finite], atol=tol, rtol=tol)
    sel = dict(pick(GPU, SELECTION), seqlen_k=4096)
    assert torch.equal(infllmv2_select(out, backend="triton", **sel), infllmv2_select_torch(out, **sel))


def gpu_case(batch, seqlen_q, seqlen_k, heads, kv_heads, dtype, cu=None, seed=0):
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, heads, kv_heads, 128, seed=seed, dtype=dtype, device="cuda")
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    return q, k, v, cu


def triton_block_idx(q, k, cu, seqlen_k, normalizer="exact"):
    scores = infllmv2_block_scores(q.detach(), k.detach(), backend="triton", cu_seqlens=cu, normalizer=normalizer,
                                   **pick(GPU, SCORING))
    return infllmv2_select(scores, backend="triton", seqlen_k=seqlen_k, cu_seqlens=cu, **pick(GPU, SELECTION))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,cu",
    [
        pytest.param((1, 4096, 4096, 16, 1), None, id="g16"),
        pytest.param((1, 4096, 4096, 32, 2), [0, 1500, 1700, 4096], id="g16_varlen"),
        pytest.param((2, 1024, 4096, 16, 1), None, id="g16_chunk"),
        pytest.param((1, 4096, 4096, 3, 1), None, id="g3"),
        # small groups packed four queries a tile, documents ending inside a tile (the one-document rule)
        pytest.param((1, 4096, 4096, 6, 2), [0, 1501, 1703, 4096], id="g3_varlen"),
    ],
)
def test_gpu_full_op(dtype, shape, cu):
    if dtype == torch.float32 and (cu is not None or shape[1] != shape[2] or shape[3] // shape[4] < 16):
        pytest.skip("fp32 runs the padded G=16 case only (each variant compiles its own kernels)")
    q, k, v, cu = gpu_case(*shape, dtype=dtype, cu=cu)
    kwargs = dict(GPU, cu_seqlens=cu)
    out = infllmv2_attn(q, k, v, backend="triton", dense_prefix_sdpa=False, **kwargs)
    with_sdpa = infllmv2_attn(q, k, v, backend="triton", **kwargs)  # dense prefix through torch SDPA when possible
    atomic = infllmv2_attn(q, k, v, backend="triton", dq_mode="atomic", **kwargs)  # dq in the dk/dv pass
    pointer = infllmv2_attn(q, k, v, backend="triton", kv_loads="pointer", **kwargs)  # K/V without bulk copies
    shared_all = infllmv2_attn(q, k, v, backend="triton", share_tokens=4, share_max_union=1.0, **kwargs)  # every tile
    # the default rule: tiles share where their lists overlap (random data: few tiles)
    shared = infllmv2_attn(q, k, v, backend="triton", share_tokens=4, **kwargs)
    idx = triton_block_idx(q, k, cu, shape[2])
    stages = infllmv2_block_attn(q, k, v, idx, backend="triton", block_size=64, dense_len=GPU["dense_len"],
                                 cu_seqlens=cu)
    # the selection is a top-K of the fp32 reference scores up to the kernel's score error (bf16: k_cmp rounding)
    ref_scores = infllmv2_block_scores_torch(q.detach().float(), k.detach().float(), cu_seqlens=cu,
                                             **pick(GPU, SCORING))
    margin = selection_margin(idx, ref_scores, seqlen_k=shape[2], cu_seqlens=cu, **pick(GPU, SELECTION))
    scale = ref_scores[torch.isfinite(ref_scores)].abs().max()
    tol = (1e-5 if dtype == torch.float32 else 6e-2) * scale
    assert (margin >= -tol).all(), f"selection off by {-margin.min().item():.3e} (allowed {tol.item():.1e})"
    attn = dict(block_size=64, dense_len=GPU["dense_len"], cu_seqlens=cu)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = infllmv2_block_attn_naive(qf, kf, vf, idx, **attn)
    lowp = infllmv2_block_attn_naive(q, k, v, idx, upcast=False, **attn)
    for result in (out, with_sdpa, stages, pointer, shared, shared_all):
        within_rule(result, ref, lowp)
    ref_grads, lowp_grads = grads(ref, (qf, kf, vf)), grads(lowp, (q, k, v))
    for result in (out, with_sdpa, atomic, pointer, shared, shared_all):
        for got, want, torch_lowp in zip(grads(result, (q, k, v)), ref_grads, lowp_grads):
            within_rule(got, want, torch_lowp, eps=1e-4)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cu", [None, [0, 3000, 3900, 4096]], ids=["padded", "varlen"])
def test_gpu_full_op_released_rules(dtype, cu):
    """dense_len_mode=sequence, local_blocks=block at real shapes: every row of a document of dense_len keys or
    more selects blocks (varlen: 3000 keys, beside documents of 900 and 196 that attend densely), the local
    window is the query's block and the 4 before it. The flash-attention rule against each document's
    explicit-logit attention over the kernels' own selection, which must be a top-K of the fp32 scores."""
    q, k, v, cu = gpu_case(1, 4096, 4096, 32, 2, dtype, cu=cu, seed=3)
    rules = dict(dense_len_mode="sequence", local_blocks="block")
    out = infllmv2_attn(q, k, v, backend="triton", cu_seqlens=cu, **GPU, **rules)
    bounds = [0, 4096] if cu is None else cu.tolist()
    refs, lowps, grad_refs, grad_lowps = [], [], [], []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (x.detach()[:, s:e] for x in (q, k, v))
        scores = infllmv2_block_scores(qd, kd, backend="triton", **pick(GPU, SCORING))
        idx = infllmv2_select(scores, backend="triton", local_blocks="block", **pick(GPU, SELECTION))
        ref_scores = infllmv2_block_scores_torch(qd.float(), kd.float(), **pick(GPU, SCORING))
        margin = selection_margin(idx, ref_scores, local_blocks="block", **pick(GPU, SELECTION))
        tol = (1e-5 if dtype == torch.float32 else 6e-2) * ref_scores[torch.isfinite(ref_scores)].abs().max()
        assert (margin >= -tol).all(), f"selection off by {-margin.min().item():.3e} (allowed {tol.item():.1e})"
        attn = dict(block_size=GPU["block_size"], dense_len=0 if e - s >= GPU["dense_len"] else e - s)
        qf, kf, vf = (x.float().requires_grad_() for x in (qd, kd, vd))
        ql, kl, vl = (x.clone().requires_grad_() for x in (qd, kd, vd))
        refs.append(infllmv2_block_attn_naive(qf, kf, vf, idx, **attn))
        lowps.append(infllmv2_block_attn_naive(ql, kl, vl, idx, upcast=False, **attn))
        grad_out = torch.randn(refs[-1].shape, generator=torch.Generator().manual_seed(s)).to(q.device)
        grad_refs.append(torch.autograd.grad(refs[-1], (qf, kf, vf), grad_out))
        grad_lowps.append(torch.autograd.grad(lowps[-1], (ql, kl, vl), grad_out.to(dtype)))
    within_rule(out, torch.cat(refs, 1), torch.cat(lowps, 1))
    grad_out = torch.cat([torch.randn(r.shape, generator=torch.Generator().manual_seed(s)) for r, s in
                          zip(refs, bounds)], 1).to(q.device, dtype)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    for i in range(3):
        want = torch.cat([g[i] for g in grad_refs], 1)
        torch_lowp = torch.cat([g[i] for g in grad_lowps], 1)
        within_rule(got[i], want, torch_lowp, eps=1e-4)


@needs_cuda
def test_gpu_full_op_8k_forward():
    q, k, v, _ = gpu_case(1, 8192, 8192, 16, 1, torch.bfloat16)
    with torch.no_grad():
        out = infllmv2_attn(q, k, v, backend="triton", **GPU)
        idx = triton_block_idx(q, k, None, 8192)
        attn = dict(block_size=64, dense_len=GPU["dense_len"])
        ref = infllmv2_block_attn_naive(q.float(), k.float(), v.float(), idx, **attn)
        lowp = infllmv2_block_attn_naive(q, k, v, idx, upcast=False, **attn)
    within_rule(out, ref, lowp)


@needs_cuda
@pytest.mark.parametrize("seqlen_q", [1, 4096])
def test_gpu_padded_call_reads_nothing_back(seqlen_q):
    """A padded-batch call (one decoding query after 9,000 keys, or a 4K prefill), after a first call has compiled
    the kernels and filled the pinned-memory cache, raises nothing under torch's sync debug mode "error": the
    host tables reach the GPU from pinned memory (layout.to_device) and nothing is read back; both when the call
    builds its tables (the layout cache cleared) and when it finds them kept."""
    q, k, v, _ = gpu_case(1, seqlen_q, 9000 if seqlen_q == 1 else seqlen_q, 32, 2, torch.bfloat16)
    with torch.no_grad():
        infllmv2_attn(q, k, v, backend="triton", **GPU)
        torch.cuda.synchronize()
        clear_layout_cache()
        torch.cuda.set_sync_debug_mode("error")
        try:
            infllmv2_attn(q, k, v, backend="triton", **GPU)
            infllmv2_attn(q, k, v, backend="triton", **GPU)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_gpu_backward_reads_nothing_back():
    """Forward and backward of a padded training call raise nothing under sync debug mode "error" once compiled:
    the dk/dv pass's block map (the chunks, each block's first entry) is built on the device without reading back.
    (cu_seqlens on the device are read back once by DocLayout.build, by design: the layout is host lists.)"""
    q, k, v, cu = gpu_case(1, 4096, 4096, 32, 2, torch.bfloat16)
    do = torch.randn_like(q)
    torch.autograd.grad(infllmv2_attn(q, k, v, backend="triton", cu_seqlens=cu, **GPU), (q, k, v), do)
    torch.cuda.synchronize()
    clear_layout_cache()  # the checked calls: one that builds its tables, one that finds them kept
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            torch.autograd.grad(infllmv2_attn(q, k, v, backend="triton", cu_seqlens=cu, **GPU), (q, k, v), do)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_gpu_dense_only_matches_sdpa():
    """T <= dense_len: our Triton dense kernel (the SDPA prefix shortcut off) against SDPA flash."""
    q, k, v, _ = gpu_case(1, 1024, 1024, 32, 2, torch.bfloat16)
    with torch.no_grad():
        out = infllmv2_attn(q, k, v, backend="triton", dense_prefix_sdpa=False, **GPU)
    qf, kf, vf = (x.detach().float() for x in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(
        qf.transpose(1, 2), kf.repeat_interleave(16, 2).transpose(1, 2), vf.repeat_interleave(16, 2).transpose(1, 2),
        is_causal=True,
    ).transpose(1, 2)
    lowp = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(16, 2).transpose(1, 2), v.repeat_interleave(16, 2).transpose(1, 2),
        is_causal=True,
    ).transpose(1, 2)
    within_rule(out, ref, lowp)
