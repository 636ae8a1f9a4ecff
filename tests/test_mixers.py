"""The mixers' PyTorch references (salatrain_kernels' naive.py of each op: what backend "torch" runs, what the
model runs without the kernels and what it exports) against independent oracles (tests/helpers/naive.py), and
the model's mixer layers."""

import pytest
import torch

from salatrain.models import SalaHybridConfig
from salatrain.models.modeling_sala_hybrid import FullAttention, SeqInfo, SparseAttention
from salatrain_kernels.infllm_v2.naive import infllmv2_attn_torch, infllmv2_decode_torch
from salatrain_kernels.infllm_v2.stages_torch import (
    infllmv2_block_attn_torch,
    infllmv2_block_scores_torch,
    infllmv2_select_torch,
)
from salatrain_kernels.lightning.naive import lightning_attn_torch, lightning_step
from tests.helpers.naive import infllmv2_block_attn_naive, infllmv2_naive, lightning_naive

SMALL_SPARSE = dict(block_size=8, kernel_size=4, kernel_stride=2, init_blocks=1, topk=2, window_size=8)


def _qkv(b, t, h, d, hkv=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hkv = hkv or h
    return (torch.randn(b, t, h, d, generator=g, dtype=dtype), torch.randn(b, t, hkv, d, generator=g, dtype=dtype),
            torch.randn(b, t, hkv, d, generator=g, dtype=dtype))


def _decay(h):
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], dtype=torch.float64)


@pytest.mark.parametrize("t", [1, 63, 64, 100, 130])
def test_lightning_chunked_equals_recurrent_and_quadratic(t):
    q, k, v = _qkv(2, t, 3, 16)
    s = _decay(3)
    ref = lightning_naive(q, k, v, s, scale=16**-0.5)[0]
    chunked, state = lightning_attn_torch(q, k, v, s, output_final_state=True)
    recurrent, rstate = lightning_step(q, k, v, s, torch.zeros(2, 3, 16, 16, dtype=torch.float64))
    assert torch.allclose(chunked, ref, atol=1e-10)
    assert torch.allclose(recurrent, ref, atol=1e-10)
    assert torch.allclose(state, rstate, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_lightning_one_token_steps_equal_the_recurrence(dtype):
    """lightning_step's one-token form (decoding) chained over 6 tokens from a non-zero state gives the loop's
    outputs and state (fp32 state for low-precision inputs, as the loop keeps it)."""
    q, k, v = (x.to(dtype) for x in _qkv(2, 6, 3, 16))
    s = _decay(3)
    start = torch.randn(2, 3, 16, 16, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    looped, looped_state = lightning_step(q, k, v, s, start)
    state, outs = start, []
    for i in range(6):
        o, state = lightning_step(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], s, state)
        outs.append(o)
    assert state.dtype == looped_state.dtype and torch.cat(outs, 1).dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(state, looped_state, atol=tol, rtol=tol)
    torch.testing.assert_close(torch.cat(outs, 1).float(), looped.float(), atol=1e-2 if dtype != torch.float64 else tol,
                               rtol=0)


def test_lightning_initial_state_continues_the_sequence():
    q, k, v = _qkv(1, 150, 2, 8)
    s = _decay(2)
    full, full_state = lightning_attn_torch(q, k, v, s, output_final_state=True)
    a, st = lightning_attn_torch(q[:, :70], k[:, :70], v[:, :70], s, output_final_state=True)
    b, st2 = lightning_attn_torch(q[:, 70:], k[:, 70:], v[:, 70:], s, initial_state=st, output_final_state=True)
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-10)
    assert torch.allclose(st2, full_state, atol=1e-10)


def test_lightning_packed_documents_do_not_mix():
    lens = [37, 64, 90]
    q, k, v = _qkv(1, sum(lens), 2, 8)
    s = _decay(2)
    cu = torch.tensor([0, 37, 101, 191], dtype=torch.int32)
    packed, states = lightning_attn_torch(q, k, v, s, cu_seqlens=cu, output_final_state=True)
    assert states.shape == (3, 2, 8, 8)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = lightning_naive(q[:, a:b], k[:, a:b], v[:, a:b], s, scale=8**-0.5)[0]
        assert torch.allclose(packed[:, a:b], ref, atol=1e-10)


