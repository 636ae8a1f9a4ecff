"""The lm-eval-harness adapter, against a stand-in `lm_eval` package (the real one needs the hub): task metrics
reach eval.json, and the sweep scores each layer swap with the tasks (the stand-in sees which layer is linear)."""

import importlib.machinery
import json
import sys
import types

import pytest

from salatrain.cli import main
from salatrain.models.modeling_sala_hybrid import LightningAttention


@pytest.fixture
def fake_lm_eval(monkeypatch):
    calls = []

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            self.model = pretrained

    def simple_evaluate(model, tasks, limit=None, num_fewshot=None):
        layers = model.model.model.layers
        linear = [i for i, layer in enumerate(layers) if isinstance(layer.self_attn, LightningAttention)]
        calls.append((list(tasks), linear))
        score = 1.0 - 0.1 * (linear[0] + 1) if linear else 1.0  # early layers matter less here
        return {"results": {t: {"alias": t, "acc,none": score, "acc_stderr,none": 0.01} for t in tasks}}

    root = types.ModuleType("lm_eval")
    root.__spec__ = importlib.machinery.ModuleSpec("lm_eval", None)
    root.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    for name, mod in (("lm_eval", root), ("lm_eval.models", models), ("lm_eval.models.huggingface", hf)):
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_eval_reports_lm_eval_tasks(fake_lm_eval, tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", f"model={tiny_lm_dir}", f"output_dir={out}", "probes.tasks=[]", "perplexity.builtin=none",
                 "lm_eval.tasks=[hellaswag,arc_easy]", "lm_eval.limit=5"]) == 0
    res = json.loads((out / "eval.json").read_text())["results"][tiny_lm_dir.name]["lm_eval"]
    assert res["hellaswag"] == {"acc": 1.0, "primary": 1.0}
    assert "lm-eval arc_easy" in capsys.readouterr().out


def test_sweep_with_lm_eval_commonsense(fake_lm_eval, tiny_lm_dir, tiny_aligned_dir, tmp_path):
    out = tmp_path / "sel"
    assert main(["select", f"model={tiny_lm_dir}", f"aligned={tiny_aligned_dir}", f"output_dir={out}",
                 "ratio=0.5", "keep_last=false", "sweep.commonsense_tasks=[hellaswag]",
                 "sweep.probes.tasks=[passkey]", "sweep.probes.lengths=[300]", "sweep.probes.num_samples=1"]) == 0
    plan = json.loads((out / "layer_plan.json").read_text())
    assert [c[1] for c in fake_lm_eval] == [[], [0], [1], [2], [3]]  # baseline, then one layer linear at a time
    assert [r["commonsense"] for r in plan["layers"]] == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert plan["baseline"]["commonsense"] == 1.0
    assert "lm-eval ['hellaswag']" in plan["source"]["commonsense"]
    assert plan["cost"]["lm_eval_runs"] == 5
