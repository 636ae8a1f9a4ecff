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


def _distilled(work: Path, name: str, prose: float, code: float):
    for kind, ppl in (("prose", prose), ("code", code)):
        d = work / name / f"09_eval_distilled_{kind}"
        d.mkdir(parents=True)
        d.joinpath("eval.json").write_text(json.dumps({"models": [{"name": name}], "results": {
            name: {"perplexity": {"held": {"perplexity": ppl}}, "probes": {}}}}))


def test_finetune_effect_and_tagged_variants(tmp_path):
    """Runs scored before the long-context finetune get a before/after row with ratios to the teacher (10.0 in
    these files); a tagged variant (<plan>-<tag>-seed<N>) is its own plan, never pooled with the plain recipe."""
    _run(tmp_path, "uniform-seed1", "uniform", 17.6, 7.8, [1.0, 0.75], 100)
    _run(tmp_path, "uniform-lr1e-3-seed1", "uniform-lr1e-3", 16.0, 7.0, [1.0, 1.0], 100)
    _run(tmp_path, "uniform-lr1e-3-seed2", "uniform-lr1e-3", 16.5, 7.5, [1.0, 0.5], 100)
    _distilled(tmp_path, "uniform-lr1e-3-seed1", 15.0, 6.5)
    report = _report()
    runs = report.collect(tmp_path)
    text = report.table(runs)
    assert ("| uniform-lr1e-3-seed1 | 15.00 (1.50×) | 16.00 (1.60×) | 6.50 (0.65×) | 7.00 (0.70×) |"
            in text.splitlines())
    assert "| uniform-seed1 | 1" not in text.split("finetune's effect")[1]   # no distilled scores: no row
    assert "| uniform-lr1e-3 | 1, 2 | 100 | 16.00 / 16.50 | 0.50 |" in report.seed_spread(runs)
    assert "| uniform | " not in report.seed_spread(runs)
    assert report.finetune_effect({"uniform-seed1": runs["uniform-seed1"]}, (10.0, 10.0)) == ""