def test_sparse_equals_dense_causal_when_every_block_is_visible():
    q, k, v = _qkv(2, 40, 6, 8, hkv=2)  # 5 blocks of 8 <= topk + window/block = 3 ... use a large topk
    params = dict(SMALL_SPARSE, topk=8, dense_len=0)
    out = infllmv2_attn_torch(q, k, v, **params)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(3, 2).transpose(1, 2), v.repeat_interleave(3, 2).transpose(1, 2),
        is_causal=True).transpose(1, 2)
    assert torch.allclose(out, dense, atol=1e-10)


@pytest.mark.parametrize("hq,hkv,t,dense_len", [(4, 2, 61, 20), (3, 1, 77, 33), (4, 4, 50, 0)])
def test_sparse_equals_naive_rule(hq, hkv, t, dense_len):
    q, k, v = _qkv(1, t, hq, 8, hkv=hkv, seed=hq * t)
    params = dict(SMALL_SPARSE, dense_len=dense_len)
    out = infllmv2_attn_torch(q, k, v, **params)
    ref = infllmv2_naive(q[0], k[0], v[0], **params)
    assert torch.allclose(out[0], ref, atol=1e-10)


@pytest.mark.parametrize("budget", [1, 7 * 77 * 4])
def test_sparse_row_chunks_equal_one_pass(monkeypatch, budget):
    """The reference processes query rows in chunks to bound memory; chunking changes nothing, fwd or bwd."""
    import salatrain_kernels.infllm_v2.naive as sa

    q, k, v = (x.requires_grad_() for x in _qkv(1, 77, 4, 8, hkv=2, seed=5))
    params = dict(SMALL_SPARSE, dense_len=33)
    whole = infllmv2_attn_torch(q, k, v, **params)
    grads = torch.autograd.grad(whole.square().sum(), (q, k, v))
    monkeypatch.setattr(sa, "ROW_BUDGET", budget)  # 1 → one row per step; else chunks straddle dense_len
    parts = infllmv2_attn_torch(q, k, v, **params)
    assert torch.allclose(parts, whole, atol=1e-12)
    for a, b in zip(torch.autograd.grad(parts.square().sum(), (q, k, v)), grads):
        assert torch.allclose(a, b, atol=1e-12)
    assert torch.allclose(parts[0], infllmv2_naive(q[0].detach(), k[0].detach(), v[0].detach(), **params),
                          atol=1e-10)


def test_sparse_really_drops_blocks():
    """At T past dense_len with a small budget the output differs from dense attention."""
    q, k, v = _qkv(1, 80, 2, 8, hkv=1)
    sparse = infllmv2_attn_torch(q, k, v, **SMALL_SPARSE, dense_len=16)
    dense = infllmv2_attn_torch(q, k, v, **SMALL_SPARSE, dense_len=10_000)
    assert torch.allclose(sparse[:, :16], dense[:, :16], atol=1e-12)
    assert (sparse[:, 40:] - dense[:, 40:]).abs().max() > 1e-3


def test_sparse_decode_queries_equal_prefill():
    """The last Tq queries against all keys give the same rows as a full prefill (per-position dense_len)."""
    q, k, v = _qkv(1, 70, 4, 8, hkv=2)
    params = dict(SMALL_SPARSE, dense_len=30)
    full = infllmv2_attn_torch(q, k, v, **params)
    for tq in (1, 5, 45):
        tail = infllmv2_attn_torch(q[:, -tq:], k, v, **params)
        assert torch.allclose(tail, full[:, -tq:], atol=1e-12)


