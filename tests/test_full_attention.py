"""`full_attention` layers (softmax attention with RoPE, GQA, sliding windows, padding) without a [T, Tk] mask:
queries go in row chunks whose masks cover [rows, rows + window − 1] keys. Results equal an independent
reference and the single-mask implementation this replaced, across cached decoding (Tq < Tk), left padding and
packed documents, and the largest temporary stays O(rows · (rows + window))."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from salatrain.models import modeling_sala_hybrid as mh
from salatrain.models.modeling_sala_hybrid import SeqInfo, softmax_attention
from tests.helpers.naive import softmax_attention_naive
from tests.test_checkpoint_roundtrip import tiny_hybrid


def _qkv(b, tq, tk, h, hkv, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, tq, h, d, generator=g, dtype=dtype), torch.randn(b, tk, hkv, d, generator=g, dtype=dtype),
            torch.randn(b, tk, hkv, d, generator=g, dtype=dtype))


def _sdpa_one_mask(q, k, v, left_pad, sliding_window, scale):
    """The implementation the chunked one replaced: one [T, Tk] boolean mask for the whole sequence."""
    t, tk, h, hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = {"enable_gqa": True} if hkv != h else {}
    qi = torch.arange(tk - t, tk).view(-1, 1)
    ki = torch.arange(tk).view(1, -1)
    mask = (ki <= qi).view(1, 1, t, tk)
    if sliding_window is not None:
        mask = mask & (ki > qi - sliding_window).view(1, 1, t, tk)
    if left_pad is not None:
        mask = mask & (ki.view(1, 1, 1, tk) >= left_pad.view(-1, 1, 1, 1))
        mask = mask | ~mask.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, **gqa).transpose(1, 2)


def _real_rows(out, tk, left_pad):
    """Query rows that sit after their row's padding (the only ones whose output is used)."""
    tq = out.shape[1]
    if left_pad is None:
        return torch.ones(out.shape[:2], dtype=torch.bool)
    return torch.arange(tk - tq, tk).view(1, -1) >= left_pad.view(-1, 1)


@pytest.mark.parametrize("budget", [64, 1 << 24])
@pytest.mark.parametrize("left_pad", [None, (0, 9)])
@pytest.mark.parametrize("window", [None, 7, 64])
@pytest.mark.parametrize("tq,tk", [(50, 50), (1, 50), (13, 50)])
@pytest.mark.parametrize("h,hkv", [(6, 2), (4, 1), (3, 3)])
def test_softmax_attention_equals_reference_and_the_one_mask_version(monkeypatch, budget, left_pad, window, tq, tk,
                                                                     h, hkv):
    monkeypatch.setattr(mh, "SDPA_MASK_ENTRIES", budget)
    q, k, v = _qkv(2, tq, tk, h, hkv, seed=tq + (window or 0))
    pad = None if left_pad is None else torch.tensor(left_pad)
    seq = SeqInfo(torch.arange(tk - tq, tk).view(1, -1).expand(2, -1), tk - tq, None, pad)
    out = softmax_attention(q, k, v, seq, window, scale=0.3)
    real = _real_rows(out, tk, pad)
    assert torch.isfinite(out).all()
    ref = softmax_attention_naive(q, k, v, 0.3, window, pad)
    before = _sdpa_one_mask(q, k, v, pad, window, 0.3)
    assert (out - ref)[real].abs().max() < 1e-10
    assert (out - before)[real].abs().max() < 1e-10


@pytest.mark.parametrize("left_pad", [None, (0, 5)])
def test_gradients_equal_the_one_mask_version(monkeypatch, left_pad):
    """Training through a sliding-window full layer: the chunks' gradients equal the single-mask version's."""
    monkeypatch.setattr(mh, "SDPA_MASK_ENTRIES", 64)
    pad = None if left_pad is None else torch.tensor(left_pad)
    grads = []
    for fn in (mh._sdpa, _sdpa_one_mask):
        q, k, v = (x.requires_grad_() for x in _qkv(2, 40, 40, 6, 2, seed=9))
        out = fn(q, k, v, pad, 7, 0.3)
        (out[_real_rows(out, 40, pad)] * torch.linspace(-1, 1, 8, dtype=out.dtype)).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-10


