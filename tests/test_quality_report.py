"""bench/quality_report.py: the seed-spread table of bench/quality_gpu.sh runs, from pipeline folders laid out
as that script writes them (eval.json files in salatrain eval's format)."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("quality_report", ROOT / "bench" / "quality_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(work: Path, name: str, plan: str, prose: float, code: float, passkey: list[float], tokens: int):
    def eval_json(model, ppl, probes):
        results = {model: {"perplexity": {"held": {"perplexity": ppl}}, "probes": probes},
                   "teacher": {"perplexity": {"held": {"perplexity": 10.0}}, "probes": probes}}
        return {"models": [{"name": model}, {"name": "teacher"}], "results": results}

    run = work / name
    probes = {"passkey": {str(n): {"exact_match": e, "answer_logprob": -0.1} for n, e in zip((2048, 4096), passkey)}}
    for sub, body in (("07_eval", eval_json("hybrid", prose, probes)), ("08_eval_code", eval_json(plan, code, {}))):
        (run / sub).mkdir(parents=True)
        (run / sub / "eval.json").write_text(json.dumps(body))
    (run / "05_distill").mkdir()
    (run / "05_distill" / "stage_report.json").write_text(json.dumps({"tokens": tokens, "steps": 1}))


def test_seed_spread_per_plan_at_equal_budget(tmp_path):
    _run(tmp_path, "uniform-seed1", "uniform", 17.6, 7.8, [1.0, 0.75], 100)
    _run(tmp_path, "uniform-seed2", "uniform", 18.1, 7.7, [0.5, 0.75], 100)
    _run(tmp_path, "uniform-seed0", "uniform", 19.0, 8.9, [0.5, 0.5], 60)   # another budget: not pooled
    _run(tmp_path, "halo-seed1", "halo", 20.0, 9.0, [0.0, 0.0], 100)        # one seed: no spread row
    report = _report()
    text = report.seed_spread(report.collect(tmp_path))
    rows = [line for line in text.splitlines() if line.startswith("| uniform")]
    assert rows == ["| uniform | 1, 2 | 100 | 17.60 / 18.10 | 0.50 | 7.80 / 7.70 | 0.10 | 0.88 / 0.62 | 0.25 |"]
    assert "| halo" not in text
    assert report.seed_spread(report.collect(tmp_path / "uniform-seed0" / "07_eval")) == ""


def test_reports_of_two_machines_merge_into_one_spread(tmp_path):
    report = _report()
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, "uniform-seed1", "uniform", 17.6, 7.8, [1.0, 0.75], 100)
    _run(b, "uniform-seed2", "uniform", 18.1, 7.7, [0.5, 0.75], 100)
    merged = report.merge([report.collect(a), json.loads(json.dumps(report.collect(b)))])
    assert list(merged) == ["uniform-seed1", "uniform-seed2"]
    assert "| uniform | 1, 2 | 100 | 17.60 / 18.10 | 0.50 |" in report.seed_spread(merged)
    _run(tmp_path / "c", "uniform-seed2", "uniform", 18.5, 7.7, [0.5, 0.75], 100)   # same name, other numbers
    try:
        report.merge([report.collect(b), report.collect(tmp_path / "c")])
    except SystemExit as e:
        assert "uniform-seed2 appears twice" in str(e)
    else:
        raise AssertionError("conflicting runs merged")