DECODE_CASES = [  # (keys, dense_len, rule, local rule, normalizer, kernel, stride): dense by the rule, every block
    (5, 0, "position", "token", "exact", 4, 2),  # visible, fewer keys than a window, the sparse path at several
    (33, 0, "position", "token", "exact", 4, 2),  # lengths (block boundaries, a window straddling two blocks), both
    (40, 0, "position", "block", "exact", 4, 2),  # forms of both rules, the coarse normaliser, a stride that does
    (25, 30, "position", "token", "exact", 4, 2),  # not divide the block
    (31, 30, "position", "token", "exact", 4, 2),
    (57, 40, "sequence", "token", "exact", 4, 2),
    (57, 58, "sequence", "token", "exact", 4, 2),
    (64, 0, "position", "block", "coarse", 4, 2),
    (90, 0, "sequence", "block", "exact", 6, 4),
    (97, 12, "position", "token", "coarse", 6, 4),
    (70, 0, "position", "token", "exact", 4, 2, dict(topk=1, init_blocks=2)),  # forced blocks outnumber places
    (70, 0, "position", "block", "exact", 4, 2, dict(topk=0)),
]


@pytest.mark.parametrize("tk,dense_len,mode,local,normalizer,kernel,stride,other", [
    case if len(case) == 8 else (*case, {}) for case in DECODE_CASES])
def test_sparse_decode_step_equals_the_full_op_and_the_oracle(tk, dense_len, mode, local, normalizer, kernel, stride,
                                                              other):
    """infllmv2_decode_torch (one query after tk − 1 cached keys) gives the full op's output for that query, and the
    independent oracle's; GQA groups of 3, batch of 2 rows with different keys."""
    q, k, v = _qkv(2, tk, 6, 8, hkv=2, seed=tk)
    params = dict(SMALL_SPARSE, kernel_size=kernel, kernel_stride=stride, dense_len=dense_len, normalizer=normalizer,
                  dense_len_mode=mode, local_blocks=local, **other)
    step = infllmv2_decode_torch(q[:, -1:], k, v, **params)
    full = infllmv2_attn_torch(q[:, -1:], k, v, **params)
    assert step.shape == full.shape == (2, 1, 6, 8)
    assert torch.allclose(step, full, atol=1e-12)
    for b in range(2):
        oracle = infllmv2_naive(q[b, -1:], k[b], v[b], **params)
        assert torch.allclose(step[b], oracle, atol=1e-10)


def test_sparse_decode_step_reads_nothing_back_from_the_device():
    """The decoding step runs on meta tensors, which hold no values: any host read of a device value (.item(),
    .tolist(), bool(tensor), int(tensor) — a synchronisation on a GPU) would raise. The full op reads back."""
    params = dict(SMALL_SPARSE, dense_len=0)
    q, k, v = (torch.empty(2, n, h, 8, device="meta") for n, h in ((1, 6), (97, 2), (97, 2)))
    out = infllmv2_decode_torch(q, k, v, **params)
    assert out.shape == (2, 1, 6, 8) and out.device.type == "meta"
    with pytest.raises((RuntimeError, NotImplementedError)):
        infllmv2_attn_torch(q, k, v, **params)


def test_sparse_layer_decodes_through_the_step(monkeypatch):
    """The model's sparse layer sends a one-token step to infllmv2_decode_torch (backend auto or torch) and gets
    the full op's output."""
    from salatrain.models import modeling_sala_hybrid as modeling

    calls = []
    real = modeling.infllmv2_decode_torch
    monkeypatch.setattr(modeling, "infllmv2_decode_torch", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = SalaHybridConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, mixer_types=["sparse_attention"],
                           sparse_config=dict(SMALL_SPARSE, dense_len=16))
    layer = SparseAttention(cfg, 0).double()
    q, k, v = _qkv(1, 60, 4, 8, hkv=2)
    step = SeqInfo(torch.tensor([[59]]), past_len=59)
    got = layer.attend(q[:, -1:], k, v, step)
    want = infllmv2_attn_torch(q[:, -1:], k, v, **layer.sparse_params)
    assert calls == [1] and torch.allclose(got, want, atol=1e-12)


