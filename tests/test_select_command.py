"""`salatrain select`: metrics mode, sweep mode on a tiny model (activation reuse checked against plain
forwards), the plan feeding `salatrain convert`, and bad inputs (one line, exit 2, nothing written)."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from salatrain.cli import main
from salatrain.eval.probes import make_samples
from salatrain.hf_checkpoint import CheckpointDir
from salatrain.models.loading import dense_config, load_dense_as_hybrid
from salatrain.select.sweep import AlignedLayers
from salatrain.select.sweep import ActivationCache, swapped

METRICS = {"layers": {"0": {"retrieval": 0.6, "commonsense": 0.31}, "1": {"retrieval": 0.2, "commonsense": 0.3},
                      "2": {"retrieval": 0.55, "commonsense": 0.1}, "3": {"retrieval": 0.6, "commonsense": 0.3}}}
SWEEP = ["sweep.probes.tasks=[passkey,kv_retrieval]", "sweep.probes.lengths=[320]", "sweep.probes.num_samples=2",
         "sweep.text.seq_len=128", "sweep.text.max_tokens=256"]


@pytest.fixture
def metrics_file(tmp_path):
    p = tmp_path / "metrics.json"
    p.write_text(json.dumps(METRICS))
    return p


def test_metrics_mode_writes_plan_and_png(metrics_file, tmp_path, capsys):
    out = tmp_path / "sel"
    assert main(["select", f"metrics={metrics_file}", f"output_dir={out}", "ratio=0.5", "keep_first=false",
                 "keep_last=false"]) == 0
    plan = json.loads((out / "layer_plan.json").read_text())
    # drops R: [0, .4, .05, 0], C: [0, .01, .21, .01] → scores [0, 40, .238, 0]
    assert plan["sparse_layers"] == [1, 2]
    assert plan["mixer_types"] == ["linear_attention", "sparse_attention", "sparse_attention", "linear_attention"]
    assert plan["method"] == "halo" and plan["num_kept"] == 2 and plan["ratio"] == 0.5
    assert plan["seed"] is None  # only method=random draws layers from a seed
    assert plan["layers"][1]["score"] == pytest.approx(40.0)
    assert plan["source"]["mode"] == "metrics"
    assert set(plan["cost"]) >= {"tokens", "seconds"}
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert "sparse" in capsys.readouterr().out
    rand = tmp_path / "rand"
    assert main(["select", f"metrics={metrics_file}", f"output_dir={rand}", "method=random", "seed=3",
                 "ratio=0.5"]) == 0
    assert json.loads((rand / "layer_plan.json").read_text())["seed"] == 3


def test_sweep_mode_on_tiny_model(tiny_lm_dir, tiny_aligned_dir, tmp_path):
    out = tmp_path / "sel"
    assert main(["select", f"model={tiny_lm_dir}", f"aligned={tiny_aligned_dir}", f"output_dir={out}", "ratio=0.5",
                 "keep_last=false", *SWEEP]) == 0
    plan = json.loads((out / "layer_plan.json").read_text())
    assert plan["source"]["mode"] == "sweep" and plan["num_kept"] == 2 and 0 in plan["sparse_layers"]
    assert all(isinstance(r["retrieval"], float) and isinstance(r["commonsense"], float) for r in plan["layers"])
    assert plan["cost"]["tokens"] > 0 and plan["cost"]["full_forward_equivalents"] == 3.5  # (L + 1)/2 + 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert [metrics["layers"][str(i)]["retrieval"] for i in range(4)] == [r["retrieval"] for r in plan["layers"]]
    # the sweep's metrics file can be re-scored with another method without sweeping again
    again = tmp_path / "again"
    assert main(["select", f"metrics={out / 'metrics.json'}", f"output_dir={again}", "method=retrieval",
                 "ratio=0.5", "keep_last=false"]) == 0
    # and the plan converts, with the aligned Lightning weights in the linear layers
    conv = tmp_path / "hybrid"
    assert main(["convert", f"model={tiny_lm_dir}", f"plan.file={out / 'layer_plan.json'}",
                 f"aligned={tiny_aligned_dir}", f"output_dir={conv}", "kl_check=false"]) == 0
    report = json.loads((conv / "conversion_report.json").read_text())
    assert report["sparse_layers"] == plan["sparse_layers"]


def test_activation_reuse_matches_plain_forward(tiny_lm_dir, tiny_aligned_dir):
    """Starting layer i from the cached input equals a full forward of the model with layer i swapped."""
    base = CheckpointDir(tiny_lm_dir)
    model = load_dense_as_hybrid(base)
    aligned = AlignedLayers(str(tiny_aligned_dir), base, dense_config(base))
    s = make_samples(AutoTokenizer.from_pretrained(tiny_lm_dir), "passkey", 300, 1)[0]
    ids = torch.tensor([s.prompt_ids + s.answer_ids])
    with torch.no_grad():
        cache = ActivationCache(model, ids)
        ref = model.model(ids, use_cache=False).last_hidden_state
        assert torch.allclose(cache.final, ref, atol=1e-5)
        for i in range(4):
            with swapped(model, i, aligned.layer(i, torch.float32, "cpu")):
                ref = model.model(ids, use_cache=False).last_hidden_state
                assert torch.allclose(cache.run_from(model, i), ref, atol=1e-5), i
            assert not torch.allclose(cache.run_from(model, i), ref, atol=1e-5)  # the swap was undone


@pytest.mark.parametrize("args, message", [
    (["metrics={missing}"], "does not exist"),
    (["metrics={bad_json}"], "not valid JSON"),
    (["metrics={gap}"], "without gaps"),
    (["metrics={nan}"], "finite number"),
    (["metrics={metrics}", "aligned={model}"], "not both"),
    (["metrics={metrics}", "method=best"], "method must be"),
    (["metrics={metrics}", "ratio=0"], "ratio"),
    (["metrics={metrics}", "include=[9]"], "out of range"),
    (["metrics={metrics}"], "forced"),  # 4 layers × 0.25 → n = 1 < 2 forced
    (["method=halo", "num_layers=4"], "needs per-layer metrics"),
    (["method=uniform"], "layer count"),
    (["aligned={model}", "ratio=0.5"], "needs model="),
    (["model={model}", "aligned={missing}", "ratio=0.5"], "does not exist"),
    (["model={model}", "aligned={model}", "ratio=0.5"], "not an align output"),
    (["model={model}", "aligned={aligned}", "ratio=0.5", "sweep.probes.tasks=[passkey]",
      "sweep.probes.lengths=[64]"], "too short"),
    (["model={model}", "aligned={aligned}", "ratio=0.5", "sweep.retrieval_metric=f1"], "retrieval_metric"),
    (["metrics={metrics}", "ratio=0.5", "sweep.probes.lenghts=[1]"], "did you mean 'sweep.probes.lengths'"),
    (["method=uniform", "num_layers=8", "spread=true"], "spread=true"),
    (["model={model}", "aligned={aligned}", "ratio=0.5", "sweep.device=tpu"], "device must be auto, cpu, cuda"),
])
def test_select_bad_inputs(tiny_lm_dir, tiny_aligned_dir, metrics_file, tmp_path, capsys, args, message):
    files = {"bad_json": "{layers:", "gap": json.dumps({"layers": {"0": METRICS["layers"]["0"],
                                                                    "2": METRICS["layers"]["2"]}}),
             "nan": json.dumps({"layers": {"0": {"retrieval": "high", "commonsense": 0.1}}})}
    fill = {"missing": tmp_path / "nope", "model": tiny_lm_dir, "aligned": tiny_aligned_dir, "metrics": metrics_file}
    for name, text in files.items():
        (tmp_path / f"{name}.json").write_text(text)
        fill[name] = tmp_path / f"{name}.json"
    out = tmp_path / "sel"
    rc = main(["select", f"output_dir={out}", *[a.format(**fill) for a in args]])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_select_refuses_a_non_empty_output_dir(metrics_file, tmp_path, capsys):
    out = tmp_path / "sel"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["select", f"metrics={metrics_file}", f"output_dir={out}", "ratio=0.5"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_wandb_offline_logs_the_plan(metrics_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sel"
    assert main(["select", f"metrics={metrics_file}", f"output_dir={out}", "ratio=0.5", "keep_last=false",
                 "logging.wandb.mode=offline", "logging.wandb.project=salatrain-test"]) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert not (tmp_path / "wandb").exists()  # nothing outside output_dir


def test_the_sweep_scores_other_probe_samples_than_eval_by_default():
    """The sweep chooses layers on probe samples the eval does not score (seed 1 vs 0), also under a recipe that
    sets the sweep's tasks, lengths and sample count but no seed."""
    from salatrain.commands import resolve

    sel = resolve("select", ["sweep.probes.num_samples=8"]).compose()
    ev = resolve("eval", []).compose()
    assert sel.sweep.probes.seed == 1 and sel.sweep.probes.num_samples == 8
    assert ev.probes.seed == 0


