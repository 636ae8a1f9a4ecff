"""A hybrid with every layer ``full_attention`` equals transformers' own model (fp32, max |Δlogit| ≤ 1e-4).

MiniCPM4 has no offline reference: neutral μP scales must reduce it to Llama exactly, and each scale and its
LongRoPE are checked on their own.
"""

import math

import pytest
import torch

from salatrain.hf_checkpoint import CheckpointDir
from salatrain.models.loading import load_dense_as_hybrid
from tests.helpers.checkpoints import LONG, SHORT, make_dense_checkpoint, reference_model


def _ids(batch=2, length=40, vocab=128, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_full_attention_plan_equals_transformers(dense_dirs, family):
    ref = reference_model(family)
    ours = load_dense_as_hybrid(dense_dirs[family])
    ids = _ids()
    with torch.no_grad():
        diff = (ref(ids).logits - ours(ids, use_cache=False).logits).abs().max().item()
    assert diff <= 1e-4, f"{family}: max |Δlogit| {diff}"


def test_sliding_window_is_active(dense_dirs):
    """Mistral's window (7 tokens) really limits attention: dropping it changes the logits."""
    ours = load_dense_as_hybrid(dense_dirs["mistral"])
    assert ours.config.sliding_windows == [7] * 4
    no_window = load_dense_as_hybrid(dense_dirs["mistral"], sliding_windows=[None] * 4)
    ids = _ids(length=30)
    with torch.no_grad():
        assert (ours(ids, use_cache=False).logits - no_window(ids, use_cache=False).logits).abs().max() > 1e-3


def test_qwen2_windows_follow_max_window_layers(dense_dirs):
    ours = load_dense_as_hybrid(dense_dirs["qwen2"])
    assert ours.config.sliding_windows == [None, None, 9, 9]


def test_minicpm_neutral_scales_equal_llama(dense_dirs):
    ref = reference_model("minicpm")
    ours = load_dense_as_hybrid(dense_dirs["minicpm"])
    assert ours.config.base_model_type == "minicpm"
    ids = _ids()
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids, use_cache=False).logits).abs().max() <= 1e-4


def test_minicpm_scale_emb_and_logit_scale(tmp_path):
    """scale_emb multiplies the embeddings; dim_model_base divides the final hidden states."""
    d = make_dense_checkpoint("minicpm", tmp_path / "m", minicpm_scales={"scale_emb": 12.0, "dim_model_base": 16})
    ours = load_dense_as_hybrid(d)
    neutral = load_dense_as_hybrid(d, scale_emb=1.0, dim_model_base=None)
    ids = _ids(batch=1, length=12)
    with torch.no_grad():
        emb = neutral.model.embed_tokens(ids) * 12.0
        h = neutral.model(inputs_embeds=emb, use_cache=False).last_hidden_state
        expected = neutral.lm_head(h / (64 / 16))
        got = ours(ids, use_cache=False).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert ours.config.logit_scale == pytest.approx(16 / 64)


def test_minicpm_scale_depth_scales_every_residual_branch(tmp_path):
    d = make_dense_checkpoint("minicpm", tmp_path / "m", minicpm_scales={"scale_depth": 1.4})
    ours = load_dense_as_hybrid(d)
    layer = ours.model.layers[0]
    assert layer.residual_scale == pytest.approx(1.4 / math.sqrt(4))
    x = torch.randn(1, 5, 64)
    rope = ours.model.rotary_emb(x, torch.arange(5).view(1, -1))
    from salatrain.models.modeling_sala_hybrid import SeqInfo

    seq = SeqInfo(torch.arange(5).view(1, -1))
    with torch.no_grad():
        a = layer.self_attn(layer.input_layernorm(x), rope, seq, None)
        h = x + layer.residual_scale * a
        expected = h + layer.residual_scale * layer.mlp(layer.post_attention_layernorm(h))
        assert torch.allclose(layer(x, rope, seq), expected, atol=1e-6)


def test_minicpm_use_mup_false_means_no_scales(tmp_path):
    d = make_dense_checkpoint("minicpm", tmp_path / "m", minicpm_scales={"scale_emb": 12.0, "use_mup": False})
    cfg = load_dense_as_hybrid(d).config
    assert (cfg.scale_emb, cfg.scale_depth, cfg.dim_model_base) == (1.0, None, None)


def _minicpm_longrope(dim, base, max_pos, orig, positions, factors):
    """MiniCPM4's LongRoPE as its modeling code writes it (independent of transformers)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(positions.float(), 1.0 / torch.tensor(factors)) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = math.sqrt(1 + math.log(max_pos / orig) / math.log(orig))
    return emb.cos() * scale, emb.sin() * scale


@pytest.mark.parametrize("length,factors", [(100, SHORT), (300, LONG)])
def test_minicpm_longrope(tmp_path, length, factors):
    scaling = {"rope_type": "longrope", "long_factor": LONG, "short_factor": SHORT,
               "original_max_position_embeddings": 256}
    d = make_dense_checkpoint("minicpm", tmp_path / "m", minicpm_scales={"rope_scaling": scaling})
    model = load_dense_as_hybrid(d)
    assert CheckpointDir(d).config["rope_scaling"]["rope_type"] == "longrope"
    pos = torch.arange(length).view(1, -1)
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    ecos, esin = _minicpm_longrope(16, 10000.0, 512, 256, pos[0], factors)
    assert torch.allclose(cos[0], ecos, atol=1e-5) and torch.allclose(sin[0], esin, atol=1e-5)