def test_sparse_layer_decode_with_step_keeps_the_kernels_for_prefill(monkeypatch):
    """decode_with_step (the default) sends a one-token step to infllmv2_decode_torch where the Triton op would
    run (backend 'triton': the interpreter on CPU, compiled on a GPU), with the reference's output, and leaves a
    prefill on the op; turned off, the step goes to the op."""
    from salatrain.models import modeling_sala_hybrid as modeling

    calls = []
    real = modeling._kernels.infllmv2_attn
    monkeypatch.setattr(modeling, "_checked", {})
    monkeypatch.setattr(modeling._kernels, "self_test", lambda what, **kw: None)
    counted = lambda *a, **kw: calls.append(a[0].shape[1]) or real(*a, **kw)  # noqa: E731
    monkeypatch.setattr(modeling._kernels, "infllmv2_attn", counted)
    cfg = SalaHybridConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, mixer_types=["sparse_attention"],
                           sparse_config=dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, topk=2,
                                              window_size=16, dense_len=64))  # a geometry the kernels take
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = SparseAttention(cfg, 0).to(device)
    layer.kernel_backend = "triton"
    q, k, v = (x.float().to(device) for x in _qkv(1, 120, 4, 8, hkv=2))
    step = SeqInfo(torch.tensor([[119]], device=device), past_len=119)
    want = infllmv2_attn_torch(q[:, -1:], k, v, **layer.sparse_params)
    if device == "cpu" and not modeling._interpreting():
        pytest.skip("the Triton interpreter is off")
    assert layer.decode_with_step
    layer.decode_with_step = False
    layer.attend(q[:, -1:], k, v, step)
    assert calls == [1]
    layer.decode_with_step = True
    got = layer.attend(q[:, -1:], k, v, step)
    assert calls == [1] and torch.allclose(got, want, atol=1e-5)
    layer.attend(q, k, v, SeqInfo(torch.arange(120, device=device)[None]))
    assert calls == [1, 120]


@pytest.mark.parametrize("block,kernel,stride", [(8, 4, 2), (8, 8, 4), (16, 8, 4), (64, 32, 16), (16, 20, 4), (8, 6, 4),
                                                  (8, 4, 8), (12, 8, 4), (8, 6, 3)])
