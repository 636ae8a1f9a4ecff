"""Output directories: no command writes into its inputs, a directory salatrain did not make is refused without
overwrite=true, nothing is created before the settings and inputs are checked, and one run holds a directory at a
time (a lock held by another, real, process is reported with its PID)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from salatrain.cli import main
from salatrain.errors import UserError
from salatrain.rundir import MARKER, OutputDir
from tests.helpers.common import one_line_error

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"layers": {str(i): {"retrieval": 0.5 + 0.1 * i, "commonsense": 0.3} for i in range(4)}}


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def dense(dense_dirs, tmp_path):
    """A private copy of a tiny dense checkpoint (the tests try to overwrite it)."""
    return Path(shutil.copytree(dense_dirs["llama"], tmp_path / "dense"))


@pytest.fixture
def hybrid(tmp_path):
    from salatrain.train.tiny import resolve

    return Path(shutil.copytree(resolve("builtin:tiny-hybrid"), tmp_path / "hybrid"))


def test_train_into_its_own_model_is_refused_and_the_model_untouched(hybrid, capsys):
    before = digest(hybrid)
    code = main(["train", "recipe=tiny", f"model.path={hybrid}", f"output_dir={hybrid}", "trainer.max_steps=1"])
    one_line_error(capsys, code, f"output_dir {hybrid} is the input model.path={hybrid}", "never writes into")
    assert digest(hybrid) == before and not (hybrid / "config.yaml").exists()


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_convert_never_replaces_its_source_even_with_overwrite(dense, where, capsys):
    out = {"same": dense, "inside": dense / "hybrid", "around": dense.parent}[where]
    before = digest(dense)
    code = main(["convert", f"model={dense}", f"output_dir={out}", "plan.method=uniform", "overwrite=true"])
    how = {"same": "is", "inside": "is inside", "around": "contains"}[where]
    one_line_error(capsys, code, f"{how} the input model={dense}")
    assert digest(dense) == before and not (dense / "hybrid").exists()


def test_every_command_refuses_an_output_dir_around_an_input(tmp_path, tiny_lm_dir, capsys):
    run = tmp_path / "run"
    metrics = run / "metrics.json"
    run.mkdir()
    metrics.write_text(json.dumps(METRICS))
    code = main(["select", f"metrics={metrics}", f"output_dir={run}", "overwrite=true"])
    one_line_error(capsys, code, "contains the input metrics=")
    code = main(["eval", f"model={tiny_lm_dir}", f"output_dir={tiny_lm_dir / 'eval'}"])
    one_line_error(capsys, code, "is inside the input model=")
    corpus = run / "corpus.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    code = main(["train", "recipe=tiny", f"data.files=[{corpus}]", f"output_dir={run}", "overwrite=true"])
    one_line_error(capsys, code, "contains the input data.files=")
    code = main(["train", "recipe=tiny", f"data.files=[{run}/*.jsonl]", f"output_dir={run}", "overwrite=true"])
    one_line_error(capsys, code, "contains the input data.files=")
    assert sorted(os.listdir(run)) == ["corpus.jsonl", "metrics.json"]


def test_a_directory_salatrain_did_not_make_is_refused_by_every_command(tmp_path, dense, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    (mine / "config.yaml").write_text("mine: true\n")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(METRICS))
    commands = [["train", "recipe=tiny"], ["convert", f"model={dense}", "plan.method=uniform"],
                ["select", f"metrics={metrics}"], ["eval", f"model={dense}"],
                ["bench", f"model={dense}", "lengths=[64]"],
                ["pipeline", "recipe=quickstart", f"model={dense}"]]
    for command in commands:
        code = main([*command, f"output_dir={mine}"])
        one_line_error(capsys, code, "was not written by salatrain", "overwrite=true")
    assert digest(mine) == {"config.json": hashlib.sha256(b'{"mine": true}').hexdigest(),
                            "config.yaml": hashlib.sha256(b"mine: true\n").hexdigest()}
    from salatrain.train import compose_train
    from salatrain.train.command import check

    check(compose_train("tiny", [f"output_dir={mine}", "overwrite=true"]))  # taken over only when asked


def test_a_directory_of_another_command_is_not_resumed(tmp_path, dense, capsys):
    converted = tmp_path / "converted"
    assert main(["convert", f"model={dense}", f"output_dir={converted}", "plan.method=uniform",
                 "kl_check=false"]) == 0
    capsys.readouterr()
    assert json.loads((converted / MARKER).read_text())["command"] == "convert"
    code = main(["train", "recipe=tiny", f"output_dir={converted}"])
    one_line_error(capsys, code, "holds the output of `salatrain convert`")
    code = main(["convert", f"model={dense}", f"output_dir={converted}", "plan.method=uniform"])
    one_line_error(capsys, code, "already exists and is not empty")


@pytest.mark.parametrize("bad", ["data.files=[{missing}]", "model.path={missing}", "optim.lr=nan",
                                 "trainer.seq_len=1"])
def test_train_creates_nothing_until_settings_and_inputs_are_checked(tmp_path, bad, capsys):
    out = tmp_path / "deep" / "run"
    code = main(["train", "recipe=tiny", f"output_dir={out}", bad.format(missing=tmp_path / "nope.jsonl")])
    one_line_error(capsys, code)
    assert os.listdir(tmp_path) == [], "no output_dir, no parent folders, no lock file left behind"


def test_lock_is_exclusive_and_released(tmp_path):
    out = tmp_path / "out"
    first, second = OutputDir(out, "train"), OutputDir(out, "train")
    with first:
        assert first.lock_path.is_file() and not out.exists()
        with pytest.raises(UserError, match=rf"in use by another salatrain run \(PID {os.getpid()} on "):
            second.lock()
    assert not first.lock_path.exists()
    with second:  # free again once released
        pass


HOLD = """
import sys, time
from salatrain.rundir import OutputDir
out = OutputDir(sys.argv[1], "convert")
out.lock()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_directory_held_by_another_process_fails_at_once_naming_its_pid(tmp_path, dense, capsys):
    out = tmp_path / "hybrid"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.time()
        code = main(["convert", f"model={dense}", f"output_dir={out}", "plan.method=uniform", "kl_check=false"])
        one_line_error(capsys, code, f"output_dir {out} is in use by another salatrain run (PID {holder.pid} on ")
        assert time.time() - t0 < 30 and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the lock died with its holder: the stale lock file is simply taken over
    assert main(["convert", f"model={dense}", f"output_dir={out}", "plan.method=uniform", "kl_check=false"]) == 0
    assert (out / "model.safetensors").is_file() and not (tmp_path / ".hybrid.lock").exists()


