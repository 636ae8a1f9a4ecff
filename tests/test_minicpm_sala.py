"""MiniCPM-SALA's released format: import (family adapter, convert, train), export (convert/export
format=minicpm_sala) and the exported modeling files, on a tiny released-schema checkpoint built here.

    import → salatrain's model equals the released forward written from DESIGN §5 (tests/helpers/sala_released.py)
    import → export is bit-exact (tensors and config.json)
    the exported directory loads and generates with transformers alone (salatrain not importable)
"""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from salatrain.cli import main
from salatrain.errors import UserError
from salatrain.hf_checkpoint import CheckpointDir
from salatrain.models import SalaHybridForCausalLM
from salatrain.models.loading import dense_config, load_dense_as_hybrid
from tests.helpers.checkpoints import LONG, SHORT, make_dense_checkpoint
from tests.helpers.sala_released import make_sala_checkpoint, released_logits, sala_config


def run_cli(*args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, [line for line in err.getvalue().splitlines() if line.strip()]


def one_line_error(code, lines, *fragments):
    assert code == 2, lines
    assert len(lines) == 1, lines
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def sala_dir(tmp_path_factory):
    return make_sala_checkpoint(tmp_path_factory.mktemp("sala") / "released")


@pytest.fixture(scope="module")
def imported(sala_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "hybrid"
    assert run_cli("convert", f"model={sala_dir}", f"output_dir={out}")[0] == 0
    return out


def _ids(t, seed=0, vocab=128, batch=1):
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------------- import


def test_import_keeps_the_layer_mix_and_the_released_rules(imported):
    cfg = json.loads((imported / "config.json").read_text())
    assert cfg["model_type"] == "sala_hybrid"
    assert cfg["mixer_types"] == ["sparse_attention", "linear_attention", "linear_attention", "sparse_attention"]
    sc = cfg["sparse_config"]
    assert (sc["dense_len_mode"], sc["local_blocks"], sc["normalizer"]) == ("sequence", "block", "coarse")
    assert (sc["block_size"], sc["dense_len"], sc["topk"], sc["use_rope"]) == (8, 32, 2, False)
    assert cfg["lightning_config"]["use_rope"] is True
    assert (cfg["scale_emb"], cfg["scale_depth"], cfg["dim_model_base"]) == (12.0, 1.4, 16)
    report = json.loads((imported / "conversion_report.json").read_text())
    assert report["kl_check"]["kl_max"] < 1e-10
    assert "o_gate → g_proj" in report["initialisation"]["sparse_attention"]["all"]


@pytest.mark.parametrize("t", [20, 45])
def test_salatrain_logits_equal_the_released_forward(sala_dir, imported, t):
    """fp32 salatrain vs the fp64 released forward; t=45 >= dense_len makes every query select blocks."""
    ids = _ids(t, seed=t)
    ref = released_logits(sala_dir, ids[0].tolist())
    for model in (load_dense_as_hybrid(sala_dir), SalaHybridForCausalLM.from_pretrained(imported)):
        with torch.no_grad():
            out = model(ids, use_cache=False).logits[0].double()
        assert (out - ref).abs().max() <= 1e-5, (out - ref).abs().max()
    assert ref.abs().max() > 0.1


def test_released_rules_matter_on_this_checkpoint(sala_dir):
    """The logits test would fail with salatrain's own rules: they change the output past dense_len."""
    model = load_dense_as_hybrid(sala_dir)
    ids = _ids(45, seed=45)
    ref = released_logits(sala_dir, ids[0].tolist())
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "sparse_params"):
            layer.self_attn.sparse_params.update(dense_len_mode="position", local_blocks="token")
    with torch.no_grad():
        out = model(ids, use_cache=False).logits[0].double()
    assert (out - ref).abs().max() > 1e-3


def test_plan_turns_sparse_layers_into_lightning(sala_dir, tmp_path):
    out = tmp_path / "h"
    assert run_cli("convert", f"model={sala_dir}", f"output_dir={out}", "plan.sparse_layers=[0]",
                   "kl_check=false")[0] == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mixer_types"] == ["sparse_attention"] + ["linear_attention"] * 3
    w, src = load_file(str(out / "model.safetensors")), load_file(str(sala_dir / "model.safetensors"))
    a = "model.layers.3.self_attn."
    assert torch.equal(w[a + "z_proj.weight"], src[a + "o_gate.weight"])
    assert torch.equal(w[a + "k_proj.weight"], src[a + "k_proj.weight"].view(2, 16, 64).repeat_interleave(2, 0)
                       .reshape(64, 64))
    report = json.loads((out / "conversion_report.json").read_text())
    assert "linear_attention (from sparse_attention)" in report["initialisation"]
    SalaHybridForCausalLM.from_pretrained(out)


def test_sparse_overrides_apply_over_the_checkpoints_own(sala_dir, tmp_path):
    out = tmp_path / "h"
    assert run_cli("convert", f"model={sala_dir}", f"output_dir={out}", "sparse.dense_len_mode=position",
                   "sparse.dense_len=64", "kl_check=false")[0] == 0
    sc = json.loads((out / "config.json").read_text())["sparse_config"]
    assert (sc["dense_len_mode"], sc["dense_len"], sc["local_blocks"], sc["block_size"]) == ("position", 64, "block", 8)


def test_sparse_overrides_are_checked_against_the_checkpoints_own(sala_dir, tmp_path):
    out = tmp_path / "h"  # kernel_stride=8 fits salatrain's kernel_size=32, not this checkpoint's 4
    one_line_error(*run_cli("convert", f"model={sala_dir}", f"output_dir={out}", "sparse.kernel_stride=8"),
                   "sparse.kernel_stride=8 exceeds kernel_size=4")
    one_line_error(*run_cli("convert", f"model={sala_dir}", f"output_dir={out}", "sparse.local_blocks=window"),
                   "sparse.local_blocks must be token or block (got 'window')")
    assert not out.exists()


def _with_config(tmp_path, sala_dir, **changes):
    d = tmp_path / "changed"
    d.mkdir()
    (d / "model.safetensors").write_bytes((sala_dir / "model.safetensors").read_bytes())
    cfg = json.loads((sala_dir / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _with_weights(tmp_path, sala_dir, edit):
    d = tmp_path / "edited"
    d.mkdir()
    (d / "config.json").write_text((sala_dir / "config.json").read_text())
    w = load_file(str(sala_dir / "model.safetensors"))
    edit(w)
    save_file(w, str(d / "model.safetensors"))
    return d


IMPORT_ERRORS = {
    "unknown key": (lambda t, s: _with_weights(t, s, lambda w: w.update({"model.layers.1.self_attn.o_gate.weight":
                                                                        torch.zeros(64, 64)})),
                    ["model.layers.1.self_attn.o_gate.weight", "minicpm_sala adapter"]),
    "missing key": (lambda t, s: _with_weights(t, s, lambda w: w.pop("model.layers.0.self_attn.o_gate.weight")),
                    ["lacks 1 expected key", "model.layers.0.self_attn.o_gate.weight"]),
    "bad shape": (lambda t, s: _with_weights(t, s, lambda w: w.update({"model.layers.2.self_attn.z_proj.weight":
                                                                      torch.zeros(64, 32)})),
                  ["model.layers.2.self_attn.z_proj.weight has shape [64, 32]"]),
    "unknown mixer": (lambda t, s: _with_config(t, s, mixer_types=["minicpm4", "mamba", "lightning", "minicpm4"]),
                      ["mixer_types[1] = 'mamba'"]),
    "lightning GQA": (lambda t, s: _with_config(t, s, lightning_nkv=2), ["lightning_nkv=2"]),
    "biases": (lambda t, s: _with_config(t, s, attention_bias=True), ["attention_bias=true"]),
    "no qk norm": (lambda t, s: _with_config(t, s, qk_norm=False), ["qk_norm=false"]),
    "other rope": (lambda t, s: _with_config(t, s, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
                   ["rope_scaling type 'dynamic'"]),
}


@pytest.mark.parametrize("case", list(IMPORT_ERRORS))
def test_import_refuses_what_does_not_fit_by_name(sala_dir, tmp_path, case):
    make, fragments = IMPORT_ERRORS[case]
    out = tmp_path / "out"
    one_line_error(*run_cli("convert", f"model={make(tmp_path, sala_dir)}", f"output_dir={out}"), *fragments)
    assert not out.exists()


def test_align_and_select_need_a_dense_base(sala_dir):
    with pytest.raises(UserError, match="needs the dense base model"):
        dense_config(CheckpointDir(sala_dir), mixer_types=["linear_attention"] * 4)


# ------------------------------------------------------------------------------------------------------------- export


def _configs_and_tensors_equal(a: Path, b: Path):
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]), k


def test_import_then_export_is_bit_exact(sala_dir, imported, tmp_path):
    out = tmp_path / "back"
    assert run_cli("export", f"checkpoint={imported}", "format=minicpm_sala", f"output_dir={out}")[0] == 0
    _configs_and_tensors_equal(sala_dir, out)
    assert {"configuration_minicpm_sala.py", "modeling_minicpm_sala.py"} <= {p.name for p in out.iterdir()}
    direct = tmp_path / "direct"
    assert run_cli("convert", f"model={sala_dir}", "format=minicpm_sala", f"output_dir={direct}",
                   "kl_check=false")[0] == 0
    _configs_and_tensors_equal(sala_dir, direct)
    assert json.loads((direct / "conversion_report.json").read_text())["format"]["name"] == "minicpm_sala"
    for folder, command in ((out, "export"), (direct, "convert")):
        assert json.loads((folder / ".salatrain.json").read_text())["command"] == command
    assert not (direct / ".salatrain").exists()
    one_line_error(*run_cli("export", f"checkpoint={imported}", "format=minicpm_sala",
                            f"output_dir={imported / 'back'}"), "never writes into its inputs")
    assert not (imported / "back").exists()


EXPORT_ERRORS = {
    "qwen2": (["plan.method=uniform"], ["q/k/v projection biases"]),
    "llama": (["plan.method=uniform"], ["q/k/v/o projection biases"]),
    "qwen3": (["plan.sparse_layers=[0,3]"], ["q/k norms in the sparse layers [0, 3]"]),
    "mistral": (["plan.file=FULL"], ["full_attention layers [1, 2]"]),
    "minicpm": (["plan.sparse_layers=[1,3]"], ["layer 0 is linear_attention"]),
}


@pytest.mark.parametrize("family", list(EXPORT_ERRORS))
def test_export_refuses_what_the_schema_cannot_express(dense_dirs, tmp_path, family):
    extra, fragments = EXPORT_ERRORS[family]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"mixer_types": ["sparse_attention", "full_attention", "full_attention",
                                                "linear_attention"]}))
    extra = [e.replace("FULL", str(plan)) for e in extra]
    out = tmp_path / "out"
    one_line_error(*run_cli("convert", f"model={dense_dirs[family]}", f"output_dir={out}", "format=minicpm_sala",
                            *extra), "cannot express", *fragments)
    assert not out.exists()


