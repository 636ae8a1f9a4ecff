"""Run metrics: ``<output_dir>/metrics.jsonl`` always (one JSON object per optimizer step), W&B when enabled.

Only the main rank writes. W&B is imported lazily, only when ``mode`` is online or offline; its run files go
to ``<output_dir>/wandb`` and a resumed run continues the same W&B run. After a resume the rows past the
restored step are dropped from metrics.jsonl, so each step appears once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep rows with step <= last_step (and drop a torn last line)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= last_step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


class RunLogger:
    def __init__(self, output_dir: Path, wandb_settings, config: dict, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._wandb = None
        if not enabled:
            return
        truncate_metrics(self.path, resume_step or 0)
        self._fh = open(self.path, "a")
        if wandb_settings.mode != "disabled":
            self._wandb = _start_wandb(Path(output_dir), wandb_settings, config)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: _clean(v) for k, v in row.items()}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self._wandb is not None:
            flat = {}
            for k, v in row.items():
                if isinstance(v, list):
                    flat.update({f"{k}/{i}": x for i, x in enumerate(v) if x is not None})
                elif v is not None and k != "step":
                    flat[k] = v
            self._wandb.log(flat, step=row["step"])

    def summary(self, values: dict) -> None:
        if self._wandb is not None:
            self._wandb.summary.update({k: _clean(v) for k, v in values.items()})

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def wandb_run(settings, config: dict, job_type: str, output_dir: str | Path):
    """A one-shot W&B run (eval, select) writing under ``output_dir``, or None when ``settings.wandb.mode`` is
    disabled."""
    w = settings.wandb
    if w.mode == "disabled":
        return None
    import wandb

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return wandb.init(mode=w.mode, project=w.project, entity=w.entity, group=w.group, name=w.name,
                      job_type=job_type, config=config, dir=str(output_dir))


def log_wandb_table(run, key: str, columns: list[str], rows: list[list], images: dict | None = None,
                    summary: dict | None = None) -> None:
    """Log a table (and images: name -> PNG path) to a one-shot run, update its summary and finish it."""
    import wandb

    payload = {key: wandb.Table(columns=columns, data=rows)}
    payload.update({name: wandb.Image(str(path)) for name, path in (images or {}).items()})
    run.log(payload)
    if summary:
        run.summary.update(summary)
    run.finish()


def _start_wandb(output_dir: Path, s, config: dict):
    import wandb

    id_file = output_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(project=s.project, entity=s.entity, group=s.group, name=s.name, tags=list(s.tags) or None,
                      mode=s.mode, dir=str(output_dir), id=run_id, resume="allow", config=config)


def progress_line(row: dict, max_steps: int, per_step: float | None) -> str:
    """One log line: step/of, loss, lr, throughput, MFU, and the time left at this run's mean step time."""
    loss = f"{row['loss']:.5f}" if row["loss"] is not None else "skipped"
    mfu = f" mfu {row['mfu'] * 100:.1f}%" if "mfu" in row else ""
    left = max_steps - row["step"]
    eta = f" eta {_duration(left * per_step)}" if per_step is not None and left > 0 else ""
    return (f"step {row['step']}/{max_steps} loss {loss} lr {row['lr']:.3g} {row['tokens_per_s']:.0f} tok/s"
            f"{mfu}{eta}")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