def test_packed_documents_with_a_window_equal_each_document_alone(monkeypatch):
    monkeypatch.setattr(mh, "SDPA_MASK_ENTRIES", 48)
    lens = [1, 30, 17, 45]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = _qkv(1, sum(lens), sum(lens), 4, 2, seed=3)
    pos = torch.cat([torch.arange(n) for n in lens]).view(1, -1)
    out = softmax_attention(q, k, v, SeqInfo(pos, 0, cu), 6, scale=0.25)
    b = cu.tolist()
    ref = torch.cat([softmax_attention_naive(q[:, s:e], k[:, s:e], v[:, s:e], 0.25, 6) for s, e in zip(b[:-1], b[1:])],
                    dim=1)
    assert (out - ref).abs().max() < 1e-10


def test_model_in_small_chunks_equals_one_chunk(monkeypatch):
    """The whole hybrid (a full layer with window 12): prefill, chunked prefill, decoding and a left-padded batch
    give the same logits whether the full layer attends in chunks of a few rows or in one call."""
    model = tiny_hybrid(seed=7).double()
    ids = torch.randint(1, 96, (2, 60), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 60, dtype=torch.long)
    mask[1, :11] = 0

    def run():
        with torch.no_grad():
            full = model(ids, use_cache=False).logits
            out = model(ids[:, :25], use_cache=True)
            cache, pieces = out["cache" if "cache" in out else "past_key_values"], [out.logits]
            for a, b in ((25, 40), (40, 41), (41, 60)):
                out = model(ids[:, a:b], cache=cache, use_cache=True)
                pieces.append(out.logits)
            padded = model(ids, attention_mask=mask, use_cache=False).logits
        return full, torch.cat(pieces, 1), padded

    one = run()
    monkeypatch.setattr(mh, "SDPA_MASK_ENTRIES", 40)
    chunked = run()
    assert (one[1] - one[0]).abs().max() < 1e-9  # cached decoding equals the full forward
    for a, b in zip(one[:2], chunked[:2]):
        assert (a - b).abs().max() < 1e-9
    real = mask.bool()
    assert (one[2] - chunked[2])[real].abs().max() < 1e-9


def _largest_allocation(fn) -> int:
    """Bytes of the largest single allocation any op makes while ``fn`` runs (CPU)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


def test_sliding_window_memory_is_rows_times_window_not_t_squared(monkeypatch):
    t, h, hkv, d, window = 4096, 2, 1, 8, 32
    monkeypatch.setattr(mh, "SDPA_MASK_ENTRIES", 1 << 16)
    q, k, v = _qkv(1, t, t, h, hkv, d, dtype=torch.float32)
    rows = mh._query_rows(t, t, window)
    assert rows * (rows + window - 1) <= mh.SDPA_MASK_ENTRIES
    chunked = _largest_allocation(lambda: mh._sdpa(q, k, v, None, window, 0.3))
    one_mask = _largest_allocation(lambda: _sdpa_one_mask(q, k, v, None, window, 0.3))
    tensors = t * h * d * 4  # the output (and q): the floor of any implementation
    scores = h * rows * (rows + window - 1) * 4  # one chunk's fp32 attention scores
    assert chunked <= max(tensors, scores), (chunked, tensors, scores)
    assert one_mask >= t * t  # a [T, T] mask or more
    assert chunked * 100 < one_mask


def test_chunk_sizes_at_128k_stay_within_the_mask_budget():
    """At 128K tokens a window of 4096 needs a [rows, rows + 4095] mask per call, not 16 GiB."""
    t = 128 * 1024
    for window in (1, 64, 4096, 32768):
        rows = mh._query_rows(t, t, window)
        assert rows >= 1 and rows * (rows + window - 1) <= mh.SDPA_MASK_ENTRIES
        assert rows >= min(math.isqrt(mh.SDPA_MASK_ENTRIES) // 2, mh.SDPA_MASK_ENTRIES // (2 * window))  # not too small
    assert mh._query_rows(1, t, None) == 1 and mh._query_rows(t, t, None) == mh.SDPA_MASK_ENTRIES // t
    assert math.ceil(t / mh._query_rows(t, t, 4096)) < 100  # SDPA calls per layer


@pytest.mark.parametrize("window", [None, 512])
def test_decoding_reads_each_kv_head_once_not_once_per_query_head(window):
    """A cached decoding step (Tq = 1) with 16 query heads per K/V head: the group's heads go as query rows over
    the group's own K/V, so no temporary holds the K/V repeated per query head; the output equals the reference."""
    tk, h, hkv, d = 8192, 16, 1, 16
    q, k, v = _qkv(1, 1, tk, h, hkv, d, dtype=torch.float32)
    scale = d**-0.5
    out = mh._sdpa(q, k, v, None, window, scale)
    ref = softmax_attention_naive(q.double(), k.double(), v.double(), scale, window=window)
    assert (out.double() - ref).abs().max() < 1e-5
    repeated_kv = tk * h * d * 4  # K (or V) repeated to every query head, fp32
    assert _largest_allocation(lambda: mh._sdpa(q, k, v, None, window, scale)) * 8 <= repeated_kv


