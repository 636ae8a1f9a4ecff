"""InfLLM-V2 keeps the layout of recent calls (layout.LAYOUT_CACHE_SIZE): a call of the same shape and document
bounds reuses the layout and every host table built from it instead of building and copying them again. The reuse
must be invisible: the same results as building afresh, no table written by a call, a new layout whenever anything
it depends on differs.

    python -m pytest tests/kernels/test_infllm_v2_layout_cache.py -q
"""
import pytest
import torch

from salatrain_kernels.infllm_v2 import infllmv2_attn, layout as layout_mod
from salatrain_kernels.infllm_v2.layout import DocLayout, clear_layout_cache

from tests.kernels.test_infllm_v2 import CUDA, DEVICE, SMALL, grads, make_qkv

CU = [0, 70, 81, 150]


@pytest.fixture(autouse=True)
def fresh_cache():
    clear_layout_cache()
    yield
    clear_layout_cache()


def _snapshot(kept: dict) -> dict:
    def copy(x):
        if isinstance(x, torch.Tensor):
            return x.clone()
        if isinstance(x, tuple):
            return tuple(copy(v) for v in x)
        return x
    return {key: copy(value) for key, value in kept.items()}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_same_shape_and_bounds_reuse_one_layout():
    cu = torch.tensor(CU, dtype=torch.int32)
    first = DocLayout.from_shape(1, 150, 150, "cpu", cu)
    assert DocLayout.from_shape(1, 150, 150, "cpu", cu.clone()) is first
    assert first.tiles(16, 32) is first.tiles(16, 32)  # a table is built once per arguments
    assert first.rows(32, 2**62, 0, 150) is first.rows(32, 2**62, 0, 150)
    assert first.tiles(16, 32) is not first.tiles(16, 32, on_device=False)
    others = [
        DocLayout.from_shape(1, 150, 150, "cpu", torch.tensor([0, 70, 80, 150])),  # other bounds
        DocLayout.from_shape(1, 150, 150, "cpu", None),
        DocLayout.from_shape(2, 150, 150, "cpu", None),
        DocLayout.from_shape(1, 10, 150, "cpu", None),
    ]
    assert all(o is not first for o in others) and len({id(o) for o in others}) == len(others)
    with torch.inference_mode():  # tensors made in inference mode are kept apart from the others
        assert DocLayout.from_shape(1, 150, 150, "cpu", cu) is not first
    kept = len(layout_mod._LAYOUTS)
    step = DocLayout.from_shape(4, 1, 300, "cpu", None)  # a decoding step: new every step, never kept
    assert DocLayout.from_shape(4, 1, 300, "cpu", None) is not step and len(layout_mod._LAYOUTS) == kept


def test_the_cache_is_bounded_and_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(layout_mod, "LAYOUT_CACHE_SIZE", 2)
    a = DocLayout.from_shape(1, 64, 64, "cpu", None)
    b = DocLayout.from_shape(1, 65, 65, "cpu", None)
    assert DocLayout.from_shape(1, 64, 64, "cpu", None) is a  # a is now the most recent
    DocLayout.from_shape(1, 66, 66, "cpu", None)  # evicts b, the least recently used
    assert len(layout_mod._LAYOUTS) == 2
    assert DocLayout.from_shape(1, 64, 64, "cpu", None) is a
    assert DocLayout.from_shape(1, 65, 65, "cpu", None) is not b
    monkeypatch.setattr(layout_mod, "LAYOUT_CACHE_SIZE", 0)
    off = DocLayout.from_shape(1, 64, 64, "cpu", None)
    assert off is not a and DocLayout.from_shape(1, 64, 64, "cpu", None) is not off
    assert off.tiles(16) is not off.tiles(16) and not off.kept


def test_bad_bounds_are_refused_before_anything_is_kept():
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        DocLayout.from_shape(1, 150, 150, "cpu", torch.tensor([0, 90, 80, 150]))
    assert not layout_mod._LAYOUTS


