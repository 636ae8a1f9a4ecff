"""The quickstart pipeline end to end on a tiny model (what CI runs), then resumed: finished steps are skipped,
a changed step is refused unless restarted, a step without its marker runs again."""

import json

import pytest

from salatrain.cli import main


TINY = [
    "budget.corpus_train_bytes=40000", "budget.corpus_heldout_bytes=4000",
    "budget.align_tokens=512", "budget.align_seq_len=128", "budget.align_batch_tokens=256",
    "steps.align.args.trainer.micro_batch_size=2",
    "budget.select_probe_len=300", "budget.select_text_tokens=128",
    "steps.select.args.ratio=0.5",
    "budget.distill_tokens=512", "budget.distill_seq_len=128", "budget.distill_batch_tokens=256",
    "steps.distill.args.trainer.micro_batch_size=2", "steps.distill.args.trainer.loss_chunk_tokens=128",
    "budget.eval_probe_lengths=[300,400]", "budget.eval_samples=1", "budget.eval_text_tokens=256",
    "steps.eval.args.perplexity.seq_lens=[256]",
]
NAMES = ["01_corpus", "02_align", "03_select", "04_convert", "05_distill", "06_eval"]


@pytest.fixture(scope="module")
def quickstart_run(tiny_lm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "out"
    args = ["quickstart", f"model={tiny_lm_dir}", f"output_dir={out}", *TINY]
    return out, args


def test_quickstart_on_a_tiny_model(quickstart_run, capsys):
    out, args = quickstart_run
    assert main(args) == 0
    printed = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == NAMES
    for name in NAMES:
        assert (out / name / ".pipeline_step.json").is_file()
    record = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in record["steps"]] == ["ran"] * 6
    plan = json.loads((out / "03_select" / "layer_plan.json").read_text())
    assert plan["source"]["mode"] == "sweep" and plan["source"]["aligned"] == str(out / "02_align")
    assert len(plan["sparse_layers"]) == 2
    hybrid = json.loads((out / "05_distill" / "config.json").read_text())
    assert [i for i, m in enumerate(hybrid["mixer_types"]) if m == "sparse_attention"] == plan["sparse_layers"]
    assert hybrid["sparse_config"]["dense_len"] == 256 and hybrid["sparse_config"]["block_size"] == 16
    report = json.loads((out / "06_eval" / "eval.json").read_text())
    assert [m["name"] for m in report["models"]] == ["hybrid", "teacher"]
    assert set(report["results"]["hybrid"]["probes"]["passkey"]) == {"300", "400"}
    assert "hybrid checkpoint (HF format): " + str(out / "05_distill") in printed.out
    assert "continue on a GPU" in printed.out and "[6/6] eval" in printed.err


def test_rerun_skips_finished_steps(quickstart_run, capsys):
    out, args = quickstart_run
    assert main(args) == 0
    record = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in record["steps"]] == ["skipped"] * 6


def test_changed_step_is_refused_then_restarted(quickstart_run, capsys):
    out, args = quickstart_run
    changed = args + ["budget.eval_samples=2"]
    assert main(changed) == 2
    assert "restart_from=eval" in capsys.readouterr().err
    assert main(changed + ["restart_from=eval"]) == 0
    record = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in record["steps"]] == ["skipped"] * 5 + ["ran"]
    assert json.loads((out / "06_eval" / "eval.json").read_text())["results"]["hybrid"]["probes"]["passkey"]["300"][
        "num_samples"] == 2


def test_unfinished_step_runs_again_with_the_steps_after_it(quickstart_run, capsys):
    out, args = quickstart_run
    (out / "05_distill" / ".pipeline_step.json").unlink()  # as if interrupted after its last checkpoint
    assert main(args + ["budget.eval_samples=2"]) == 0
    record = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in record["steps"]] == ["skipped"] * 4 + ["ran"] * 2
    assert f"distill ran again: deleting {out / '06_eval'}" in capsys.readouterr().err


def test_a_changed_model_is_refused_not_skipped(quickstart_run, capsys):
    """Finished steps are skipped only for the model they ran on (its fingerprint in pipeline.json)."""
    out, args = quickstart_run
    record = json.loads((out / "pipeline.json").read_text())
    assert len(record["model_fingerprint"]) == 16
    (out / "pipeline.json").write_text(json.dumps({**record, "model_fingerprint": "0" * 16}))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "changed since this pipeline's finished steps ran" in err and "restart_from=corpus" in err
