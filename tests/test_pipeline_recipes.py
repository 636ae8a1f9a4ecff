"""Every pipeline recipe composes, and every step's command composes and validates (train steps through the
stage recipes), without running anything; overrides and bad inputs give one-line errors."""

import json

import pytest

from salatrain.cli import main
from salatrain.errors import UserError
from salatrain.pipeline import compose_pipeline, pipeline_recipes
from salatrain.pipeline.runner import validate
from salatrain.pipeline.steps import flatten, format_value


def test_recipes_are_listed():
    assert {"halo", "sala", "quickstart"} <= set(pipeline_recipes())


KINDS = {
    "quickstart": ["corpus", "train", "select", "convert", "train", "eval"],
    "halo": ["train", "select", "convert", "train", "train", "eval"],
    "sala": ["train", "select", "convert"] + ["train"] * 7 + ["eval"],
    "halo_smollm2": ["train", "select", "convert", "train", "train", "eval"],
    "stepwise_smollm2": ["train", "select", "convert", "train", "train", "eval"],
    "halo_spread_smollm2": ["train", "select", "convert", "train", "train", "eval"],
    "uniform_smollm2": ["train", "convert", "train", "train", "eval"],
}


@pytest.mark.parametrize("recipe", sorted(KINDS))
def test_every_recipe_composes_and_validates(recipe, tiny_lm_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    ovr = [f"model={tiny_lm_dir}", f"output_dir={tmp_path / 'out'}", f"data=[{data}]", f"heldout=[{data}]",
           "steps.select.args.ratio=0.5"]  # the tiny model has 4 layers: 0.25 keeps 1, fewer than the 2 forced
    if recipe == "sala":
        ovr.append(f"budget.sft_data=[{data}]")
    if recipe.endswith("_smollm2"):  # as bench/quality_gpu.sh runs them: its own corpus, given as data
        ovr.append("steps.corpus.enabled=false")
        if recipe.startswith("uniform"):
            ovr = [o for o in ovr if not o.startswith("steps.select")] + ["steps.convert.args.plan.ratio=0.5"]
    cfg = compose_pipeline(recipe, ovr)
    assert cfg.name == recipe
    _, steps = validate(cfg)  # composes every step's command (train: the stage recipe) and validates it
    assert [s.kind for s in steps] == KINDS[recipe]
    numbers = [int(s.dir.name[:2]) for s in steps]  # numbered by position in the recipe, disabled steps too
    assert numbers == sorted(set(numbers)) and all(s.dir.name[2] == "_" for s in steps)
    if not recipe.endswith("_smollm2"):
        assert numbers == list(range(1, len(steps) + 1))
    assert all(s.dir.parent == (tmp_path / "out").resolve() for s in steps)
    assert not (tmp_path / "out").exists()


def test_given_data_wins_over_the_corpus_step(tiny_lm_dir, tmp_path):
    """quickstart data=[mine] trains on mine (it used to take the corpus step's files and ignore data= silently);
    held-out text still comes from the corpus step unless heldout= is given too."""
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"text": "hello"}\n')
    base = [f"model={tiny_lm_dir}", f"output_dir={tmp_path / 'out'}", "steps.select.args.ratio=0.5"]
    _, steps = validate(compose_pipeline("quickstart", [*base, f"data=[{mine}]"]))
    cmd = {s.name: " ".join(s.prepared.command) for s in steps}
    corpus = steps[0].dir
    for name in ("align", "distill"):
        assert f"data.files=[{mine}]" in cmd[name] and str(corpus / "train.jsonl") not in cmd[name]
    assert str(corpus / "heldout.jsonl") in cmd["eval"]
    _, steps = validate(compose_pipeline("quickstart", [*base, f"data=[{mine}]", f"heldout=[{mine}]"]))
    assert str(corpus / "heldout.jsonl") not in " ".join(steps[-1].prepared.command)


def test_halo_budgets_follow_the_paper(tiny_lm_dir, tmp_path):
    cfg = compose_pipeline("halo", [f"model={tiny_lm_dir}", f"output_dir={tmp_path}", "data=[x.jsonl]",
                                    "steps.select.args.ratio=0.5"])
    _, steps = validate(cfg)
    cmd = {s.name: s.prepared.command for s in steps}
    assert "trainer.max_steps=20000" in cmd["align"] and "recipe=halo_align" in cmd["align"]
    assert "trainer.max_steps=20000" in cmd["distill"] and "optim.lr=0.0001" in cmd["distill"]
    assert "trainer.max_steps=500" in cmd["finetune"]
    assert f"teacher.path={tiny_lm_dir.resolve()}" in cmd["distill"]
    assert f"model.path={steps[2].dir}" in cmd["distill"]  # distill trains the converted hybrid
    assert f"aligned={steps[0].dir}" in cmd["select"] and f"plan.file={steps[1].dir / 'layer_plan.json'}" in cmd[
        "convert"]