def test_sparse_reference_attention_reads_each_kv_head_once():
    """The InfLLM-V2 reference's masked attention (CPU decoding of sparse layers, and prefill past dense_len)
    folds a group's heads into query rows too: no K/V repeated per head, the same output as per-head attention."""
    from salatrain_kernels.infllm_v2.naive import masked_attention

    tq, tk, h, hkv, d = 1, 8192, 16, 2, 16
    q, k, v = _qkv(1, tq, tk, h, hkv, d, dtype=torch.float32, seed=3)
    g = torch.Generator().manual_seed(4)
    visible = torch.rand(1, hkv, tq, tk, generator=g) < 0.3
    out = masked_attention(q, k, v, visible, 0.25)
    group = h // hkv
    kh = k.permute(0, 2, 1, 3).repeat_interleave(group, 1)
    vh = v.permute(0, 2, 1, 3).repeat_interleave(group, 1)
    ref = F.scaled_dot_product_attention(q.permute(0, 2, 1, 3), kh, vh, scale=0.25,
                                         attn_mask=visible.repeat_interleave(group, 1)).permute(0, 2, 1, 3)
    assert (out - ref).abs().max() < 1e-5
    repeated_kv = tk * h * d * 4
    assert _largest_allocation(lambda: masked_attention(q, k, v, visible, 0.25)) * 8 <= repeated_kv


@pytest.mark.parametrize("window", [None, 37])
def test_grouped_attention_takes_sdpa_outputs_in_any_memory_layout(monkeypatch, window):
    """CUDA's fused SDPA backends return [B, rows, H, D] memory under a [B, H, rows, D] shape (the CPU math
    backend returns it contiguous). Given such outputs, the full-attention layer's grouped path and the InfLLM-V2
    reference's masked attention still equal the independent reference (a `.view` of that layout once failed)."""
    from salatrain_kernels.infllm_v2.naive import masked_attention

    real = F.scaled_dot_product_attention

    def cuda_layout(*args, **kwargs):
        o = real(*args, **kwargs)
        out = o.transpose(1, 2).contiguous().transpose(1, 2)
        assert not out.is_contiguous() or o.shape[1] == 1 or o.shape[2] == 1
        return out

    monkeypatch.setattr(F, "scaled_dot_product_attention", cuda_layout)
    q, k, v = _qkv(2, 50, 50, 9, 3, dtype=torch.float32, seed=5)
    out = mh._sdpa(q, k, v, torch.tensor([0, 7]), window, 0.3)
    ref = _sdpa_one_mask(q.double(), k.double(), v.double(), torch.tensor([0, 7]), window, 0.3)
    assert (out.double() - ref)[1:, 7:].abs().max() < 1e-5 and (out.double() - ref)[0].abs().max() < 1e-5
    visible = torch.rand(2, 3, 50, 50, generator=torch.Generator().manual_seed(6)) < 0.5
    visible[..., 0] = True
    masked = masked_attention(q, k, v, visible, 0.3)
    kh, vh = (x.permute(0, 2, 1, 3).repeat_interleave(3, 1) for x in (k, v))
    expect = real(q.permute(0, 2, 1, 3), kh, vh, scale=0.3, attn_mask=visible.repeat_interleave(3, 1))
    expect = expect.permute(0, 2, 1, 3)
    assert (masked - expect).abs().max() < 1e-5
