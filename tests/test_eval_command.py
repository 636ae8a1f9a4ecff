"""`salatrain eval`: dense and hybrid dirs side by side, eval.json, the table; bad inputs exit 2 writing nothing."""

import json

import pytest

from salatrain.cli import main

SMALL = ["probes.lengths=[640]", "probes.num_samples=2", "perplexity.seq_lens=[128,256]",
         "perplexity.max_tokens=512"]


def test_eval_dense_and_hybrid(tiny_lm_dir, tiny_aligned_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    text = tmp_path / "held.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"line {i}: " + "lorem ipsum dolor " * 20}) for i in range(8)))
    rc = main(["eval", f"model={tiny_aligned_dir}", f"compare=[{tiny_lm_dir}]", "names=[hybrid,teacher]",
               f"output_dir={out}", f"perplexity.files=[{text}]", "probes.tasks=[passkey,kv_retrieval]", *SMALL])
    assert rc == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["format"] == "salatrain.eval/1"
    assert [m["name"] for m in report["models"]] == ["hybrid", "teacher"]
    assert report["models"][0]["kind"] == "hybrid" and report["models"][1]["kind"] == "dense"
    assert report["models"][0]["mixers"] == {"linear_attention": 4}
    for name in ("hybrid", "teacher"):
        res = report["results"][name]
        assert set(res["perplexity"]) == {"128", "256"}
        assert res["perplexity"]["256"]["tokens"] == 2 * 255
        assert set(res["probes"]) == {"passkey", "kv_retrieval"}
        assert res["probes"]["passkey"]["640"]["num_samples"] == 2
    table = capsys.readouterr().out
    assert "passkey @640 exact" in table and "perplexity @256" in table and "hybrid" in table


def test_eval_builtin_text(tiny_lm_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", f"model={tiny_lm_dir}", f"output_dir={out}", "probes.tasks=[passkey]", *SMALL]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["results"][tiny_lm_dir.name]["perplexity"]["128"]["windows"] == 4


@pytest.mark.parametrize("args, message", [
    (["model={missing}"], "does not exist"),
    (["model={model}", "probes.tasks=[passkey,needle]"], "unknown probe task"),
    (["model={model}", "probes.lengths=[8]"], "probes.lengths must be >= 32 (got 8)"),
    (["model={model}", "perplexity.files=[{missing}]"], "does not exist"),
    (["model={model}", "perplexity.builtin=wiki"], "perplexity.builtin"),
    (["model={model}", "names=[a,b]"], "names"),
    (["model={model}", "logging.wandb.mode=sometimes"], "logging.wandb.mode"),
    (["model={model}", "probes.lenghts=[8]"], "did you mean 'probes.lengths'"),
    (["model={model}", "lm_eval.tasks=[hellaswag]"], "lm-eval"),
    (["model={model}", "device=tpu"], "device must be auto, cpu, cuda or cuda:N (got 'tpu')"),
    (["model={model}", "device=cuda:99"], "device 'cuda:99': "),  # no CUDA here, or fewer than 100 devices
])
def test_eval_bad_inputs(tiny_lm_dir, tmp_path, capsys, args, message):
    out = tmp_path / "eval"
    fill = {"missing": tmp_path / "nope", "model": tiny_lm_dir}
    rc = main(["eval", f"output_dir={out}", *[a.format(**fill) for a in args]])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_eval_refuses_to_overwrite(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.json").write_text("{}")
    assert main(["eval", f"model={tiny_lm_dir}", f"output_dir={out}"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "eval.json").read_text() == "{}"