def test_export_of_a_salatrain_conversion_refuses_by_name(dense_dirs, tmp_path):
    hybrid = tmp_path / "h"
    assert run_cli("convert", f"model={dense_dirs['qwen2']}", f"output_dir={hybrid}", "plan.method=uniform",
                   "kl_check=false")[0] == 0
    one_line_error(*run_cli("export", f"checkpoint={hybrid}", "format=minicpm_sala", f"output_dir={tmp_path / 'o'}"),
                   "q/k/v projection biases")
    one_line_error(*run_cli("export", f"checkpoint={hybrid}", "format=gguf", f"output_dir={tmp_path / 'o'}"),
                   "format must be one of salatrain, minicpm_sala")
    assert not (tmp_path / "o").exists()


REMOTE = """
import sys, importlib.abc, torch
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('salatrain', 'salatrain_kernels'):
            raise ModuleNotFoundError(name, name=name)
sys.meta_path.insert(0, Block())
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
e = torch.load(sys.argv[2])
with torch.no_grad():
    out = m(e["ids"], use_cache=False).logits
assert (out - e["logits"]).abs().max() <= 1e-5, (out - e["logits"]).abs().max()
prompt = e["ids"][:1, :24]
g = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
ids = prompt
with torch.no_grad():
    for _ in range(16):
        ids = torch.cat([ids, m(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
assert g.shape[1] > 30 and torch.equal(g, ids[:, : g.shape[1]]), (g, ids)  # up to an end-of-text token
print("ok", type(m).__module__)
"""