def _full_forward_r(model, aligned, samples, attention_at: set[int]) -> float:
    """R of the model with attention at ``attention_at`` and aligned Lightning elsewhere, by plain forwards
    (eval's score_sample), independently of the sweep's cached activations."""
    from contextlib import ExitStack

    from salatrain.eval.scoring import score_sample

    with ExitStack() as stack, torch.no_grad():
        for i in range(len(model.model.layers)):
            if i not in attention_at:
                stack.enter_context(swapped(model, i, aligned.layer(i, torch.float32, "cpu")))
        by_task = {}
        for s in samples:
            by_task.setdefault(s.task, []).append(score_sample(model, s).answer_logprob)
    return sum(sum(v) / len(v) for v in by_task.values()) / len(by_task)


def test_stepwise_keeps_the_layer_that_helps_most_given_those_kept_before(tiny_lm_dir, tiny_aligned_dir, tmp_path):
    """method=stepwise: from all-linear, each step keeps the layer whose restored attention gives the highest R
    with the layers kept so far; checked step by step against plain forwards of each candidate model."""
    out = tmp_path / "sel"
    assert main(["select", f"model={tiny_lm_dir}", f"aligned={tiny_aligned_dir}", f"output_dir={out}",
                 "method=stepwise", "ratio=0.5", "keep_first=false", "keep_last=false", *SWEEP]) == 0
    plan = json.loads((out / "layer_plan.json").read_text())
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    base = CheckpointDir(tiny_lm_dir)
    model = load_dense_as_hybrid(base)
    aligned = AlignedLayers(str(tiny_aligned_dir), base, dense_config(base))
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    samples = [x for task in ("passkey", "kv_retrieval") for x in make_samples(tok, task, 320, 2, 1)]
    kept = set()
    for step in steps:
        assert step["kept_before"] == sorted(kept)
        r = {j: _full_forward_r(model, aligned, samples, kept | {j}) for j in range(4) if j not in kept}
        assert {int(j): m["retrieval"] for j, m in step["candidates"].items()} == pytest.approx(r, abs=1e-4)
        assert step["chosen"] == max(r, key=r.get)
        kept.add(step["chosen"])
    assert len(steps) == 2 and plan["sparse_layers"] == sorted(kept) and plan["method"] == "stepwise"
    assert plan["source"]["order"] == [s["chosen"] for s in steps]
    chosen = steps[1]["chosen"]
    row = plan["layers"][chosen]
    assert row["kept"] and row["score"] == pytest.approx(steps[1]["candidates"][str(chosen)]["retrieval"]
                                                          - steps[1]["start"]["retrieval"])
    assert row["retrieval_gain"] == row["score"] and row["retrieval_drop"] is None
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"