@pytest.mark.parametrize("num_windows", [0, 1, 7, 40])
def test_block_scores_are_the_max_over_overlapping_windows(block, kernel, stride, num_windows):
    """block_scores_from_windows (one max pool where the stride divides the block, a loop over offsets where it
    does not) against its definition: block i's score is the max over the windows [j·stride, j·stride + kernel)
    that overlap it, −inf where none does; blocks past the windows and windows past the blocks included."""
    from salatrain_kernels.infllm_v2.naive import block_scores_from_windows

    win = torch.randn(2, 3, 5, num_windows, dtype=torch.float64)
    win[0, 0, 0, : num_windows // 2] = float("-inf")  # windows not yet ended
    for num_blocks in (1, 4, (num_windows * stride + kernel) // block + 2):
        got = block_scores_from_windows(win, num_blocks, block, kernel, stride)
        want = torch.full((2, 3, 5, num_blocks), float("-inf"), dtype=torch.float64)
        for i in range(num_blocks):
            over = [j for j in range(num_windows) if j * stride < (i + 1) * block and j * stride + kernel > i * block]
            if over:
                want[..., i] = win[..., over].amax(-1)
        assert torch.equal(got, want), (num_blocks, got, want)


def test_sparse_packed_documents_restart():
    lens = [30, 45]
    q, k, v = _qkv(1, 75, 2, 8, hkv=1)
    params = dict(SMALL_SPARSE, dense_len=12)
    cu = torch.tensor([0, 30, 75], dtype=torch.int32)
    packed = infllmv2_attn_torch(q, k, v, cu_seqlens=cu, **params)
    for a, b in zip((0, 30), (30, 75)):
        ref = infllmv2_naive(q[0, a:b], k[0, a:b], v[0, a:b], **params)
        assert torch.allclose(packed[0, a:b], ref, atol=1e-10)
    assert sum(lens) == 75


def test_sparse_coarse_normaliser_runs_and_differs_only_in_selection():
    q, k, v = _qkv(1, 90, 2, 8, hkv=1)
    exact = infllmv2_attn_torch(q, k, v, **SMALL_SPARSE, dense_len=0, normalizer="exact")
    coarse = infllmv2_attn_torch(q, k, v, **SMALL_SPARSE, dense_len=0, normalizer="coarse")
    assert exact.shape == coarse.shape and torch.isfinite(coarse).all()
    with pytest.raises(ValueError, match="normalizer"):
        infllmv2_attn_torch(q, k, v, **SMALL_SPARSE, dense_len=0, normalizer="bogus")


def test_sparse_layer_after_conversion_equals_dense_layer_without_rope():
    """Right after conversion (gate identity, NoPE) a sparse layer = the dense layer with RoPE removed."""
    from salatrain.convert.transfer import transfer_attention

    cfg = SalaHybridConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, mixer_types=["sparse_attention"],
                           sparse_config=dict(SMALL_SPARSE, topk=16, dense_len=0))
    torch.manual_seed(0)
    dense = FullAttention(cfg, 0).double()
    sparse = SparseAttention(cfg, 0).double()
    state = {k: v for k, v in dense.state_dict().items()}
    sparse.load_state_dict(transfer_attention("sparse_attention", state, cfg))
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    seq = SeqInfo(torch.arange(20).view(1, -1).expand(2, -1))
    no_rope = (torch.ones(2, 20, 8, dtype=torch.float64), torch.zeros(2, 20, 8, dtype=torch.float64))
    with torch.no_grad():
        assert torch.allclose(sparse(x, no_rope, seq, None), dense(x, no_rope, seq, None), atol=1e-12)


@pytest.mark.parametrize("normalizer", ["exact", "coarse"])
def test_reference_stages_compose_to_the_full_op(normalizer):
    """Block scores -> selection -> attention over the listed blocks (the three stage references the Triton
    stages are tested against) give the full op, padded and packed."""
    q, k, v = _qkv(1, 150, 6, 16, hkv=2, dtype=torch.float32, seed=11)
    scoring = dict(block_size=16, kernel_size=8, kernel_stride=4, normalizer=normalizer)
    selection = dict(block_size=16, init_blocks=1, topk=2, window_size=16)
    for cu in (None, torch.tensor([0, 60, 150], dtype=torch.int32)):
        scores = infllmv2_block_scores_torch(q, k, cu_seqlens=cu, **scoring)
        idx = infllmv2_select_torch(scores, cu_seqlens=cu, **selection)
        staged = infllmv2_block_attn_torch(q, k, v, idx, block_size=16, dense_len=40, cu_seqlens=cu)
        full = infllmv2_attn_torch(q, k, v, cu_seqlens=cu, dense_len=40, **{**scoring, **selection})
        assert torch.allclose(staged, full, atol=1e-6)


def test_reference_block_attention_equals_oracle_on_any_lists():
    """Stage (c) on lists in any order with holes, out-of-range ids and empty lists (rows that give 0)."""
    q, k, v = _qkv(2, 37, 4, 8, hkv=2, seed=3)
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(-1, 6, (2, 2, 37, 4), generator=g, dtype=torch.int32)
    idx[:, :, ::5] = -1
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = infllmv2_block_attn_torch(q, k, v, idx, block_size=8, dense_len=9)
    ref = infllmv2_block_attn_naive(q, k, v, idx, block_size=8, dense_len=9, upcast=False)  # softmax in fp32
    assert torch.allclose(out, ref, atol=1e-6)
    assert (out[:, 10::5] == 0).all() and (out[:, :10:5] != 0).all()  # empty lists: 0 past dense_len, else dense
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        assert torch.allclose(a, b, atol=1e-6)


def test_sparse_layer_asks_the_kernels_which_block_geometries_they_take():
    """The geometry rule lives in salatrain_kernels; a sparse layer records its verdict (on CUDA the layer runs
    the PyTorch reference for geometries the kernels do not take)."""
    from salatrain_kernels.infllm_v2 import triton_geometry_problem

    assert triton_geometry_problem(64, 32, 16) is None and triton_geometry_problem(16, 8, 4) is None
    for bad in ((24, 12, 6), (8, 4, 2), (64, 40, 16), (64, 96, 16), (64, 32, 24), (48, 16, 16)):
        assert "power-of-two block_size" in triton_geometry_problem(*bad), bad
    for sparse, verdict in ((dict(block_size=24, kernel_size=12, kernel_stride=6), triton_geometry_problem(24, 12, 6)),
                            ({}, None)):
        cfg = SalaHybridConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, mixer_types=["sparse_attention"],
                               sparse_config=sparse)
        assert SparseAttention(cfg, 0).triton_misfit == verdict


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_sparse_layer_with_a_geometry_the_kernels_do_not_take_runs_the_reference(caplog):
    cfg = SalaHybridConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           mixer_types=["sparse_attention"],
                           sparse_config=dict(block_size=24, kernel_size=12, kernel_stride=6, init_blocks=1, topk=2,
                                              window_size=24, dense_len=30))
    layer = SparseAttention(cfg, 0).cuda()
    x = torch.randn(1, 100, 64, device="cuda")
    seq = SeqInfo(torch.arange(100, device="cuda").view(1, -1))
    with caplog.at_level("WARNING"):
        out = layer(x, None, seq, None)
    assert "PyTorch reference" in caplog.text
    ref = layer.cpu()(x.cpu(), None, SeqInfo(seq.positions.cpu()), None)
    assert torch.allclose(out.cpu(), ref, atol=1e-5)
    layer.cuda().kernel_backend = "triton"
    with pytest.raises(ValueError, match="power-of-two block_size"):
        layer(x, None, seq, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("hkv,window", [(3, None), (9, None), (3, 37)])
def test_cuda_packed_documents_through_varlen_flash_equal_one_call_per_document(hkv, window):
    from salatrain.models.modeling_sala_hybrid import _sdpa, softmax_attention

    lens = [1, 130, 77, 600, 64]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (x.cuda().to(torch.bfloat16) for x in _qkv(1, sum(lens), 9, 64, hkv=hkv, dtype=torch.float32))
    pos = torch.cat([torch.arange(n) for n in lens]).view(1, -1).cuda()
    out = softmax_attention(q, k, v, SeqInfo(pos, 0, cu), window, scale=0.125)
    b = cu.tolist()
    ref = torch.cat([_sdpa(q[:, s:e].float(), k[:, s:e].float(), v[:, s:e].float(), None, window, 0.125)
                     for s, e in zip(b[:-1], b[1:])], dim=1)
    assert (out.float() - ref).abs().max() < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_fused_elementwise_equals_eager():
    from salatrain.models import SalaHybridForCausalLM
    from salatrain.models.modeling_sala_hybrid import set_fused_elementwise

    torch.manual_seed(0)
    cfg = SalaHybridConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                           mixer_types=["full_attention", "linear_attention", "sparse_attention"],
                           sparse_config=dict(SMALL_SPARSE, block_size=16, kernel_size=16, kernel_stride=8,
                                              window_size=16, dense_len=64))
    model = SalaHybridForCausalLM(cfg).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 200), device="cuda")
    results = []
    for fused in (False, True):
        set_fused_elementwise(fused)
        try:
            model.zero_grad()
            out = model(ids, labels=ids, use_cache=False)
            out.loss.backward()
            results.append((out.logits.float(), {n: p.grad.float() for n, p in model.named_parameters()}))
        finally:
            set_fused_elementwise(False)
    (a, ga), (b, gb) = results
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
    for n in ga:
        assert (ga[n] - gb[n]).norm() <= 0.05 * ga[n].norm() + 1e-6, n


