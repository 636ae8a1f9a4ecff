"""The two InfLLM-V2 selection rules in their two forms (salatrain's and MiniCPM-SALA's released ones):

    sparse.dense_len_mode  position (a query at t >= dense_len selects blocks) | sequence (every query of a
                           sequence whose keys number >= dense_len does)
    sparse.local_blocks    token (blocks of the last window_size tokens) | block (the query's block and the
                           window_size/block_size blocks before it)

The PyTorch reference against the independent oracle under each rule; prefill against step-by-step decoding;
a sparse layer on each rule combination runs the Triton kernels (the interpreter on CPU) and matches the
reference. The kernels against the reference under each rule: tests/kernels/test_infllm_v2.py.
"""

import pytest
import torch

from salatrain.models import SalaHybridConfig
from salatrain.models import modeling_sala_hybrid as modeling
from salatrain.models.modeling_sala_hybrid import SeqInfo, SparseAttention
from salatrain_kernels.infllm_v2.naive import first_local_block, infllmv2_attn_torch
from tests.helpers.naive import infllmv2_naive

# 2 init/local + topk: 3 visible blocks of 8 = 24 tokens, dense_len 40: queries 24..38 are where the rules differ
SMALL = dict(block_size=8, kernel_size=4, kernel_stride=2, init_blocks=1, topk=2, window_size=8, dense_len=40)
# the same shape of parameters in a block geometry the Triton kernels take (3 visible blocks of 16 = 48 tokens)
KERNEL_SMALL = dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, topk=2, window_size=16, dense_len=64)
RULES = [(mode, local) for mode in ("position", "sequence") for local in ("token", "block")]


def _qkv(t, hq=4, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, t, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))


@pytest.mark.parametrize("normalizer", ["exact", "coarse"])
@pytest.mark.parametrize("mode,local", RULES)
def test_reference_equals_oracle_under_each_rule(mode, local, normalizer):
    q, k, v = _qkv(61, seed=3)
    rules = dict(dense_len_mode=mode, local_blocks=local, normalizer=normalizer)
    out = infllmv2_attn_torch(q, k, v, **SMALL, **rules)
    assert torch.allclose(out[0], infllmv2_naive(q[0], k[0], v[0], **SMALL, **rules), atol=1e-10)


def test_each_rule_changes_the_output():
    q, k, v = _qkv(61, seed=3)
    outs = {r: infllmv2_attn_torch(q, k, v, **SMALL, dense_len_mode=r[0], local_blocks=r[1]) for r in RULES}
    assert (outs[("sequence", "token")] - outs[("position", "token")]).abs().max() > 1e-3
    assert (outs[("position", "block")] - outs[("position", "token")]).abs().max() > 1e-3


def test_local_window_forms():
    """block: always window/block + 1 blocks ending at the query's; token: the blocks of the last window tokens."""
    pos = torch.tensor([0, 7, 8, 15, 16, 23, 63])
    assert first_local_block(pos, 8, 16, "block").tolist() == [0, 0, 0, 0, 0, 0, 5]
    assert first_local_block(pos, 8, 16, "token").tolist() == [0, 0, 0, 0, 0, 1, 6]


def _decode_rows(q, k, v, rules):
    """Row t computed as a decoding step: its query alone against the t + 1 keys so far."""
    return torch.cat([infllmv2_attn_torch(q[:, t : t + 1], k[:, : t + 1], v[:, : t + 1], **SMALL, **rules)
                      for t in range(q.shape[1])], 1)


@pytest.mark.parametrize("local", ["token", "block"])
def test_position_mode_prefill_equals_decoding(local):
    q, k, v = _qkv(70, seed=5)
    rules = dict(dense_len_mode="position", local_blocks=local, normalizer="coarse")
    prefill = infllmv2_attn_torch(q, k, v, **SMALL, **rules)
    assert torch.allclose(_decode_rows(q, k, v, rules), prefill, atol=1e-12)


