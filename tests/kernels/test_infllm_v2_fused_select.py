"""InfLLM-V2's fused selection (FUSED_SELECT, opt-in: the scoring kernel keeps each query's best blocks as it
scores, no score buffer) against the selection kernel over written scores, which test_infllm_v2.py checks against
the PyTorch reference: the block lists must be equal, element for element, on every rule, with ties, documents,
dense rows, chunked prefill and K up to and past the number of blocks. On CPU the kernels run in the interpreter (fp32); on a GPU the
same cases run compiled, plus SALA's shape in bf16.
"""
import pytest
import torch

from salatrain_kernels import utils
from salatrain_kernels.infllm_v2 import interface
from salatrain_kernels.infllm_v2.layout import DocLayout
from salatrain_kernels.infllm_v2.params import SparseParams
from salatrain_kernels.infllm_v2.score import infllmv2_block_scores
from salatrain_kernels.infllm_v2.selection import fused_select_ok
from tests.kernels.test_infllm_v2 import SMALL, make_qkv

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(utils, "POISON", True)


def repeat_key_blocks(k, block_size, every=3):
    """Copy key block 1 over every `every`-th block from 2 on: equal compressed keys inside them, so equal block
    scores (ties the selection breaks by the lower block index)."""
    k = k.detach().clone()
    for b in range(2, k.shape[1] // block_size, every):
        k[:, b * block_size:(b + 1) * block_size] = k[:, block_size:2 * block_size]
    return k


def both_lists(q, k, cu=None, **settings):
    """(lists through the selection kernel, fused lists, params) of infllmv2_attn's selection step."""
    params = SparseParams(**settings)
    batch, _, heads, dim = q.shape
    layout = DocLayout.build(q, k, cu)
    q3, k3 = q.detach().reshape(-1, heads, dim), k.detach().reshape(-1, k.shape[2], dim)
    k_slots = min(params.num_selected, layout.max_blocks(params.block_size))
    assert fused_select_ok(params, k_slots, layout.max_blocks(params.block_size))
    out, default = [], interface.FUSED_SELECT
    try:
        for fused in (False, True):
            interface.FUSED_SELECT = fused
            out.append(interface.select_blocks(q3, k3, layout, params, dim**-0.5))
    finally:
        interface.FUSED_SELECT = default
    return out[0], out[1], params


CASES = {
    "g2": dict(shape=(1, 150, 150, 4, 2, 16)),
    "g16_two_batches": dict(shape=(2, 130, 130, 16, 1, 16), topk=5),
    "g3_documents": dict(shape=(1, 170, 170, 3, 1, 16), cu=[0, 50, 61, 170]),
    "chunked_prefill": dict(shape=(2, 40, 130, 4, 2, 16), dense_len=0),
    "decode": dict(shape=(2, 1, 140, 4, 1, 16), dense_len=0),
    "k_covers_every_block": dict(shape=(1, 200, 200, 2, 1, 16), topk=40, dense_len=0),
    "three_windows_per_block": dict(shape=(1, 220, 220, 2, 1, 16), kernel_size=12, init_blocks=2, topk=4,
                                    window_size=40, dense_len=20),
    "long_lists": dict(shape=(1, 320, 320, 4, 1, 16), topk=14, window_size=32, dense_len=0),
}


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("rules", [("position", "token"), ("sequence", "block")], ids=["ours", "released"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_selection_equals_the_selection_kernel(case, rules, ties):
    c = dict(CASES[case])
    cu = c.pop("cu", None)
    q, k, _ = make_qkv(*c.pop("shape"), seed=len(case), device=DEV)
    settings = dict(SMALL, dense_len_mode=rules[0], local_blocks=rules[1], **c)
    if ties:  # windows inside their block (kernel = stride): a copied block scores exactly as its original
        k = repeat_key_blocks(k, settings["block_size"])
        if "kernel_size" not in c:
            settings["kernel_size"] = settings["kernel_stride"]
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    plain, fused, params = both_lists(q, k, cu, **settings)
    assert (plain >= 0).any(), "no sparse row selected anything: the case tests nothing"
    assert torch.equal(fused, plain)


def test_the_cases_have_ties_at_the_cut():
    """The tie cases do what they are for: with topk chosen so that the cut falls inside a group of equal scores,
    the last query keeps some of the tied blocks and leaves others out, so a fused list that broke ties by the
    higher index, or not at all, would differ."""
    q, k, _ = make_qkv(1, 400, 400, 4, 1, 16, seed=3, device=DEV)
    k = repeat_key_blocks(k, 16)
    scores = infllmv2_block_scores(q.detach(), k, backend="triton", block_size=16, kernel_size=4, kernel_stride=4)
    free = scores[0, 0, 399, 1:24]  # t = 399: blocks 0..24; block 0 and the window (block 24) are forced
    tied = free[1]  # block 2, a copy of block 1
    assert (free == tied).sum() >= 3
    topk = int((free > tied).sum()) + 3  # K = topk + 1 slots, 2 forced: two of the tied blocks make the cut
    plain, fused, _ = both_lists(q, k, **dict(SMALL, kernel_size=4, topk=topk, window_size=16, dense_len=0))
    chosen = set(plain[0, 399].tolist())
    tied_blocks = [b + 1 for b in (free == tied).nonzero().flatten().tolist()]
    assert [b in chosen for b in tied_blocks] == [True, True] + [False] * (len(tied_blocks) - 2)
    assert torch.equal(fused, plain)


def test_forced_blocks_past_k_fall_back_to_the_selection_kernel():
    """topk 2 with 3 init blocks: the forced blocks may not fit the K slots, where the lowest indices win; the fused
    form does not model that and is not used (the op's result is checked against the reference elsewhere)."""
    params = SparseParams(**dict(SMALL, topk=2, init_blocks=3))
    assert not fused_select_ok(params, params.num_selected, 40)
    assert fused_select_ok(params, 40, 40)  # K covering every block: everything fits


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads", [(32, 2), (9, 3)], ids=["sala_g16", "smollm2_g3"])
def test_gpu_fused_selection_at_sala_settings(heads):
    """bf16 at 16K with SALA's sparse settings (K = 64 + 32 slots) and the autotuned launch: equal lists."""
    q, k, _ = make_qkv(1, 16384, 16384, heads[0], heads[1], 128 if heads[0] == 32 else 64, dtype=torch.bfloat16,
                       device="cuda")
    sala = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, topk=64, window_size=2048,
                dense_len=8192)
    plain, fused, _ = both_lists(q, k, **sala)
    assert torch.equal(fused, plain)
