"""`salatrain train` configuration: recipes compose, typos are one-line errors with a suggestion, --cfg job and
-m work without writing anything, schedules and trainable sets behave."""

import math
import os

import pytest
import torch

from salatrain.cli import main
from salatrain.errors import UserError
from salatrain.train import compose_train
from salatrain.train.command import stage_recipes
from salatrain.train.config import validate
from salatrain.train.optim import lr_factor, param_groups, select_trainable

STAGE_RECIPES = ["halo_align", "halo_distill", "halo_finetune", "sala_decay", "sala_longdecay", "sala_sft",
                 "sala_stable", "tiny"]


def test_every_stage_recipe_composes_and_validates():
    assert set(STAGE_RECIPES) <= set(stage_recipes())
    for name in STAGE_RECIPES:
        loss = compose_train(name).stage.loss
        paths = {"mse_align": ["teacher.path=t"], "kl": ["model.path=m", "teacher.path=t"]}.get(loss, ["model.path=m"])
        cfg = compose_train(name, [*paths, "data.files=[d.jsonl]", "output_dir=o"])
        validate(cfg)
        assert cfg.trainer.global_batch_tokens % cfg.trainer.seq_len == 0
    assert compose_train("halo_align").stage.loss == "mse_align"
    assert compose_train("halo_distill").stage.loss == "kl"
    assert compose_train("sala_stable").stage.sparse_attention is False
    assert compose_train("sala_longdecay").deepspeed.zero_stage == 3


def test_overrides_reach_the_typed_config():
    cfg = compose_train("tiny", ["stage=distill", "deepspeed=zero3", "trainer.max_steps=7",
                                 "logging.wandb.mode=offline", "optim.schedule=wsd", "resume=never"])
    assert (cfg.stage.loss, cfg.deepspeed.zero_stage, cfg.trainer.max_steps) == ("kl", 3, 7)
    assert (cfg.logging.wandb.mode, cfg.optim.schedule, cfg.resume) == ("offline", "wsd", "never")


@pytest.mark.parametrize("args, expected", [
    (["trainer.max_step=3"], "unknown config key 'trainer.max_step'; did you mean 'trainer.max_steps'?"),
    (["trainer.seqlen=3"], "did you mean 'trainer.seq_len'?"),
    (["stage=algn"], "available: align, distill, lm"),
    (["optim.lr=fast"], "optim.lr"),
    (["stage=distill", "teacher.path=null", "output_dir=x"], "needs a teacher: pass teacher.path"),
    (["deepspeed.zero_stage=4", "output_dir=x"], "deepspeed.zero_stage must be in [0, 3] (got 4)"),
    (["trainer.global_batch_tokens=100", "output_dir=x"], "not a multiple of trainer.seq_len"),
    (["logging.wandb=true"], "logging.wandb is a group of settings (mode, project, entity, group, name, tags), not "
                             "one value; set one of them, e.g. logging.wandb.mode=..."),
])
def test_config_mistakes_are_one_line_errors(capsys, args, expected):
    assert main(["train", "recipe=tiny", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err


@pytest.mark.parametrize("command, listing", [("train", "stage recipes: halo_align"),
                                               ("pipeline", "pipeline recipes: halo")])
def test_help_without_a_recipe_lists_the_recipes(capsys, command, listing):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"usage: salatrain {command} recipe=<name>") and listing in out.out and not out.err


def test_recipe_is_required_and_checked(capsys):
    assert main(["train", "output_dir=x"]) == 2
    assert "missing recipe=<name>; stage recipes: halo_align" in capsys.readouterr().err
    assert main(["train", "recipe=tinny"]) == 2
    assert "did you mean 'tiny'?" in capsys.readouterr().err


def test_cfg_job_and_multirun_print_without_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "recipe=halo_align", "model.path=m", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "loss: mse_align" in out and "seq_len: 512" in out and "path: m" in out
    assert main(["train", "recipe=tiny", "-m", "trainer.seed=1,2", "output_dir=sweep", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert out.count("seed: 1") == 1 and out.count("seed: 2") == 1 and "output_dir: sweep/1" in out
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "wsd", "exponential"])
def test_schedules_warm_up_then_decay_to_min(schedule):
    from salatrain.train.config import OptimSettings

    opt = OptimSettings(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    f = [lr_factor(s, 100, opt) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b - 1e-12 for a, b in zip(f[10:], f[11:])), "non-increasing after warmup"
    end = 1.0 if schedule == "constant" else 0.1
    assert math.isclose(lr_factor(100, 100, opt), end, rel_tol=1e-9)
    if schedule == "wsd":
        assert f[79] == 1.0 and f[85] < 1.0


def test_trainable_sets_and_new_parameter_groups():
    from salatrain.models import SalaHybridConfig, SalaHybridForCausalLM
    from salatrain.train.config import OptimSettings

    cfg = SalaHybridConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2,
                           mixer_types=["sparse_attention", "linear_attention", "full_attention"])
    named = dict(SalaHybridForCausalLM(cfg).named_parameters())
    mixers = list(cfg.mixer_types)
    chosen = select_trainable(named, ["linear_attention"], mixers, False)
    assert chosen and all(n.startswith("model.layers.1.self_attn.") for n in chosen)
    assert not named["model.layers.0.self_attn.g_proj.weight"].requires_grad
    chosen = select_trainable(named, ["model.layers.0.mlp.*"], mixers, False)
    assert "model.layers.0.self_attn.g_proj.weight" in chosen, "a sparse layer's gate trains with its layer"
    chosen = select_trainable(named, ["all"], mixers, False)
    groups = param_groups(named, chosen, OptimSettings(lr=1e-4, lr_new=1e-3, weight_decay=0.1), mixers, False)
    by_name = {g["name"]: g for g in groups}
    new_ids = {id(p) for p in by_name["new"]["params"]} | {id(p) for p in by_name["new_no_decay"]["params"]}
    assert id(named["model.layers.1.self_attn.z_proj.weight"]) in new_ids
    assert id(named["model.layers.1.self_attn.q_norm.weight"]) in new_ids
    assert id(named["model.layers.0.self_attn.q_proj.weight"]) not in new_ids
    assert by_name["new"]["lr"] == 1e-3 and by_name["transferred"]["lr"] == 1e-4
    assert by_name["transferred_no_decay"]["weight_decay"] == 0.0
    with pytest.raises(UserError):
        select_trainable(named, ["nothing.matches"], mixers, False)
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in named.values())
    assert isinstance(next(iter(named.values())), torch.nn.Parameter)
