"""Everything is validated before anything runs: every number of every schema has a range, sparse geometry is
consistent, lengths are checked against the memory they need, keys the chosen mode ignores are errors, and every
job of a -m sweep is checked before the first one starts. Each mistake is one line on stderr, exit status 2, and
nothing is written."""

import dataclasses
import importlib
import json
import os

import pytest
import torch

from salatrain.cli import main
from salatrain.commands import COMMANDS
from salatrain.config.ranges import RANGE, numeric_fields
from salatrain.errors import UserError
from salatrain.memory import ModelShape, Need, check_eval_memory
from tests.helpers.common import one_line_error

METRICS_12 = {"layers": {str(i): {"retrieval": 0.5 + 0.01 * i, "commonsense": 0.3 - 0.01 * i} for i in range(12)}}


def _schemas(cls, prefix=""):
    yield prefix, cls
    hints = __import__("typing").get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        for candidate in (tp, *__import__("typing").get_args(tp)):
            if dataclasses.is_dataclass(candidate):
                yield from _schemas(candidate, f"{prefix}{f.name}.")


def test_every_number_in_every_schema_has_a_range():
    missing, checked = [], 0
    for name, command in COMMANDS.items():
        schema = importlib.import_module(command.module).SCHEMA
        for prefix, cls in _schemas(schema):
            for f, _ in numeric_fields(cls):
                checked += 1
                if RANGE not in f.metadata:
                    missing.append(f"{name}: {prefix}{f.name}")
    assert checked > 60 and not missing, missing


@pytest.mark.parametrize("args, expected", [
    (["train", "recipe=tiny", "optim.lr=inf"], "optim.lr must be a finite number > 0 (got inf)"),
    (["train", "recipe=tiny", "optim.lr=nan"], "optim.lr must be a finite number > 0 (got nan)"),
    (["train", "recipe=tiny", "optim.lr=-1"], "optim.lr must be > 0 (got -1.0)"),
    (["train", "recipe=tiny", "optim.lr_new=0"], "optim.lr_new must be > 0"),
    (["train", "recipe=tiny", "optim.betas=[0.9,1.0]"], "optim.betas must be in [0, 1)"),
    (["train", "recipe=tiny", "trainer.seq_len=1"], "trainer.seq_len must be >= 2"),
    (["train", "recipe=tiny", "trainer.grad_clip=-1"], "trainer.grad_clip must be >= 0"),
    (["train", "recipe=tiny", "data.seed=-3"], "data.seed must be in [0, 4294967295]"),
    (["convert", "model=m", "plan.method=uniform", "sparse.block_size=0"], "sparse.block_size must be >= 1 (got 0)"),
    (["convert", "model=m", "plan.method=uniform", "sparse.block_size=-1"], "sparse.block_size must be >= 1"),
    (["convert", "model=m", "plan.method=uniform", "sparse.kernel_stride=64"],
     "sparse.kernel_stride=64 exceeds kernel_size=32"),
    (["convert", "model=m", "plan.method=uniform", "sparse.init_blocks=65"], "init_blocks=65 exceeds topk=64"),
    (["convert", "model=m", "plan.method=uniform", "sparse.dense_len_mode=doc"],
     "sparse.dense_len_mode must be position or sequence (got 'doc')"),
    (["convert", "model=m", "plan.method=uniform", "sparse.share_tokens=3"],
     "sparse.share_tokens must be one of 1, 2, 4, 8, 16 (got 3)"),
    (["convert", "model=m", "plan.method=uniform", "sparse.nope_logit_scale_base=1"],
     "sparse.nope_logit_scale_base must be > 1 (got 1.0)"),
    (["convert", "model=m", "plan.method=uniform", "lightning.chunk_size=0"], "lightning.chunk_size must be >= 1"),
    (["convert", "model=m", "plan.method=uniform", "lightning.norm_eps=0"], "lightning.norm_eps must be in (0, 1)"),
    (["convert", "model=m", "plan.method=uniform", "max_shard_size=lots"], "max_shard_size must be a positive size"),
    (["select", "num_layers=8", "method=uniform", "ratio=0"], "ratio must be in (0, 1]"),
    (["eval", "model=m", "probes.num_samples=0"], "probes.num_samples must be >= 1"),
    (["eval", "model=m", "chunk_tokens=0"], "chunk_tokens must be >= 1"),
])
def test_out_of_range_numbers_are_one_line_errors(tmp_path, capsys, args, expected):
    out = tmp_path / "out"
    one_line_error(capsys, main([*args, f"output_dir={out}"]), expected)
    assert not out.exists()