@pytest.mark.parametrize("local", ["token", "block"])
def test_sequence_mode_prefill_and_decoding_differ_exactly_before_dense_len(local):
    """Under the released rule a query's dense/sparse decision depends on the sequence length so far. In a prefill
    of T >= dense_len tokens every query selects blocks; decoded one at a time, the query at t attends densely
    while t + 1 < dense_len. They agree where selection keeps every block (t < (topk + window/block)·block = 24)
    and from t = dense_len - 1 on; in between the decoded row is dense attention and the prefill row is not."""
    q, k, v = _qkv(70, seed=5)
    rules = dict(dense_len_mode="sequence", local_blocks=local, normalizer="coarse")
    prefill = infllmv2_attn_torch(q, k, v, **SMALL, **rules)
    decoded = _decode_rows(q, k, v, rules)
    dense = infllmv2_attn_torch(q, k, v, **{**SMALL, "dense_len": 10**9})
    visible_all, last_dense = 24, SMALL["dense_len"] - 1
    assert torch.allclose(decoded[:, :visible_all], prefill[:, :visible_all], atol=1e-12)
    assert torch.allclose(decoded[:, last_dense:], prefill[:, last_dense:], atol=1e-12)
    assert torch.allclose(decoded[:, :last_dense], dense[:, :last_dense], atol=1e-12)
    gap = (decoded - prefill)[:, visible_all:last_dense].abs().amax(dim=(0, 2, 3))
    assert (gap > 1e-3).any(), gap
    short = infllmv2_attn_torch(q[:, :last_dense], k[:, :last_dense], v[:, :last_dense], **SMALL, **rules)
    assert torch.allclose(short, dense[:, :last_dense], atol=1e-12)  # a prefill shorter than dense_len: all dense


def _layer(backend, mode="sequence", local="block", seed=0, params=SMALL, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = SalaHybridConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, mixer_types=["sparse_attention"],
                           sparse_config={**params, "dense_len_mode": mode, "local_blocks": local})
    layer = SparseAttention(cfg, 0).to(dtype)
    layer.kernel_backend = backend
    return layer


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("mode,local", RULES)
def test_layer_runs_the_kernels_under_each_rule(monkeypatch, mode, local):
    """kernel_backend=triton takes every rule combination: the kernels run (their start-up self-test is asked for
    this layer's rules) and match the reference, forward and gradients, for packed documents on both sides of
    dense_len and for a decoding step after them. fp32; the interpreter on CPU, compiled on a GPU."""
    tested = []
    monkeypatch.setattr(modeling, "_checked", {})
    monkeypatch.setattr(modeling._kernels, "self_test", lambda what, **kw: tested.append((what, kw)))
    kernels, reference = (_layer(b, mode, local, params=KERNEL_SMALL, dtype=torch.float32).to(DEVICE)
                          for b in ("triton", "torch"))
    cu = torch.tensor([0, 90, 121], dtype=torch.int32, device=DEVICE)  # 90 keys >= dense_len > 31
    seq = SeqInfo(modeling._positions_from_cu_seqlens(cu, 121).view(1, -1), cu_seqlens=cu)
    x = torch.randn(1, 121, 32, device=DEVICE)
    outs, grads = [], []
    for layer in (kernels, reference):
        xg = x.clone().requires_grad_()
        out = layer(xg, None, seq, None)
        out.square().sum().backward()
        outs.append(out)
        grads.append([xg.grad] + [p.grad for p in (layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight)])
    assert [what for what, _ in tested] == ["infllmv2_attn"]
    assert (tested[0][1]["dense_len_mode"], tested[0][1]["local_blocks"]) == (mode, local)
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=2e-5)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    q = torch.randn(1, 1, 4, 8, device=DEVICE)  # a decoding step: one query after 90 cached keys
    k, v = (torch.randn(1, 91, 2, 8, device=DEVICE) for _ in range(2))
    step = SeqInfo(torch.tensor([[90]], device=DEVICE), past_len=90)
    decoded = [layer.attend(q, k, v, step) for layer in (kernels, reference)]
    torch.testing.assert_close(decoded[0], decoded[1], atol=2e-5, rtol=2e-5)


def test_sequence_mode_layer_is_dense_below_dense_len_and_sparse_from_it():
    """The layer's dense shortcut follows the rule: dense_len - 1 tokens are dense, dense_len tokens are not."""
    n = SMALL["dense_len"]
    x = torch.randn(1, n, 32, dtype=torch.float64)
    layer, dense = _layer("torch"), _layer("torch", mode="position")  # same weights (same seed)
    seq = SeqInfo(torch.arange(n).view(1, -1))
    assert torch.allclose(layer(x[:, : n - 1], None, SeqInfo(seq.positions[:, : n - 1]), None),
                          dense(x[:, : n - 1], None, SeqInfo(seq.positions[:, : n - 1]), None), atol=1e-12)
    assert (layer(x, None, seq, None) - dense(x, None, seq, None)).abs().max() > 1e-4


def test_rule_values_are_checked():
    with pytest.raises(ValueError, match="dense_len_mode"):
        SalaHybridConfig(num_hidden_layers=1, mixer_types=["sparse_attention"],
                         sparse_config={"dense_len_mode": "doc"})
    with pytest.raises(ValueError, match="local_blocks"):
        infllmv2_attn_torch(*_qkv(8), **SMALL, local_blocks="window")
