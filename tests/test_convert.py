"""`salatrain convert`: plans, weight transfer, report, output format, and bad inputs (exit 2, nothing written)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from salatrain.config.schema import ConvertConfig, PlanSettings, SparseSettings
from salatrain.convert.convert import convert
from salatrain.models import SalaHybridForCausalLM
from salatrain.models.loading import load_dense_as_hybrid
from salatrain.models.plan import num_kept, uniform_layers


class Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def run_cli(*args):
    """The CLI in this process (same code path as the console script, without a new interpreter)."""
    import contextlib
    import io

    from salatrain.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(args))
    return Result(code, err.getvalue())


def test_console_script_reports_errors_with_exit_code_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "salatrain.cli", "convert", f"model={tmp_path / 'nope'}",
                        f"output_dir={tmp_path / 'o'}", "plan.method=uniform"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("salatrain convert: model directory")


def test_uniform_plan_rule():
    assert num_kept(32, 0.25) == 8 and num_kept(30, 0.25) == 8 and num_kept(4, 0.25) == 1
    assert uniform_layers(30, 0.25) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert uniform_layers(32, 0.25) == [0, 4, 9, 13, 18, 22, 27, 31]
    assert uniform_layers(4, 0.5) == [0, 3]
    with pytest.raises(ValueError):
        num_kept(10, 0.0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "minicpm"])
def test_convert_transfers_weights(dense_dirs, tmp_path, family):
    out = convert(ConvertConfig(model=str(dense_dirs[family]), output_dir=str(tmp_path / "h"),
                                plan=PlanSettings(sparse_layers=[0, 3])))
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["sparse_layers"] == [0, 3] and report["linear_layers"] == [1, 2]
    assert report["parameters"]["added"] > 0 and "kl_mean" in report["kl_check"]
    hybrid = SalaHybridForCausalLM.from_pretrained(out)
    dense = load_dense_as_hybrid(dense_dirs[family])
    assert hybrid.config.mixer_types == ["sparse_attention", "linear_attention", "linear_attention", "sparse_attention"]
    d_attn, s_attn, l_attn = dense.model.layers[0].self_attn, hybrid.model.layers[0].self_attn, hybrid.model.layers[1].self_attn
    assert torch.equal(s_attn.q_proj.weight, d_attn.q_proj.weight)
    assert torch.equal(s_attn.o_proj.weight, 2 * d_attn.o_proj.weight)
    assert torch.equal(s_attn.g_proj.weight, torch.zeros_like(s_attn.g_proj.weight))
    dl = dense.model.layers[1].self_attn
    # GQA 2 -> 4 heads by repeat_interleave: head h of the Lightning layer is KV head h // 2
    k_dense = dl.k_proj.weight.view(2, 16, 64)
    assert torch.equal(l_attn.k_proj.weight.view(4, 16, 64), k_dense.repeat_interleave(2, 0))
    if family == "qwen3":
        assert torch.equal(l_attn.q_norm.weight, dl.q_norm.weight)
    if family == "qwen2":
        assert torch.equal(l_attn.k_proj.bias.view(4, 16), dl.k_proj.bias.view(2, 16).repeat_interleave(2, 0))
    assert torch.equal(hybrid.model.layers[2].mlp.up_proj.weight, dense.model.layers[2].mlp.up_proj.weight)
    assert (out / "modeling_sala_hybrid.py").is_file() and json.loads((out / "config.json").read_text())["auto_map"]


def test_all_full_attention_plan_is_lossless(dense_dirs, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"mixer_types": ["full_attention"] * 4}))
    out = convert(ConvertConfig(model=str(dense_dirs["mistral"]), output_dir=str(tmp_path / "h"),
                                plan=PlanSettings(file=str(plan))))
    assert json.loads((out / "conversion_report.json").read_text())["kl_check"]["kl_max"] < 1e-9


@pytest.mark.parametrize("sparse,share", [({}, 4), ({"topk": 16}, 1), ({"topk": 16, "share_tokens": 2}, 2),
                                           ({"share_tokens": 1}, 1)])
def test_share_tokens_of_a_new_conversion_follows_topk(dense_dirs, tmp_path, sparse, share):
    """Unset, sparse.share_tokens becomes 4 for long lists (topk >= 64, the default) and 1 for short ones, written to
    config.json; a value the user sets is kept."""
    out = convert(ConvertConfig(model=str(dense_dirs["llama"]), output_dir=str(tmp_path / "h"), kl_check=False,
                                sparse=SparseSettings(**sparse), plan=PlanSettings(method="uniform", ratio=0.5)))
    assert json.loads((out / "config.json").read_text())["sparse_config"]["share_tokens"] == share


def test_sharded_output_and_dtype(dense_dirs, tmp_path):
    out = convert(ConvertConfig(model=str(dense_dirs["llama"]), output_dir=str(tmp_path / "h"), dtype="bfloat16",
                                max_shard_size="60KB", plan=PlanSettings(method="uniform", ratio=0.5)))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = SalaHybridForCausalLM.from_pretrained(out)
    assert model.config.mixer_types == ["sparse_attention", "linear_attention", "linear_attention", "sparse_attention"]
    assert model.model.layers[1].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_cli_convert_smollm2_and_load_without_salatrain(smollm2, tmp_path):
    """The issue's done-when: convert the real model (uniform 0.25) and generate in a fresh process where
    salatrain is not importable, through trust_remote_code."""
    out = tmp_path / "smol-hybrid"
    r = run_cli("convert", f"model={smollm2}", f"output_dir={out}", "plan.method=uniform", "plan.ratio=0.25")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["sparse_layers"] == [0, 4, 8, 12, 17, 21, 25, 29]
    code = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('salatrain', 'salatrain_kernels'):
            raise ModuleNotFoundError(name, name=name)
sys.meta_path.insert(0, Block())
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(out)!r})
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
x = tok("def fibonacci(n):", return_tensors="pt")
y = m.generate(**x, max_new_tokens=5, do_sample=False)
assert y.shape[1] == x["input_ids"].shape[1] + 5, y.shape
print(type(m).__module__)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "transformers_modules" in r.stdout


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one line on stderr, exit code 2, no output directory left behind.
# ---------------------------------------------------------------------------------------------------------------


def _not_hf(tmp_path):
    d = tmp_path / "not-hf"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    return d


def _unsupported(tmp_path, dense):
    d = tmp_path / "gpt2ish"
    shutil.copytree(dense, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _pickle_only(tmp_path, dense):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(dense / "config.json", d / "config.json")
    torch.save(load_dense_as_hybrid(dense).state_dict(), d / "pytorch_model.bin")
    return d


BAD = {
    "missing dir": (lambda t, d: t / "nope", ["plan.method=uniform"], "does not exist"),
    "not an HF checkpoint": (lambda t, d: _not_hf(t), ["plan.method=uniform"], "config.json is missing"),
    "unsupported family": (_unsupported, ["plan.method=uniform"], "unsupported model_type 'gpt2'"),
    "index out of range": (lambda t, d: d, ["plan.sparse_layers=[0,9]"], "out of range"),
    "ratio outside (0,1]": (lambda t, d: d, ["plan.method=uniform", "plan.ratio=1.5"], "ratio must be in (0, 1]"),
    "no plan": (lambda t, d: d, [], "exactly one of"),
    "pickle refused": (_pickle_only, ["plan.method=uniform"], "allow_pickle=true"),
    "unknown key": (lambda t, d: d, ["plan.method=uniform", "plan.ration=0.5"], "did you mean 'plan.ratio'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_fail_cleanly(dense_dirs, tmp_path, case):
    make_src, extra, message = BAD[case]
    src = make_src(tmp_path, dense_dirs["llama"])
    out = tmp_path / "out"
    r = run_cli("convert", f"model={src}", f"output_dir={out}", *extra)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_wrong_length_plan_file(dense_dirs, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"mixer_types": ["linear_attention"] * 3}))
    r = run_cli("convert", f"model={dense_dirs['llama']}", f"output_dir={tmp_path / 'o'}", f"plan.file={plan}")
    assert r.returncode == 2 and "3 mixer types for a 4-layer model" in r.stderr


def test_pickle_accepted_with_opt_in(dense_dirs, tmp_path):
    src = _pickle_only(tmp_path, dense_dirs["llama"])
    out = convert(ConvertConfig(model=str(src), output_dir=str(tmp_path / "h"), allow_pickle=True,
                                plan=PlanSettings(method="uniform")))
    assert (out / "model.safetensors").is_file()


def test_existing_output_is_never_clobbered(dense_dirs, tmp_path):
    out = tmp_path / "h"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli("convert", f"model={dense_dirs['llama']}", f"output_dir={out}", "plan.method=uniform")
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_corrupt_weights_leave_nothing(dense_dirs, tmp_path):
    src = tmp_path / "bad-shapes"
    shutil.copytree(dense_dirs["llama"], src)
    sd = {k: v for k, v in load_dense_as_hybrid(src).state_dict().items()}
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(src / "model.safetensors"))
    r = run_cli("convert", f"model={src}", f"output_dir={tmp_path / 'o'}", "plan.method=uniform")
    assert r.returncode == 2 and "has shape [3, 3]" in r.stderr
    assert not Path(tmp_path / "o").exists()


def test_a_source_without_a_tokenizer_converts_with_a_warning(tiny_lm_dir, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="salatrain.convert.convert"):
        convert(ConvertConfig(model=str(tiny_lm_dir), output_dir=str(tmp_path / "ok"),
                              plan=PlanSettings(method="uniform")))
    assert "tokenizer" not in caplog.text
    src = tmp_path / "src"
    shutil.copytree(tiny_lm_dir, src)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    with caplog.at_level("WARNING", logger="salatrain.convert.convert"):
        convert(ConvertConfig(model=str(src), output_dir=str(tmp_path / "out"), plan=PlanSettings(method="uniform")))
    assert "has no tokenizer files, so neither does the hybrid" in caplog.text
