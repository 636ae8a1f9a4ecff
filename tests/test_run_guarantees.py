"""Training runs that go wrong end cleanly: a non-finite gradient is skipped like a non-finite loss, weights that
become non-finite stop the run with nothing saved or exported, a second run into the same output_dir (a real second
process) fails at once naming the first one's PID, and Ctrl-C ends a run with exit status 130, its last checkpoint
intact and no success message; running the same command again finishes the run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from salatrain.cli import main
from salatrain.errors import UserError
from salatrain.train import compose_train, run_stage
from tests.helpers.common import data_cache, one_thread  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def train(out, data_cache, *overrides, steps=4):
    cfg = compose_train("tiny", [f"output_dir={out}", f"trainer.max_steps={steps}", f"data.cache_dir={data_cache}",
                                 *overrides])
    return run_stage(cfg)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def cli_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


@pytest.mark.parametrize("zero,precision", [("zero0", "fp32"), ("zero1", "fp32"), ("zero2", "fp32"),
                                            ("zero0", "bf16"), ("zero1", "bf16"), ("zero2", "bf16")])
def test_a_non_finite_gradient_is_skipped_like_a_non_finite_loss(tmp_path, data_cache, monkeypatch, zero, precision):
    """Our AdamW skips the step under every ZeRO stage and precision (DeepSpeed's own per-parameter test is off)."""
    monkeypatch.setenv("SALATRAIN_FAULTS", "nan_grad@2")
    r = train(tmp_path / "run", data_cache, f"deepspeed={zero}", f"trainer.precision={precision}", steps=3)
    rows = metrics(r.output_dir)
    assert rows[1]["skipped"] is True and rows[1]["loss"] is None and rows[1]["bad_steps"] == 1
    assert rows[0].get("skipped") is None and rows[2].get("skipped") is None
    assert r.final_loss == rows[2]["loss"] is not None
    from salatrain.models import SalaHybridForCausalLM

    exported = SalaHybridForCausalLM.from_pretrained(r.output_dir)
    assert all(bool(torch.isfinite(p).all()) for p in exported.parameters())


@pytest.mark.parametrize("zero,precision", [("zero0", "fp32"), ("zero1", "fp32"), ("zero2", "fp32"),
                                            ("zero0", "bf16"), ("zero1", "bf16"), ("zero2", "bf16")])
def test_a_skipped_step_moves_no_parameter(tmp_path, data_cache, monkeypatch, zero, precision):
    """A step skipped for a non-finite gradient in one parameter leaves every parameter where it was: DeepSpeed
    steps the optimizer one parameter group at a time, so the decision must be made for the whole step, not per
    group. Two steps, the second skipped, end on the weights of one step."""
    from safetensors.torch import load_file

    settings = (f"deepspeed={zero}", f"trainer.precision={precision}")
    one = train(tmp_path / "one", data_cache, *settings, steps=1)
    monkeypatch.setenv("SALATRAIN_FAULTS", "nan_grad@2")
    two = train(tmp_path / "two", data_cache, *settings, steps=2)
    assert metrics(two.output_dir)[1]["skipped"] is True
    a, b = load_file(Path(one.output_dir) / "model.safetensors"), load_file(Path(two.output_dir) / "model.safetensors")
    moved = [n for n in a if not torch.equal(a[n], b[n])]
    assert not moved, f"{len(moved)} of {len(a)} tensors moved in the skipped step, e.g. {moved[:3]}"


def test_non_finite_weights_stop_the_run_with_nothing_saved_or_exported(tmp_path, data_cache, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("SALATRAIN_FAULTS", "nan_weights@3")
    with pytest.raises(UserError, match=r"^training diverged: the weights hold NaN or inf after step 3; nothing was "
                                        r"saved or exported\. Last finite checkpoint: .*step_00000002"):
        train(out, data_cache, "trainer.save_every=2", steps=3)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    assert not (out / "stage_report.json").exists() and not (out / "model.safetensors").exists()
    # the same through the CLI: exit status 2, one line
    monkeypatch.setenv("SALATRAIN_FAULTS", "nan_weights@1")
    other = tmp_path / "other"
    code = main(["train", "recipe=tiny", f"output_dir={other}", "trainer.max_steps=1",
                 f"data.cache_dir={data_cache}"])
    assert code == 2 and not (other / "model.safetensors").exists() and not (other / "checkpoints").exists()


def test_export_refuses_a_checkpoint_with_non_finite_weights(tmp_path, data_cache, capsys):
    r = train(tmp_path / "run", data_cache, steps=1)
    states = r.checkpoint / "mp_rank_00_model_states.pt"
    blob = torch.load(states, weights_only=False)
    next(iter(blob["module"].values())).view(-1)[0] = float("inf")  # a diverged checkpoint, made by hand
    torch.save(blob, states)
    assert main(["export", f"checkpoint={r.output_dir}", f"output_dir={r.output_dir}", "overwrite=true"]) == 2
    assert "contains the input checkpoint=" in capsys.readouterr().err  # export never replaces its own run
    out = tmp_path / "hf"
    assert main(["export", f"checkpoint={r.output_dir}", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds NaN or inf in 1 of" in err and "nothing exported" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_two_runs_into_one_output_dir_and_ctrl_c(tmp_path, data_cache):
    """Two real processes: the second fails at once naming the first; Ctrl-C stops the first with 130."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "salatrain.cli", "train", "recipe=tiny", f"output_dir={out}",
            f"data.cache_dir={data_cache}", "trainer.save_every=1"]
    first = subprocess.Popen([*args, "trainer.max_steps=100000"], env=cli_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints" / "latest").is_file():
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
            time.sleep(0.2)
        second = subprocess.run([*args, "trainer.max_steps=3"], env=cli_env(), capture_output=True, text=True,
                                timeout=240)
        err = second.stderr.strip()  # its only line: it stopped before loading data or a model
        assert second.returncode == 2 and len(err.splitlines()) == 1, err
        assert f"output_dir {out} is in use by another salatrain run (PID {first.pid} on " in err
        assert first.poll() is None
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("salatrain train: interrupted") and "stage lm done" not in err
    assert "Traceback" not in err
    latest = (out / "checkpoints" / "latest").read_text()
    step = int(latest.split("_")[1])
    assert (out / "checkpoints" / latest / "trainer_state.json").is_file() and step >= 1
    assert not (out / "stage_report.json").exists() and not (tmp_path / ".run.lock").exists()
    # the same command again resumes: every step logged once, the report agrees with the metrics
    r = train(out, data_cache, "trainer.save_every=1", steps=step + 2)
    rows = metrics(out)
    assert [row["step"] for row in rows] == list(range(1, step + 3)) and r.steps == step + 2
    assert json.loads((out / "stage_report.json").read_text())["steps"] == len(rows)


def test_a_stale_deepspeed_build_lock_does_not_hang_a_cpu_run(tmp_path):
    """DeepSpeed JIT-builds a shared-memory op at init on CPU behind a lock file; a run killed mid-build leaves the
    lock, and every later build waits on it forever. salatrain's CPU runs never build that op."""
    lock = tmp_path / "ext" / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    code = ("from salatrain.train import engine; import deepspeed.comm.comm as c; d = engine.init_distributed(); "
            "print(d.world_size, c.cdb.shm_comm_op)")
    env = {k: v for k, v in os.environ.items()  # not the process group this process may have joined
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), DS_ACCELERATOR="cpu")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["1", "None"]
    assert sorted(x.name for x in lock.parent.iterdir()) == ["lock"]  # nothing was built


def test_a_one_process_run_whose_port_is_taken_before_it_listens_picks_another():
    """Two runs launched side by side can both be handed one free port; the second to listen got EADDRINUSE and a
    traceback. Injected: the first two ports offered are held by another listener."""
    code = ("import os, socket\nfrom salatrain.train import engine\n"
            "busy = socket.socket(); busy.bind(('', 0)); busy.listen(); port = busy.getsockname()[1]\n"
            "offers = iter([port, port]); real = engine._free_port\n"
            "engine._free_port = lambda: next(offers, None) or real()\n"
            "d = engine.init_distributed()\n"
            "print(d.world_size, os.environ['MASTER_PORT'] != str(port))\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["1", "True"]


def test_a_built_in_asset_left_half_built_by_a_killed_process_is_rebuilt(tmp_path, monkeypatch):
    """A cache directory without its config.json (a build killed mid-way) is replaced, not an OSError."""
    from salatrain.train.tiny import VERSION, resolve

    monkeypatch.setenv("SALATRAIN_CACHE", str(tmp_path))
    stale = tmp_path / VERSION / "dense"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    out = Path(resolve("builtin:tiny-dense"))
    assert out == stale and (out / "config.json").is_file()
    assert not (out / "model.safetensors").read_bytes().startswith(b"partial")
