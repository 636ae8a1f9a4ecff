"""GraphDecoder: decoding whose layers between attention calls replay as CUDA graphs gives the model's own greedy
tokens and leaves the model's cache as forward would. The eager pieces on the CPU (the decomposition into
prepare / attend / finish); captured graphs on a GPU."""
from __future__ import annotations

import pytest
import torch

from salatrain.eval.bench_measure import decode, prefill
from salatrain.models.decode_graphs import GraphDecoder
from tests.test_checkpoint_roundtrip import tiny_hybrid

CUDA = torch.cuda.is_available()


def _both(model, ids, steps, graphs):
    """Greedy tokens and final cache from the model's forward, and from GraphDecoder."""
    cache, token = prefill(model, ids, None, "cache")
    want = [token]
    for _ in range(steps):
        cache, token = decode(model, cache, token, 1, "cache")
        want.append(token)
    cache2, token2 = prefill(model, ids, None, "cache")
    dec = GraphDecoder(model, cache2, token2, graphs=graphs)
    got = [token2] + [dec.step() for _ in range(steps)]
    return torch.cat(want, 1), torch.cat(got, 1), cache, dec.cache


@pytest.mark.parametrize("prompt_len", [10, 30])
def test_eager_pieces_decode_the_model_s_own_tokens_and_cache(prompt_len):
    """Every mixer type (full attention with and without a sliding window, Lightning, InfLLM-V2 crossing
    dense_len) through prepare / attend / finish and the Lightning layers inside the pieces."""
    model = tiny_hybrid(seed=1)
    ids = torch.randint(0, 96, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    want, got, cache, dec_cache = _both(model, ids, 20, graphs=False)
    assert torch.equal(got, want)
    assert dec_cache.seen_tokens == cache.seen_tokens == prompt_len + 20
    _assert_same_cache(cache, dec_cache)


def _assert_same_cache(cache, dec_cache):
    """Every K/V and Lightning state tensor equal (not only the greedy tokens, which near-ties could hide)."""
    for a, b in zip([*cache.keys, *cache.values, *cache.states], [*dec_cache.keys, *dec_cache.values,
                                                                   *dec_cache.states]):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


def test_eager_pieces_with_minicpm_scales_qk_norms_and_nope_logit_scale():
    """μP scales (embeddings, residual branches, logits), Qwen3 q/k norms and HALO's NoPE logit scale go through
    the pieces as through forward."""
    from salatrain.models import SalaHybridConfig, SalaHybridForCausalLM
    from tests.test_checkpoint_roundtrip import PLAN, SPARSE

    torch.manual_seed(4)
    cfg = SalaHybridConfig(
        vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, mixer_types=PLAN, sparse_config=dict(SPARSE, nope_logit_scale=True), qk_norm=True,
        scale_emb=12.0, scale_depth=1.4, dim_model_base=16, max_position_embeddings=256, eos_token_id=None,
        bos_token_id=None,
    )
    model = SalaHybridForCausalLM(cfg).eval()
    assert cfg.residual_scale != 1.0 and cfg.logit_scale != 1.0
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(9))
    want, got, cache, dec_cache = _both(model, ids, 12, graphs=False)
    assert torch.equal(got, want)
    _assert_same_cache(cache, dec_cache)


def test_from_prompt_prefills_as_the_model_does():
    model = tiny_hybrid(seed=2)
    ids = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(5))
    dec, token = GraphDecoder.from_prompt(model, ids, graphs=False)
    got = torch.cat([token] + [dec.step() for _ in range(10)], 1)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=11, do_sample=False, min_new_tokens=11)[:, 30:]
    assert torch.equal(got, want)


def test_graph_decoder_refuses_what_it_cannot_decode():
    model = tiny_hybrid(seed=0)
    ids = torch.randint(0, 96, (1, 8))
    cache, token = prefill(model, ids, None, "cache")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA model"):
        GraphDecoder(model, cache, token, graphs=True)
    with pytest.raises(ValueError, match="continues a prefill"):
        GraphDecoder(model, None, token)
    model.config.rope_parameters = dict(model.config.rope_parameters, rope_type="dynamic", factor=2.0)
    with pytest.raises(ValueError, match="RoPE type 'dynamic' updates its frequencies on the host"):
        GraphDecoder(model, cache, token)
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        GraphDecoder(model, cache, token)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_decode_the_model_s_own_tokens(dtype):
    """Captured and replayed on a GPU (kernels on): the same greedy tokens and cache as forward, over steps that
    cross dense_len and the capture (after the warm-up steps)."""
    model = tiny_hybrid(seed=1).to("cuda", dtype)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3)).cuda()
    want, got, cache, dec_cache = _both(model, ids, 24, graphs=True)
    assert torch.equal(got, want)
    for a, b in zip(cache.states, dec_cache.states):
        if a is not None:
            torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------- generate


def _count_calls(monkeypatch, method: str) -> dict:
    """Count the calls of GraphDecoder.<method> (it still runs); {"n": calls so far}."""
    calls, original = {"n": 0}, getattr(GraphDecoder, method)

    def counting(self):
        calls["n"] += 1
        return original(self)

    monkeypatch.setattr(GraphDecoder, method, counting)
    return calls


def _generate_both(model, ids, monkeypatch, **kw):
    """generate through transformers' loop and through decode_graphs.sample (seeded alike); the second's count
    of decoding steps GraphDecoder ran."""
    steps = _count_calls(monkeypatch, "_run")
    out = []
    for graphs in (False, True):
        torch.manual_seed(0)
        out.append(model.generate(ids, cuda_graphs=graphs, **kw))
    return out[0], out[1], steps["n"]


@pytest.mark.parametrize("kw", [dict(do_sample=False),
                                dict(do_sample=True, temperature=0.7, top_k=20, repetition_penalty=1.3)],
                         ids=["greedy", "sampled"])
def test_generate_through_graph_decoding_gives_transformers_tokens(kw, monkeypatch):
    """The same logits processors, sampling draws and stopping as transformers' loop; every token after the
    first comes from GraphDecoder (its eager pieces on the CPU)."""
    model = tiny_hybrid(seed=3)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    want, got, steps = _generate_both(model, ids, monkeypatch, max_new_tokens=16, min_new_tokens=16, **kw)
    assert got.shape == (2, 28) and torch.equal(got, want)
    assert steps == 15


def test_generate_through_graph_decoding_stops_and_pads_at_eos(monkeypatch):
    model = tiny_hybrid(seed=3)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    greedy = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, cuda_graphs=False)
    eos = int(greedy[0, 12 + 5])  # row 0 emits it at its 6th new token
    want, got, steps = _generate_both(model, ids, monkeypatch, max_new_tokens=16, do_sample=False,
                                      eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want) and int(got[0, 12 + 5]) == eos
    assert steps == got.shape[1] - 12 - 1


def test_generate_keeps_transformers_loop_for_padded_rows(monkeypatch):
    model = tiny_hybrid(seed=3)
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    want, got, steps = _generate_both(model, ids, monkeypatch, attention_mask=mask, max_new_tokens=8,
                                      do_sample=False, pad_token_id=0)
    assert torch.equal(got, want) and steps == 0


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_on_cuda_runs_captured_graphs_and_gives_transformers_tokens(dtype, monkeypatch):
    """On CUDA generate takes the graph path by default: the greedy tokens of transformers' loop over steps that
    cross dense_len and the capture."""
    model = tiny_hybrid(seed=1).to("cuda", dtype)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3)).cuda()
    captured = _count_calls(monkeypatch, "_capture_step")
    got = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    want = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, cuda_graphs=False)
    assert torch.equal(got, want) and captured["n"] == 1
