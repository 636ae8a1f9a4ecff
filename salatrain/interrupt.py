"""Ctrl-C (SIGINT) for the CLI: the command stops with exit status 130, nothing half-written, no success line,
its output_dir lock released. (SIGTERM and SIGKILL end the process at once: outputs are committed atomically,
so they too leave nothing half-written, and the lock dies with the process.)

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be, and a few places swallow it (an
exception in a finaliser or a C callback is printed as "Exception ignored" and the work goes on). So the
handler also records the interrupt: every commit point (an output directory or file renamed into place, a
training checkpoint made current) calls :func:`check` first, and the CLI reports 130 when an interrupt was
seen at all. Inside :func:`deferred` (the commit itself and its clean-up) an interrupt is held until the block
ends, so a rename is never cut in half.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

_state = {"seen": False, "defer": 0, "pending": False, "commits": []}
EXIT_STATUS = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def _handler(signum, frame) -> None:
    _state["seen"] = True
    if _state["defer"]:
        _state["pending"] = True
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Install the SIGINT handler for the duration of a command (main thread only; restores the old one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _handler)
    _state.update(seen=False, defer=0, pending=False, commits=[])
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def seen() -> bool:
    """An interrupt arrived while the handler was installed (even if something swallowed it)."""
    return bool(_state["seen"])


def committed(path) -> None:
    """Record an output directory put in place complete (named when the command is then reported interrupted)."""
    _state["commits"].append(str(path))


def commits() -> list[str]:
    """The output directories committed complete since the handler was installed."""
    return list(_state["commits"])


def check() -> None:
    """Raise KeyboardInterrupt if an interrupt was seen: call before committing any output."""
    if _state["seen"]:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold interrupts while the block runs (a commit and its clean-up); raise afterwards if one came."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1
    if not _state["defer"] and _state["pending"]:
        _state["pending"] = False
        raise KeyboardInterrupt