def _loads_and_generates_without_salatrain(exported: Path, model: SalaHybridForCausalLM, tmp_path: Path):
    ids = _ids(45, seed=9, vocab=model.config.vocab_size, batch=2)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    r = subprocess.run([sys.executable, "-c", REMOTE, str(exported), str(tmp_path / "expected.pt")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok transformers_modules")


def test_exported_sala_loads_and_generates_without_salatrain(sala_dir, imported, tmp_path):
    """Logits past dense_len (block selection) equal salatrain's; cached greedy decoding equals uncached."""
    out = tmp_path / "exp"
    assert run_cli("export", f"checkpoint={imported}", "format=minicpm_sala", f"output_dir={out}")[0] == 0
    _loads_and_generates_without_salatrain(out, SalaHybridForCausalLM.from_pretrained(imported), tmp_path)


LONGROPE = {"rope_type": "longrope", "long_factor": LONG, "short_factor": SHORT,
            "original_max_position_embeddings": 512}


@pytest.mark.parametrize("rope", [None, LONGROPE], ids=["rope", "longrope"])
def test_minicpm4_conversion_exports_cleanly(tmp_path, rope):
    """A MiniCPM4 base with μP scales (and LongRoPE at its trained length): convert → export; the released loader
    reproduces salatrain's hybrid."""
    base = make_dense_checkpoint("minicpm", tmp_path / "minicpm4", seed=3, minicpm_scales={
        "scale_emb": 12.0, "scale_depth": 1.4, "dim_model_base": 16, "rope_scaling": rope})
    hybrid, out = tmp_path / "h", tmp_path / "exp"
    assert run_cli("convert", f"model={base}", f"output_dir={hybrid}", "plan.sparse_layers=[0,3]",
                   "sparse.dense_len=32",
                   "sparse.block_size=8", "sparse.kernel_size=4", "sparse.kernel_stride=2", "sparse.topk=2",
                   "sparse.window_size=8", "sparse.dense_len_mode=sequence", "sparse.local_blocks=block",
                   "sparse.normalizer=coarse", "kl_check=false")[0] == 0
    code, lines = run_cli("export", f"checkpoint={hybrid}", "format=minicpm_sala", f"output_dir={out}")
    assert code == 0, lines
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mixer_types"] == ["minicpm4", "lightning-attn", "lightning-attn", "minicpm4"]
    assert (cfg["scale_emb"], cfg["scale_depth"], cfg["dim_model_base"]) == (12.0, 1.4, 16)
    assert "model.layers.0.self_attn.o_gate.weight" in load_file(str(out / "model.safetensors"))
    assert cfg["rope_scaling"] == rope
    _loads_and_generates_without_salatrain(out, SalaHybridForCausalLM.from_pretrained(hybrid), tmp_path)


def test_longrope_beyond_its_trained_length_is_refused(tmp_path):
    """The released LongRoPE applies the long factors at every length once max_position_embeddings exceeds the
    original length; salatrain's switches by length: the two would differ, so the export refuses."""
    base = make_dense_checkpoint("minicpm", tmp_path / "minicpm4", minicpm_scales={
        "rope_scaling": {**LONGROPE, "original_max_position_embeddings": 256}})
    one_line_error(*run_cli("convert", f"model={base}", f"output_dir={tmp_path / 'o'}", "plan.method=uniform",
                            "format=minicpm_sala"),
                   "max_position_embeddings=512 != original_max_position_embeddings=256")


def test_default_rules_export_with_a_note(dense_dirs, tmp_path, caplog):
    """salatrain's own rules are not expressible in the schema; the export keeps going and says what changes."""
    hybrid = tmp_path / "h"
    assert run_cli("convert", f"model={dense_dirs['minicpm']}", f"output_dir={hybrid}", "plan.method=uniform",
                   "kl_check=false")[0] == 0
    with caplog.at_level("WARNING"):
        assert run_cli("export", f"checkpoint={hybrid}", "format=minicpm_sala",
                       f"output_dir={tmp_path / 'o'}")[0] == 0
    assert "dense_len_mode position -> sequence" in caplog.text and "local_blocks token -> block" in caplog.text
    # the same directory with the default format: nothing to export, and a line that says so (nothing written)
    one_line_error(*run_cli("export", f"checkpoint={hybrid}", f"output_dir={tmp_path / 'o2'}"),
                   "already an HF model in salatrain's format")
    assert not (tmp_path / "o2").exists()


# ------------------------------------------------------------------------------------------------------------- train


def test_train_and_export_the_released_model(tmp_path):
    """`salatrain train model.path=<minicpm_sala dir>` runs (sparse layers on the released rules, past dense_len),
    its output keeps the rules, and `export format=minicpm_sala` from the run gives the released schema back."""
    from salatrain.train import compose_train, run_stage
    from salatrain.train.tiny import resolve

    src = make_sala_checkpoint(tmp_path / "sala", vocab_size=512, tokenizer_from=Path(resolve("builtin:tiny-dense")))
    cfg = compose_train("tiny", [f"output_dir={tmp_path / 'run'}", f"model.path={src}", "trainer.max_steps=2",
                                 f"data.cache_dir={tmp_path / 'cache'}"])
    result = run_stage(cfg)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    trained = json.loads((result.output_dir / "config.json").read_text())
    rules = trained["sparse_config"]
    assert rules["dense_len_mode"] == "sequence" and rules["local_blocks"] == "block"
    out = tmp_path / "exp"
    assert run_cli("export", f"checkpoint={result.output_dir}", "format=minicpm_sala", f"output_dir={out}")[0] == 0
    exported = json.loads((out / "config.json").read_text())
    source = json.loads((src / "config.json").read_text())
    assert exported == source
    before, after = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained
    assert (out / "tokenizer.json").is_file()


def test_sala_config_has_every_released_key():
    """The test checkpoint's config.json carries DESIGN §5's keys (so the round trip covers them)."""
    keys = set(sala_config())
    assert {"mixer_types", "sparse_config", "scale_emb", "scale_depth", "dim_model_base", "mup_denominator",
            "attn_use_rope", "attn_use_output_gate", "lightning_nh", "lightning_nkv", "lightning_head_dim",
            "lightning_scale", "lightning_use_rope", "qk_norm", "use_output_norm", "use_output_gate",
            "tie_word_embeddings", "rope_theta", "max_position_embeddings", "auto_map"} <= keys