def test_stepwise_counts_forced_layers_and_needs_the_sweep(tiny_lm_dir, tiny_aligned_dir, metrics_file, tmp_path,
                                                            capsys):
    out = tmp_path / "sel"
    assert main(["select", f"model={tiny_lm_dir}", f"aligned={tiny_aligned_dir}", f"output_dir={out}",
                 "method=stepwise", "ratio=0.75", "exclude=[1]", *SWEEP]) == 0
    plan = json.loads((out / "layer_plan.json").read_text())
    assert plan["sparse_layers"] == [0, 2, 3] and plan["source"]["order"] == [2]  # 0 and 3 forced, 1 excluded
    assert plan["layers"][0]["retrieval"] is None and plan["layers"][0]["forced"] == "keep_first"
    capsys.readouterr()
    assert main(["select", f"metrics={metrics_file}", f"output_dir={tmp_path / 'm'}", "method=stepwise",
                 "ratio=0.5"]) == 2
    assert "method=stepwise" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert main(["select", f"model={tiny_lm_dir}", f"aligned={tiny_aligned_dir}", f"output_dir={tmp_path / 'l'}",
                 "method=stepwise", "ratio=0.5", "sweep.retrieval_tasks=[ruler_qa_squad]"]) == 2
    assert "drop sweep.retrieval_tasks" in capsys.readouterr().err and not (tmp_path / "l").exists()