def test_share_tokens_is_a_launch_setting_of_the_sparse_layer(tmp_path):
    """sparse_config share_tokens travels in config.json, reaches the layer as a launch setting (not a selection
    parameter: the PyTorch reference never sees it) and takes exactly the kernels' values."""
    from salatrain_kernels.infllm_v2.shared import SHARE_VALUES

    from salatrain.models.configuration_sala_hybrid import SHARE_TOKENS, sparse_config_problem, SPARSE_DEFAULTS

    assert SHARE_TOKENS == SHARE_VALUES
    cfg = SalaHybridConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, mixer_types=["sparse_attention"],
                           sparse_config={"share_tokens": 4})
    cfg.save_pretrained(tmp_path)
    layer = SparseAttention(SalaHybridConfig.from_pretrained(tmp_path), 0)
    assert layer.share_tokens == 4 and "share_tokens" not in layer.sparse_params
    for bad in (3, 0, 32, True):
        assert "share_tokens must be one of" in sparse_config_problem({**SPARSE_DEFAULTS, "share_tokens": bad})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_sparse_layer_with_shared_blocks_equals_unshared():
    torch.manual_seed(0)
    sparse = dict(block_size=16, kernel_size=16, kernel_stride=8, init_blocks=1, topk=4, window_size=32, dense_len=64)
    outs = []
    for share in (1, 4):
        cfg = SalaHybridConfig(vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=16, num_key_value_heads=1, head_dim=16,
                               mixer_types=["sparse_attention"], sparse_config={**sparse, "share_tokens": share})
        torch.manual_seed(0)
        layer = SparseAttention(cfg, 0).cuda()
        layer.kernel_backend = "triton"
        x = torch.randn(1, 700, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        outs.append(layer(x, None, SeqInfo(torch.arange(700, device="cuda").view(1, -1)), None))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def _on_the_kernel_path(monkeypatch, *names):
    """The device for a test of the model's kernel path (the interpreter on CPU; skipped without it), with the
    start-up self-tests skipped and the fused kernels ``names`` recording each call's first argument's shape."""
    from salatrain.models import modeling_sala_hybrid as modeling

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not modeling._interpreting():
        pytest.skip("the Triton interpreter is off")
    fused, calls = modeling._fused_ops(), []
    for name in names:
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _real=real, _n=name, **kw: calls.append((_n, a[0].shape))
                            or _real(*a, **kw))
    monkeypatch.setattr(modeling, "_checked", {})
    monkeypatch.setattr(modeling._kernels, "self_test", lambda what, **kw: None)
    return device, calls