def test_a_glob_input_is_the_files_it_matches():
    """data.files=<dir>/*.jsonl: an output_dir beside the matched files is allowed (nothing it writes is matched),
    one that is a matched path is refused; a descending glob (**) still guards its whole folder."""
    from salatrain.rundir import check_not_input

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "a.jsonl").write_text("{}\n")
        check_not_input(d / "run", {"data.files": [str(d / "*.jsonl")]})
        with pytest.raises(UserError, match=r"is the input data.files="):
            check_not_input(d / "a.jsonl", {"data.files": [str(d / "*.jsonl")]})
        with pytest.raises(UserError, match=r"is inside the input data.files="):
            check_not_input(d / "run", {"data.files": [str(d / "**" / "*.jsonl")]})


def test_overwrite_replaces_what_another_command_left(tmp_path, tiny_lm_dir, capsys):
    """eval overwrite=true into a train run's folder replaces it: nothing of the run is kept under eval's marker."""
    from salatrain.rundir import read_marker, write_marker

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / "model.safetensors").write_bytes(b"x")
    write_marker(run, "train")
    assert main(["eval", f"model={tiny_lm_dir}", f"output_dir={run}", "overwrite=true", "probes.tasks=[]",
                 "perplexity.seq_lens=[64]", "perplexity.max_tokens=128"]) == 0
    assert "checkpoints" not in os.listdir(run) and "model.safetensors" not in os.listdir(run)
    assert read_marker(run)["command"] == "eval"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".run.old")]