def test_sparse_geometry_of_a_checkpoint_is_checked(tmp_path, capsys):
    from salatrain.models import SalaHybridConfig
    from salatrain.train.tiny import resolve

    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        SalaHybridConfig(num_hidden_layers=1, sparse_config={"block_size": 0})
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(resolve("builtin:tiny-hybrid"), broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["sparse_config"]["kernel_stride"] = 0
    (broken / "config.json").write_text(json.dumps(cfg))
    one_line_error(capsys, main(["eval", f"model={broken}", f"output_dir={tmp_path / 'e'}"]),
                   "kernel_stride must be an integer >= 1")
    one_line_error(capsys, main(["train", "recipe=tiny", f"model.path={broken}", f"output_dir={tmp_path / 't'}"]),
                   "kernel_stride must be an integer >= 1")
    assert sorted(os.listdir(tmp_path)) == ["broken"]


def test_lengths_that_cannot_fit_in_memory_are_refused_with_what_fits(tiny_lm_dir, tiny_aligned_dir, tmp_path,
                                                                       capsys):
    out = tmp_path / "eval"
    err = one_line_error(capsys, main(["eval", f"model={tiny_lm_dir}", f"output_dir={out}",
                                       "probes.lengths=[1000000000]"]),
                         "probes.lengths with 1000000000 tokens needs ~", "GiB of memory", "is available",
                         "probes.lengths up to ~", "tokens fit", "chunk_tokens=")
    fit = int(err.split("up to ~")[1].split(" ")[0])
    assert 1000 < fit < 1_000_000_000
    err = one_line_error(capsys, main(["select", f"model={tiny_lm_dir}", f"aligned={tiny_aligned_dir}",
                                       f"output_dir={tmp_path / 'sel'}", "ratio=0.5",
                                       "sweep.probes.lengths=[1000000000]"]),
                         "sweep.probes.lengths with 1000000000 tokens needs ~", "cached layer inputs")
    assert not out.exists() and not (tmp_path / "sel").exists()


def test_memory_estimate_items_and_what_fits():
    shape = ModelShape(hidden=4096, intermediate=16384, layers=32, heads=32, kv_heads=2, head_dim=128,
                       vocab=73448, linear_layers=24, kv_layers=8, chunk=64, params=9_000_000_000, salatrain=True)
    need = Need("probes.lengths", 1 << 20, {"weights": 18e9}, {"activations": shape.forward_per_token(2)})
    need.check(int(need.total) + 1, "the GPU")  # fits: no error
    with pytest.raises(UserError) as e:
        need.check(int(need.total) - (1 << 30), "the GPU")
    msg = str(e.value)
    fit = int(msg.split("up to ~")[1].split(" ")[0])
    assert fit < 1 << 20 and fit > (1 << 20) * 0.9, msg
    small = dataclasses.replace(shape, params=1_000_000)
    check_eval_memory([small], [4096], 8, [1024], 16384, None, torch.device("cpu"), torch.float32)
    with pytest.raises(UserError, match="not even a short sequence fits"):
        Need("trainer.seq_len", 4096, {"optimizer states": 1e18}, {"layer inputs": 1.0}).check(1 << 30, "x")


@pytest.mark.parametrize("args, expected", [
    (["select", "metrics={metrics}", "num_layers=30"],
     "num_layers=30 is not used with metrics={metrics} (the metrics file gives the number of layers)"),
    (["select", "metrics={metrics}", "seed=3"], "seed=3 is not used unless method=random"),
    (["select", "metrics={metrics}", "sweep.probes.lengths=[512]"], "is not used without aligned="),
    (["convert", "model=m", "plan.sparse_layers=[0]", "plan.ratio=0.5"], "plan.ratio=0.5 is not used unless"),
    (["eval", "model=m", "lm_eval.limit=5"], "lm_eval.limit=5 is not used without lm_eval.tasks"),
    (["train", "recipe=tiny", "stage.kl_temperature=2"], "stage.kl_temperature=2 is not used by loss=lm"),
    (["train", "recipe=tiny", "teacher.path=t"], "teacher.path=t is not used by loss=lm (no teacher)"),
    (["train", "recipe=tiny", "optim.decay_fraction=0.2"], "is not used with optim.schedule=cosine"),
    (["train", "recipe=tiny", "stage=align", "model.path=m"], "model.path=m is not used by loss=mse_align"),
])
def test_keys_the_chosen_mode_ignores_are_errors(tmp_path, capsys, args, expected):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(METRICS_12))
    args = [a.format(metrics=metrics) for a in args]
    one_line_error(capsys, main([*args, f"output_dir={tmp_path / 'out'}"]),
                   expected.format(metrics=metrics), "drop it")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sweep, expected", [
    ("optim.lr=1e-3,abc", "[multirun 2/2] optim.lr=abc"),
    ("optim.lr=1e-3,-1", "[multirun 2/2] optim.lr=-1"),
    ("trainer.seq_len=128,1", "trainer.seq_len must be >= 2"),
])
def test_every_job_of_a_sweep_is_checked_before_the_first_runs(tmp_path, capsys, sweep, expected):
    code = main(["train", "recipe=tiny", "-m", sweep, f"output_dir={tmp_path / 'sweep'}"])
    one_line_error(capsys, code, expected)
    assert os.listdir(tmp_path) == [], "the first job did not run"