def test_lightning_decoding_runs_the_fused_kernels_and_matches_the_reference(monkeypatch):
    """Where the kernels run (backend 'triton': the interpreter on CPU, compiled on a GPU), a Lightning layer's
    decoding step goes through the fused q/k-norm + RoPE and norm + gate kernels (one launch each for ~24 and ~8
    torch ops), and prefill + one cached step give the next-token logits of the PyTorch reference's full
    forward."""
    from salatrain.models import SalaHybridForCausalLM

    device, seen = _on_the_kernel_path(monkeypatch, "qk_norm_rope", "out_norm_gate")
    torch.manual_seed(0)
    cfg = SalaHybridConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           mixer_types=["linear_attention", "linear_attention"])
    model = SalaHybridForCausalLM(cfg).to(device).eval()
    ids = torch.randint(0, 64, (1, 40), device=device)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits[:, -1]
        model.set_kernel_backend("triton")
        first = model(ids[:, :-1], use_cache=True)
        seen.clear()
        got = model(ids[:, -1:], past_key_values=first.past_key_values, use_cache=True).logits[:, -1]
    assert sorted((name, shape[1]) for name, shape in seen) == [("out_norm_gate", 1)] * 2 + [("qk_norm_rope", 1)] * 2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_model_norms_run_the_fused_kernel_in_eval_without_gradients(monkeypatch):
    """The decoder's RMSNorms take the fused forward kernel where the kernels run (backend 'triton': the
    interpreter on CPU) in eval mode without gradients, with the reference's output; in training mode, or with
    gradients, the reference. set_kernel_backend reaches them."""
    from salatrain.models import SalaHybridForCausalLM

    device, calls = _on_the_kernel_path(monkeypatch, "rms_norm")
    torch.manual_seed(0)
    cfg = SalaHybridConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                           mixer_types=["full_attention", "full_attention"])
    model = SalaHybridForCausalLM(cfg).to(device).eval()
    ids = torch.randint(0, 64, (1, 20), device=device)
    with torch.no_grad():
        model.set_kernel_backend("torch")  # (on a GPU "auto" would already take the kernel)
        want = model(ids).logits
        model.set_kernel_backend("triton")
        got = model(ids).logits
    assert len(calls) == 5  # two norms per layer and the final one
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    calls.clear()
    model(ids).logits.sum().backward()  # gradients: the reference
    model.train()
    with torch.no_grad():
        model(ids)
    assert calls == []
