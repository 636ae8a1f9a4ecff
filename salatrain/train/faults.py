"""Fault injection for tests, from ``SALATRAIN_FAULTS`` (comma-free ``kind@steps`` items separated by ``;``):

    nan_loss@3,4      the loss of optimizer steps 3 and 4 becomes NaN (the step must be skipped and counted)
    nan_grad@3        a gradient of optimizer step 3 becomes NaN while the loss stays finite (skipped, counted)
    nan_weights@5     after optimizer step 5 a trained parameter becomes NaN (the run must stop, export nothing)
    kill_in_save@6    SIGKILL this process while checkpoint 6 is half written (files saved, not committed)

Unset in normal runs: every hook is a no-op.
"""

from __future__ import annotations

import os
import signal

import torch


def _steps(kind: str) -> set[int]:
    for item in os.environ.get("SALATRAIN_FAULTS", "").split(";"):
        name, _, steps = item.partition("@")
        if name.strip() == kind:
            return {int(s) for s in steps.split(",") if s.strip()}
    return set()


def nan_loss(step: int) -> bool:
    return step in _steps("nan_loss")


def kill_in_save(step: int) -> None:
    if step in _steps("kill_in_save"):
        os.kill(os.getpid(), signal.SIGKILL)


def install_nan_grad(model: torch.nn.Module, current_step) -> None:
    """With nan_grad@N: the gradient of the first trained parameter becomes NaN during step N's backward pass
    (``current_step()`` tells the step being computed); the forward pass and the loss stay finite."""
    steps = _steps("nan_grad")
    param = next((p for p in model.parameters() if p.requires_grad), None)
    if steps and param is not None:
        param.register_hook(lambda g: g * float("nan") if current_step() in steps else g)


def poison_weights(step: int, optimizer: torch.optim.Optimizer) -> None:
    if step in _steps("nan_weights"):
        with torch.no_grad():
            optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")