def test_a_sweep_into_foreign_directories_is_refused_before_running(tmp_path, dense_dirs, capsys):
    (tmp_path / "sweep" / "1").mkdir(parents=True)
    (tmp_path / "sweep" / "1" / "notes.txt").write_text("mine")
    code = main(["convert", "-m", f"model={dense_dirs['llama']}", "plan.method=uniform", "plan.ratio=0.25,0.5",
                 f"output_dir={tmp_path / 'sweep'}"])
    one_line_error(capsys, code, "[multirun 2/2]", "was not written by salatrain")
    assert sorted(os.listdir(tmp_path / "sweep")) == ["1"]


def test_a_sweep_whose_job_would_write_where_another_reads_is_refused(tmp_path, dense_dirs, capsys):
    """Job 1 of model=<A>,<sweep>/0 would write <sweep>/0 (with overwrite=true, replacing it) before job 2 reads
    it as its model: refused before anything runs, the second model left as it was."""
    import shutil

    second = tmp_path / "sweep" / "0"
    shutil.copytree(dense_dirs["llama"], second)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in second.iterdir())
    code = main(["convert", "-m", f"model={dense_dirs['llama']},{second}", "plan.method=uniform", "overwrite=true",
                 f"output_dir={tmp_path / 'sweep'}"])
    one_line_error(capsys, code, "[multirun 1/2]", "model (multirun job 2)", "never writes into its inputs")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in second.iterdir()) == before


@pytest.mark.parametrize("key, value, expected", [
    ("hidden_size", "64", 'hidden_size must be a positive integer, got "64"'),
    ("num_hidden_layers", 4.0, "num_hidden_layers must be a positive integer, got 4.0"),
    ("vocab_size", 0, "vocab_size must be a positive integer, got 0"),
    ("rms_norm_eps", "a", 'rms_norm_eps must be a number, got "a"'),
])
@pytest.mark.parametrize("command", ["convert", "eval", "bench", "train"])
def test_a_config_json_of_the_wrong_types_is_a_one_line_error(tmp_path, tiny_lm_dir, capsys, key, value, expected,
                                                              command):
    """Valid JSON whose sizes are not integers fails with the key named, not deep inside transformers."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_lm_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, key: value}))
    out = tmp_path / "out"
    args = {"convert": ["convert", f"model={bad}", "plan.method=uniform"],
            "eval": ["eval", f"model={bad}", "perplexity.seq_lens=[64]", "probes.tasks=[]"],
            "bench": ["bench", f"model={bad}", "lengths=[64]", "decode_tokens=2"],
            "train": ["train", "recipe=tiny", "stage=distill", f"teacher.path={bad}", "trainer.max_steps=1"]}[command]
    code = main([*args, f"output_dir={out}"])
    one_line_error(capsys, code, "config.json", expected)
    assert not out.exists()


def test_small_usability_errors(tmp_path, tiny_lm_dir, capsys):
    """eval with nothing to measure is refused; a plan.file that is a folder is named as one; -m before the
    command works as after it."""
    code = main(["eval", f"model={tiny_lm_dir}", "probes.tasks=[]", "perplexity.seq_lens=[]",
                 f"output_dir={tmp_path / 'e'}"])
    one_line_error(capsys, code, "nothing to measure")
    (tmp_path / "plan").mkdir()
    code = main(["convert", f"model={tiny_lm_dir}", f"plan.file={tmp_path / 'plan'}", f"output_dir={tmp_path / 'c'}"])
    one_line_error(capsys, code, "is a directory; give the layer_plan.json inside it")
    code = main(["-m", "convert", f"model={tiny_lm_dir}", "plan.method=uniform", "plan.ratio=0.25,abc",
                 f"output_dir={tmp_path / 'c'}"])
    one_line_error(capsys, code, "[multirun 2/2]")
    assert sorted(os.listdir(tmp_path)) == ["plan"]


def test_a_plan_file_whose_two_lists_disagree_is_refused(tmp_path, tiny_lm_dir, capsys):
    plan = tmp_path / "plan.json"
    mixers = ["sparse_attention", "linear_attention", "linear_attention", "sparse_attention"]
    plan.write_text(json.dumps({"mixer_types": mixers, "sparse_layers": [0, 2]}))
    code = main(["convert", f"model={tiny_lm_dir}", f"plan.file={plan}", f"output_dir={tmp_path / 'c'}"])
    one_line_error(capsys, code, "sparse_layers [0, 2] disagrees with the sparse layers of its mixer_types")
    plan.write_text(json.dumps({"mixer_types": mixers, "sparse_layers": [3, 0]}))
    assert main(["convert", f"model={tiny_lm_dir}", f"plan.file={plan}", f"output_dir={tmp_path / 'c'}"]) == 0


def test_an_output_dir_that_cannot_be_written_fails_before_any_work(tmp_path, tiny_lm_dir, capsys, monkeypatch):
    """(Injected: the probe file cannot be created, as in a read-only folder; root ignores permission bits.)"""
    import errno
    import tempfile

    def denied(*a, **k):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    code = main(["bench", f"model={tiny_lm_dir}", "lengths=[64]", "decode_tokens=2", f"output_dir={tmp_path / 'b'}"])
    one_line_error(capsys, code, "cannot be written (Permission denied in", "fix its permissions")
    assert os.listdir(tmp_path) == []