@pytest.mark.parametrize("share", [1, 4])
def test_reused_tables_give_the_results_of_fresh_ones(share, monkeypatch):
    """Three fwd+bwd calls of one varlen shape (the interpreter on CPU, compiled on a GPU): the second and third reuse
    the first's layout and tables. Every output and gradient equals a call with the reuse off (to the bit; on a GPU
    dk/dv add by atomics, so to their rounding), and the kept tables still equal what they were when built (no call
    wrote into them)."""
    q, k, v = make_qkv(1, 150, 150, 4, 2, 16, seed=3, device=DEVICE)
    kwargs = dict(SMALL, cu_seqlens=torch.tensor(CU, dtype=torch.int32), share_tokens=share)
    tol = dict(atol=1e-5, rtol=1e-5) if CUDA else dict(atol=0, rtol=0)

    def run():
        out = infllmv2_attn(q, k, v, backend="triton", **kwargs)
        return (out, *grads(out, (q, k, v)))

    monkeypatch.setattr(layout_mod, "LAYOUT_CACHE_SIZE", 0)
    fresh = run()
    monkeypatch.setattr(layout_mod, "LAYOUT_CACHE_SIZE", 8)
    first = run()
    (kept,) = layout_mod._LAYOUTS.values()
    built = _snapshot(kept.kept)
    assert len(built) >= 6  # tiles, row lists, per-document tables, windows, global blocks, key tiles
    for _ in range(2):
        again = run()
        assert len(layout_mod._LAYOUTS) == 1 and next(iter(layout_mod._LAYOUTS.values())) is kept
        torch.testing.assert_close(again[0], fresh[0], atol=0, rtol=0)  # the forward has no atomics
        for got, want in zip(again[1:], fresh[1:]):
            torch.testing.assert_close(got, want, **tol)
    for got, want in zip(first, fresh):
        torch.testing.assert_close(got, want, **tol)
    assert kept.kept.keys() == built.keys()
    assert all(_same(kept.kept[key], built[key]) for key in built), "a call wrote into a kept table"


def _runs_by_hand(starts, ends, max_rows):
    runs, first = [], 0
    while first < len(starts):
        last = first
        while last + 1 < len(starts) and ends[last + 1] - starts[first] <= max_rows:
            last += 1
        runs.append((first, last + 1, starts[first], ends[last]))
        first = last + 1
    return runs


@pytest.mark.parametrize("max_rows", [1, 8, 13, 40, 10**6])
def test_tile_runs_hold_at_most_the_row_budget(max_rows):
    """The scoring's row chunks: consecutive tiles, as many as fit in max_rows rows (one at least), every tile once."""
    layout = DocLayout.from_shape(1, 150, 150, "cpu", torch.tensor(CU))
    row0, nrows, _ = layout.tiles(8, 32, on_device=False)
    starts, ends = row0.tolist(), (row0 + nrows).tolist()
    runs = layout.tile_runs(8, 32, max_rows)
    assert list(runs) == _runs_by_hand(starts, ends, max_rows)
    assert [r[0] for r in runs] == [0] + [r[1] for r in runs[:-1]] and runs[-1][1] == len(starts)
    assert all(hi - lo <= max_rows or end == first + 1 for first, end, lo, hi in runs)


def test_scoring_in_chunks_selects_as_in_one_go():
    """A score budget of a few rows cuts the sparse rows into many chunks: the same block lists as one chunk."""
    from salatrain_kernels.infllm_v2.interface import select_blocks
    from salatrain_kernels.infllm_v2.params import SparseParams
    from salatrain_kernels.infllm_v2.score import BlockScorer

    q, k, _ = make_qkv(1, 150, 150, 4, 2, 16, seed=5, device=DEVICE)
    params = SparseParams(**SMALL)
    layout = DocLayout.build(q, k, torch.tensor(CU))
    q3, k3 = q.detach().view(150, 4, 16), k.detach().view(150, 2, 16)
    whole = select_blocks(q3, k3, layout, params, 0.25)
    per_row = 4 * 2 * layout.max_blocks(16) * 2
    tile = BlockScorer(q3, k3, layout, params, 0.25).rows_per_tile
    assert len(layout.tile_runs(tile, 32, tile)) >= 2  # chunks of one tile each
    chunked = select_blocks(q3, k3, layout, params, 0.25, score_budget_bytes=3 * per_row)
    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)
