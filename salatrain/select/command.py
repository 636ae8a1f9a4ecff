"""`salatrain select model=<dense dir> aligned=<align output> output_dir=<dir>` (sweep) or
`salatrain select metrics=<metrics.json> output_dir=<dir>`; `method=halo|retrieval|uniform|random ratio=0.25`."""

from __future__ import annotations

from pathlib import Path

from .config import SelectConfig
from .selection import ignored_keys, select, table, validate

SCHEMA = SelectConfig
CONFIG_MODULE = "salatrain.config"  # the schema alone: conf/'s groups (model/, ...) must not capture `model=`


__all__ = ["SCHEMA", "check", "ignored_keys", "run"]


def check(cfg: SelectConfig) -> None:
    validate(cfg)


def run(cfg: SelectConfig) -> dict:
    plan = select(cfg)
    print(table(plan))
    out = Path(cfg.output_dir)
    print(f"\n{plan['method']}: sparse attention at layers {plan['sparse_layers']} ({plan['num_kept']} of "
          f"{plan['num_layers']}); wrote {out / 'layer_plan.json'} and {out / 'scores.png'} "
          f"({plan['cost'].get('seconds_total', 0)} s)")
    print(f"next: salatrain convert model=<dense dir> plan.file={out / 'layer_plan.json'} "
          "aligned=<align output> output_dir=<dir>")
    return plan
