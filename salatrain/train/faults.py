"""Fault injection for tests, from ``SALATRAIN_FAULTS`` (comma-free ``kind@steps`` items separated by ``;``):

    nan_loss@3,4      the loss of optimizer steps 3 and 4 becomes NaN (the step must be skipped and counted)
    kill_in_save@6    SIGKILL this process while checkpoint 6 is half written (files saved, not committed)

Unset in normal runs: every hook is a no-op.
"""

from __future__ import annotations

import os
import signal


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
