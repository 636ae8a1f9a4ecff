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
