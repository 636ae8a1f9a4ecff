"""Ranges of the numbers in the config schemas, declared beside each field and checked in one walk.

    block_size: int = at_least(1, 64)                                an int >= 1, default 64
    lr: float = above(0.0, 1e-4)                                     a float > 0
    betas: list[float] = between(0, 1, [0.9, 0.95], hi_open=True)   each element in [0, 1)
    topk: Optional[int] = at_least(1, None)                          unset (null) by default; a set value >= 1

Every float must also be finite. :func:`check_ranges` walks a typed config (nested dataclasses, dicts of
them, lists of numbers) and raises a one-line UserError naming the dotted key, its range and the value;
``tests/test_validation.py`` checks that every number of every command's schema declares a range.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError

RANGE = "range"


@dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def text(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return "any finite number"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def _field(default: Any, r: Range) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={RANGE: r})
    return field(default=default, metadata={RANGE: r})


def at_least(lo: float, default: Any) -> Any:
    """A number >= lo (each element, for a list default)."""
    return _field(default, Range(lo))


def above(lo: float, default: Any) -> Any:
    """A number > lo."""
    return _field(default, Range(lo, lo_open=True))


def between(lo: float, hi: float, default: Any, *, lo_open: bool = False, hi_open: bool = False) -> Any:
    """A number in [lo, hi] (either end open on request)."""
    return _field(default, Range(lo, hi, lo_open, hi_open))


def finite(default: Any) -> Any:
    """Any finite number (for a field whose sign means something)."""
    return _field(default, Range())


SEED_MAX = 2**32 - 1  # numpy's seeds


def random_seed(default: int = 0) -> Any:
    return between(0, SEED_MAX, default)


def numeric_fields(cls: type) -> list[tuple[dataclasses.Field, bool]]:
    """(field, is_list) for every field of dataclass ``cls`` typed as a number or a list of numbers."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = _number_kind(hints[f.name])
        if kind is not None:
            out.append((f, kind))
    return out


def _number_kind(tp) -> bool | None:
    """False: a number (or Optional number); True: a list of numbers; None: anything else."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return _number_kind(args[0]) if len(args) == 1 else None
    if origin in (list, tuple) and args:
        return True if _number_kind(args[0]) is False else None
    if tp in (int, float):
        return False
    return None


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Raise UserError for the first number of ``cfg`` (a config dataclass) outside its declared range."""
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            if dataclasses.is_dataclass(v):
                check_ranges(v, f"{prefix}{k}.")
        return
    if not dataclasses.is_dataclass(cfg):
        return
    numeric = {f.name: (f, is_list) for f, is_list in numeric_fields(type(cfg))}
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if f.name in numeric:
            r = numeric[f.name][0].metadata.get(RANGE, Range())
            for v in (value if numeric[f.name][1] and value is not None else [value]):
                _check_one(key, v, r)
        elif dataclasses.is_dataclass(value) or isinstance(value, dict):
            check_ranges(value, key + ".")


def _check_one(key: str, v: Any, r: Range) -> None:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return
    if isinstance(v, float) and not math.isfinite(v):
        bound = "" if r == Range() else f" {r.text()}"
        raise UserError(f"{key} must be a finite number{bound} (got {v})")
    if not r.holds(v):
        raise UserError(f"{key} must be {r.text()} (got {v})")