def test_quickstart_is_the_quickstart_pipeline(tmp_path, capsys):
    assert main(["quickstart", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "name: quickstart" in out and "dense_len: 256" in out and "output_dir: ./quickstart-out" in out
    assert main(["quickstart", "recipe=halo"]) == 2
    assert "quickstart runs recipe=quickstart" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["recipe=halox"], "did you mean 'halo'"),
    (["recipe=quickstart", "model={missing}"], "does not exist"),
    (["recipe=quickstart", "model={model}", "budget.align_tokens=oops"], "invalid configuration"),
    (["recipe=quickstart", "model={model}", "budget.distill_tokens=0"],
     "steps.distill.tokens must be >= 1 (got 0) (its value comes from budget.distill_tokens)"),
    (["recipe=quickstart", "model={model}", "steps.select.args.method=best"], "method must be one of"),
    (["recipe=quickstart", "model={model}"], "2 are forced"),
    (["recipe=quickstart", "model={model}", "steps.select.args.ratoi=0.5"], "ratoi"),
    (["recipe=quickstart", "model={model}", "steps.align.args.trainer.seq_len=100"], "multiple"),
    (["recipe=quickstart", "model={model}", "steps.corpus.args.sources=[wiki]"], "unknown source"),
    (["recipe=quickstart", "model={model}", "steps.corpus.enabled=false"], "training data"),
    (["recipe=quickstart", "model={model}", "restart_from=nothing"], "restart_from"),
    (["recipe=halo", "model={model}"], "training data"),
])
def test_pipeline_bad_inputs(tiny_lm_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    fill = {"missing": tmp_path / "nope", "model": tiny_lm_dir}
    ratio = [] if message == "2 are forced" else ["steps.select.args.ratio=0.5"]
    rc = main(["pipeline", f"output_dir={out}", *[a.format(**fill) for a in args], *ratio])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_override_values_are_hydra_safe():
    assert format_value("/a/b-c_d.jsonl") == "/a/b-c_d.jsonl"
    assert format_value("a b") == "'a b'"
    assert format_value("it's") == "'it\\'s'"
    assert format_value("true") == "'true'" and format_value("12") == "'12'"
    assert format_value([1, "x y", True, None]) == "[1,'x y',true,null]"
    assert flatten({"a": {"b": 1, "c": {"d": [1]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1], "e": {}}


def test_unknown_step_kind(tiny_lm_dir, tmp_path):
    with pytest.raises(UserError, match="unknown kind"):
        validate(compose_pipeline("quickstart", [f"model={tiny_lm_dir}", f"output_dir={tmp_path}",
                                                 "steps.select.args.ratio=0.5", "steps.eval.kind=bench"]))


def test_closing_words_say_how_far_the_hybrid_is_and_what_closes_the_gap(tmp_path):
    """The pipeline's last words (the quickstart's too): the hybrid's perplexity and probes against the teacher's
    from its eval step, the tokens it trained on, and the measured GPU budget that closes the gap."""
    from salatrain.pipeline.runner import Step, quality_gap
    from salatrain.pipeline.steps import Prepared

    def step(i, name, kind, outputs):
        d = tmp_path / f"0{i}_{name}"
        d.mkdir()
        return Step(i, name, kind, d, Prepared([kind], outputs, lambda: None, lambda: None))

    distill = step(1, "distill", "train", {"hybrid": "x"})
    (distill.dir / "stage_report.json").write_text(json.dumps({"tokens": 2560}))
    ev = step(2, "eval", "eval", {"eval": str(tmp_path / "eval.json")})
    assert quality_gap([distill, ev]) is None  # no eval.json yet: nothing to say
    def model(ppl, exact):
        return {"perplexity": {"512": {"perplexity": ppl}}, "probes": {"passkey": {"512": {"exact_match": exact}}}}

    (tmp_path / "eval.json").write_text(json.dumps({"results": {"hybrid": model(201.0, 0.5),
                                                                "teacher": model(16.75, 1.0)}}))
    text = quality_gap([distill, ev])
    assert "perplexity @512: 201.0 vs 16.8 (12.0x the teacher's)" in text
    assert "passkey @512 exact match: 0.50 vs 1.00" in text
    assert "trained on 2,560 tokens" in text and "docs/quality.md" in text and "1.03-1.04x" in text


def test_halo_spread_recipe_passes_spread_to_select(tiny_lm_dir, tmp_path):
    """halo_spread_smollm2 differs from halo_smollm2 only in the select step's spread=true."""
    base = [f"model={tiny_lm_dir}", f"output_dir={tmp_path / 'out'}", "data=[x.jsonl]", "heldout=[x.jsonl]",
            "steps.select.args.ratio=0.5", "steps.corpus.enabled=false"]
    commands = {}
    for recipe in ("halo_smollm2", "halo_spread_smollm2"):
        _, steps = validate(compose_pipeline(recipe, base))
        commands[recipe] = {s.name: s.prepared.command for s in steps}
    assert "spread=true" in commands["halo_spread_smollm2"]["select"]
    assert "spread=false" in commands["halo_smollm2"]["select"]
    def same(recipe):  # every other step's command, the W&B group (the recipe's name) aside
        return {name: [a for a in cmd if not a.startswith("logging.wandb.group=")]
                for name, cmd in commands[recipe].items() if name != "select"}

    assert same("halo_smollm2") == same("halo_spread_smollm2")
