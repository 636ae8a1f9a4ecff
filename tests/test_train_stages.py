"""Training stages on DeepSpeed (CPU, gloo) with the built-in tiny models.

Most runs are in this process (one DeepSpeed warm-up for all); the multi-process and SIGKILL checks launch
`salatrain train` with torchrun / python. Every run shares one datasets cache, so the corpus is tokenized once.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from salatrain.cli import main
from salatrain.errors import UserError
from salatrain.train import compose_train, run_stage
from tests.helpers.common import data_cache, one_thread  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def train(out, data_cache, *overrides, steps=STEPS, keep_engine=False):
    cfg = compose_train("tiny", [f"output_dir={out}", f"trainer.max_steps={steps}", f"data.cache_dir={data_cache}",
                                 *overrides])
    return run_stage(cfg, keep_engine=keep_engine)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def launch_env() -> dict:
    """This process's environment minus the rendezvous variables its in-process runs set."""
    env = {k: v for k, v in os.environ.items() if k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, data_cache):
    """The reference: tiny lm stage, ZeRO-2, one process with 2 micro-batches of 2 rows per step."""
    out = tmp_path_factory.mktemp("lm") / "run"
    return train(out, data_cache, "trainer.save_every=2")


def test_lm_stage_loss_falls_and_writes_its_outputs(lm_run):
    rows = metrics(lm_run.output_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mem_gb"} <= set(rows[0])
    out = lm_run.output_dir
    for name in ("config.yaml", "config.json", "model.safetensors", "tokenizer.json", "modeling_sala_hybrid.py",
                 "stage_report.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "latest").read_text() == "step_00000006"
    assert not (out / "checkpoints" / ".partial").exists()  # nothing of a finished save is left half-way
    assert (out / "checkpoints" / "zero_to_fp32.py").is_file()
    assert json.loads((out / "stage_report.json").read_text())["final_loss"] == pytest.approx(rows[-1]["loss"])


def test_progress_lines_count_steps_and_the_time_left(tmp_path, data_cache, caplog):
    """Each logged step says where it stands in the run and, from the second step on, how long the rest takes at
    this run's mean step time (the first step, which compiles, is left out); the last step names no ETA."""
    from salatrain.tracking import progress_line

    with caplog.at_level("INFO", logger="salatrain.train"):
        train(tmp_path / "run", data_cache, "trainer.save_final=false", "trainer.export=false", steps=3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert "eta" not in lines[0] and " eta " in lines[1] and "eta" not in lines[2]
    row = {"step": 10, "loss": 2.0, "lr": 1e-4, "tokens_per_s": 1000.0, "mfu": 0.4}
    assert progress_line(row, 100, 2.0) == "step 10/100 loss 2.00000 lr 0.0001 1000 tok/s mfu 40.0% eta 3m00s"
    assert progress_line(row, 100, 100.0).endswith("eta 2h30m")
    assert progress_line({**row, "loss": None}, 100, None) == "step 10/100 loss skipped lr 0.0001 1000 tok/s mfu 40.0%"


def test_distill_stage_loss_falls(tmp_path, data_cache):
    r = train(tmp_path / "run", data_cache, "stage=distill", "deepspeed=zero1", "trainer.activation_checkpointing=true")
    rows = metrics(r.output_dir)
    assert rows[-1]["kl"] < rows[0]["kl"] and "lm_loss" in rows[0]


def test_align_stage_loss_falls_and_its_output_feeds_convert(tmp_path, data_cache):
    from salatrain.hf_checkpoint import CheckpointDir
    from salatrain.models import SalaHybridForCausalLM
    from salatrain.train.tiny import resolve

    r = train(tmp_path / "run", data_cache, "stage=align", "optim.lr=1e-2")
    rows = metrics(r.output_dir)
    assert rows[-1]["loss"] < rows[0]["loss"] / 2
    assert all(b < a for a, b in zip(rows[0]["align_mse"], rows[-1]["align_mse"]))
    report = json.loads((r.output_dir / "align_report.json").read_text())
    base = CheckpointDir(resolve("builtin:tiny-dense"))
    assert report["base_fingerprint"] == base.fingerprint()
    assert len(report["per_layer_mse"]) == 4 and report["tokens"] == STEPS * 512
    assert CheckpointDir(r.output_dir).config["mixer_types"] == ["linear_attention"] * 4
    aligned = SalaHybridForCausalLM.from_pretrained(r.output_dir)
    hybrid = tmp_path / "hybrid"
    assert main(["convert", f"model={base.path}", f"output_dir={hybrid}", "plan.sparse_layers=[0,3]",
                 f"aligned={r.output_dir}", "kl_check=false"]) == 0
    converted = SalaHybridForCausalLM.from_pretrained(hybrid)
    for i in (1, 2):
        z = aligned.model.layers[i].self_attn.z_proj.weight
        assert z.abs().sum() > 0 and torch.equal(converted.model.layers[i].self_attn.z_proj.weight, z)
    assert main(["export", f"checkpoint={r.output_dir}", f"output_dir={tmp_path / 'again'}"]) == 0
    again = SalaHybridForCausalLM.from_pretrained(tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), aligned.state_dict().values()))


def test_zero3_export_reloads_with_equal_logits(tmp_path, data_cache):
    from salatrain.models import SalaHybridForCausalLM
    from salatrain.train.engine import consolidated_state_dict

    r = train(tmp_path / "run", data_cache, "stage=distill", "deepspeed=zero3", steps=2, keep_engine=True)
    live = consolidated_state_dict(r.extras["engine"])
    exported = SalaHybridForCausalLM.from_pretrained(r.output_dir).eval()
    reference = SalaHybridForCausalLM(exported.config).eval()
    reference.load_state_dict({k[len("student."):]: v for k, v in live.items()})
    ids = torch.randint(0, 512, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(ids, use_cache=False).logits, reference(ids, use_cache=False).logits)
    assert main(["export", f"checkpoint={r.output_dir}", f"output_dir={tmp_path / 'again'}", "dtype=fp32"]) == 0
    again = SalaHybridForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(again(ids, use_cache=False).logits, reference(ids, use_cache=False).logits)


def test_non_finite_loss_skips_and_aborts_leaving_a_resumable_checkpoint(tmp_path, data_cache, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("SALATRAIN_FAULTS", "nan_loss@2")
    r = train(out, data_cache, "trainer.save_every=1", steps=3)
    rows = metrics(out)
    assert rows[1]["skipped"] is True and rows[1]["loss"] is None and rows[1]["bad_steps"] == 1
    assert r.final_loss == rows[2]["loss"] is not None
    monkeypatch.setenv("SALATRAIN_FAULTS", "nan_loss@4,5")
    with pytest.raises(UserError, match=r"^2 steps in a row \(up to step 5\) had a non-finite loss"):
        train(out, data_cache, "trainer.save_every=1", "trainer.max_bad_steps=2", steps=8)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    monkeypatch.delenv("SALATRAIN_FAULTS")
    r = train(out, data_cache, "trainer.save_every=1", steps=6)
    assert [row["step"] for row in metrics(out)] == list(range(1, 7)) and r.final_loss is not None


def test_bad_run_inputs_fail_before_training(tmp_path, data_cache, capsys, lm_run):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    out = tmp_path / "run"
    assert main(["train", "recipe=tiny", f"output_dir={out}", f"data.files=[{bad}]",
                 f"data.cache_dir={data_cache}"]) == 2
    assert f"{bad}:2: malformed JSON" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()
    assert main(["train", "recipe=tiny", f"output_dir={out}", "stage=distill", "teacher.path=null"]) == 2
    assert "needs a teacher" in capsys.readouterr().err
    assert main(["train", "recipe=tiny", f"output_dir={lm_run.output_dir}", "deepspeed=zero3"]) == 2
    assert "cannot resume from" in capsys.readouterr().err
    # a checkpoint of another architecture: refused by name before anything is written (it read as "corrupt")
    other = tmp_path / "other"
    assert main(["train", "recipe=tiny", f"output_dir={other}", "model=tiny_dense", f"data.cache_dir={data_cache}",
                 f"resume={lm_run.output_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "it was trained for another model (mixer_types [" in err and "resume=never" in err, err
    assert len(err.splitlines()) == 1 and not other.exists()


def test_resume_names_the_model_it_continues(tmp_path, data_cache, lm_run, caplog):
    """Resuming continues the checkpoint's weights: a model.path other than the one the run started from is
    named as unused, not silently ignored."""
    import shutil

    from salatrain.train.checkpoint import read_meta
    from salatrain.train.checkpoint import find_checkpoint

    ckpt = find_checkpoint(str(lm_run.output_dir), "resume")
    copy = tmp_path / "copy"
    shutil.copytree(read_meta(ckpt)["model"], copy)
    train(tmp_path / "run", data_cache, f"model.path={copy}", f"resume={ckpt}", steps=STEPS)
    warned = [r.getMessage() for r in caplog.records if "is not used" in r.getMessage()]
    assert len(warned) == 1 and f"model.path={copy} is not used: resuming from {ckpt}" in warned[0], warned


def test_seq_len_past_rope_training_length_warns(tmp_path, data_cache, caplog):
    train(tmp_path / "run", data_cache, "model=tiny_dense", "trainer.seq_len=512", "trainer.micro_batch_size=1",
          "trainer.global_batch_tokens=512", "trainer.export=false", steps=1)
    warned = [r.getMessage() for r in caplog.records if "RoPE" in r.getMessage()]
    assert warned and "trainer.seq_len=512 exceeds the 256 positions" in warned[0]


def test_wandb_offline_and_multirun(tmp_path, data_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "recipe=tiny", "-m", "trainer.seed=1,2", "output_dir=sweep", "trainer.max_steps=1",
                 "trainer.export=false", f"data.cache_dir={data_cache}", "logging=wandb_offline"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["sweep"]
    for n in ("0", "1"):
        assert (tmp_path / "sweep" / n / "wandb").is_dir() and len(metrics(tmp_path / "sweep" / n)) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigkill_while_saving_then_resume_ends_where_an_uninterrupted_run_does(tmp_path, data_cache, lm_run):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "salatrain.cli", "train", "recipe=tiny", f"output_dir={out}",
            f"trainer.max_steps={STEPS}", "trainer.save_every=2", f"data.cache_dir={data_cache}"]
    env = launch_env() | {"SALATRAIN_FAULTS": "kill_in_save@4"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    r = train(out, data_cache, "trainer.save_every=2")
    assert [row["step"] for row in metrics(out)] == list(range(1, STEPS + 1))
    assert r.final_loss == pytest.approx(lm_run.final_loss, rel=1e-4)


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, data_cache, lm_run):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), "-m", "salatrain.cli", "train", "recipe=tiny", f"output_dir={out}",
            f"trainer.max_steps={STEPS}", "deepspeed=zero2", f"data.cache_dir={data_cache}"]
    proc = subprocess.run(args, env=launch_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "stage_report.json").read_text())
    assert report["world_size"] == 2
    ours, ref = metrics(out), metrics(lm_run.output_dir)
    for a, b in zip(ours, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
