"""Which parameters train, their groups and learning rates, the optimizer and the schedule.

Trainable sets (``stage.trainable``) are names or fnmatch globs over the student's parameter names:

    all, attention, linear_attention, sparse_attention, full_attention   (the mixers' own parameters)
    new        parameters that did not exist in the dense model: z_proj, g_proj, o_norm, and the Lightning
               q_norm/k_norm when the base had none
    mlp, norms, embeddings (embed_tokens, lm_head)

A sparse layer's gate g_proj trains whenever anything of that layer does. Groups: new vs transferred
(``optim.lr_new`` vs ``optim.lr``), × decay vs no decay (1-D parameters: norms, biases).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re

import torch

from ..errors import UserError
from .config import OptimSettings

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_NEW = re.compile(r"self_attn\.(z_proj|g_proj|o_norm)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def is_new(name: str, mixer_types: list[str], base_has_qk_norm: bool) -> bool:
    if _NEW.search(name):
        return True
    i = layer_of(name)
    return (i is not None and mixer_types[i] == "linear_attention" and not base_has_qk_norm
            and re.search(r"self_attn\.(q_norm|k_norm)\.", name) is not None)


def _in_set(name: str, pattern: str, mixer_types: list[str], base_has_qk_norm: bool) -> bool:
    i = layer_of(name)
    attn = ".self_attn." in name
    if pattern == "all":
        return True
    if pattern == "attention":
        return attn
    if pattern in ("linear_attention", "sparse_attention", "full_attention"):
        return attn and i is not None and mixer_types[i] == pattern
    if pattern == "new":
        return is_new(name, mixer_types, base_has_qk_norm)
    if pattern == "mlp":
        return ".mlp." in name
    if pattern == "norms":
        return name.endswith("layernorm.weight") or name == "model.norm.weight"
    if pattern == "embeddings":
        return name.startswith(("model.embed_tokens.", "lm_head."))
    return fnmatch.fnmatchcase(name, pattern)


def select_trainable(named: dict[str, torch.nn.Parameter], patterns: list[str], mixer_types: list[str],
                     base_has_qk_norm: bool) -> set[str]:
    """Names of the parameters that train; sets ``requires_grad`` on every parameter accordingly."""
    chosen: set[str] = set()
    for pattern in patterns:
        hits = {n for n in named if _in_set(n, pattern, mixer_types, base_has_qk_norm)}
        if not hits:
            log.warning("stage.trainable pattern %r matches no parameter of this model", pattern)
        chosen |= hits
    for name in named:  # a sparse layer's new gate trains whenever anything of that layer does
        i = layer_of(name)
        if (i is not None and mixer_types[i] == "sparse_attention" and name.endswith("self_attn.g_proj.weight")
                and any(layer_of(n) == i for n in chosen)):
            chosen.add(name)
    if not chosen:
        raise UserError(f"stage.trainable={patterns} selects no parameter: nothing would train")
    for name, p in named.items():
        p.requires_grad_(name in chosen)
    return chosen


def param_groups(named: dict[str, torch.nn.Parameter], trainable: set[str], opt: OptimSettings,
                 mixer_types: list[str], base_has_qk_norm: bool) -> list[dict]:
    buckets: dict[tuple[bool, bool], list] = {}
    for name, p in named.items():
        if name in trainable:
            key = (is_new(name, mixer_types, base_has_qk_norm), p.ndim >= 2)
            buckets.setdefault(key, []).append(p)
    groups = []
    for (new, decay), params in sorted(buckets.items()):
        lr = opt.lr_new if new and opt.lr_new is not None else opt.lr
        groups.append({"params": params, "lr": lr, "weight_decay": opt.weight_decay if decay else 0.0,
                       "name": f"{'new' if new else 'transferred'}{'' if decay else '_no_decay'}"})
    return groups


class AdamW(torch.optim.AdamW):
    """torch AdamW that skips a step (parameters and moments untouched, whatever DeepSpeed wrapper calls it)
    when told to (``skip_next``: a non-finite loss) or when a gradient it would apply is not finite on any rank
    (the ranks agree: each checks its own partition, then they reduce). ``skipped`` tells the last step's fate.
    It is the only guard under ZeRO-0 in fp32, where DeepSpeed calls this optimizer directly, once for all
    groups. DeepSpeed's ZeRO-1/2 optimizer calls it one parameter group at a time, so there the whole-step
    decision is DeepSpeed's (its overflow test, and the gradient norm in fp32; engine.ds_config keeps both on),
    as it is under its bf16 optimizer (ZeRO-0) and ZeRO-3."""

    skip_next = False
    skipped = False

    def step(self, closure=None):
        self.skipped = self.skip_next or not self._gradients_finite()
        if self.skipped:
            return None
        return super().step(closure)

    def _gradients_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        ok = torch.ones(1, device=device)
        for grad in grads:
            ok *= torch.isfinite(grad).all()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        return bool(ok[0] > 0)


def build_optimizer(groups: list[dict], opt: OptimSettings) -> AdamW:
    return AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)


def lr_factor(step: int, max_steps: int, opt: OptimSettings) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    w = opt.warmup_steps
    if step < w:
        return (step + 1) / w
    lo = opt.min_lr_ratio
    span = max(1, max_steps - w)
    p = min(1.0, (step - w) / span)
    if opt.schedule == "constant":
        return 1.0
    if opt.schedule == "linear":
        return 1.0 - (1.0 - lo) * p
    if opt.schedule == "cosine":
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * p))
    if opt.schedule == "exponential":
        return lo**p
    decay_steps = max(1, round(opt.decay_fraction * max_steps))  # wsd
    q = min(1.0, max(0.0, (step - (max_steps - decay_steps)) / decay_steps))
    if q <= 0.0:
        return 1.0
    if opt.wsd_decay == "linear":
        return 1.0 - (1.0 - lo) * q
    if opt.wsd_decay == "cosine":
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * q))
    return lo**q


class Schedule:
    """Sets every group's lr to its base lr × ``lr_factor(step)``; its state is the step alone."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_steps: int, opt: OptimSettings):
        self.optimizer, self.max_steps, self.opt = optimizer, max_steps, opt
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.set_step(0)

    def set_step(self, step: int) -> None:
        self.step_count = step
        f = lr_factor(step, self.max_steps, self.opt)
        for g, base in zip(self.optimizer.param_groups, self.base):
            g["lr"] = base * f

    def step(self) -> None:
        self.set_step(self.step_count + 1)

    @property
    def lr(self) -> float:
        return self.base[0] * lr_factor(self.step_count, self.max_steps, self.opt)
