"""Reporting shared by `salatrain eval` and `salatrain select`: plain-text tables, atomic JSON files and the W&B
settings (runs are started by ``salatrain.tracking.wandb_run``, only when the mode is not ``disabled``)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

from .. import interrupt

from ..config.schema import WANDB_MODES, LoggingSettings
from ..errors import UserError



def check_wandb(settings: LoggingSettings) -> None:
    if settings.wandb.mode not in WANDB_MODES:
        raise UserError(f"logging.wandb.mode must be one of {', '.join(WANDB_MODES)} (got {settings.wandb.mode!r})")


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Numbers right-aligned, text left-aligned."""
    cols = list(zip(*([header] + rows)))
    widths = [max(len(str(c)) for c in col) for col in cols]

    def cell(c, w):
        return str(c).rjust(w) if is_number(str(c)) else str(c).ljust(w)

    lines = ["  ".join(cell(c, w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def write_json_atomic(path: str | Path, data) -> Path:
    """Write JSON through a temporary file in the same folder, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.chmod(tmp, 0o644)
        interrupt.check()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_output_file(output_dir: Optional[str], name: str, overwrite: bool) -> Path:
    if not output_dir:
        raise UserError("missing output_dir=<dir>")
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is not a directory")
    if (out / name).exists() and not overwrite:
        raise UserError(f"{out / name} already exists; choose another output_dir or pass overwrite=true")
    return out
