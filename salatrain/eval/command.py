"""`salatrain eval model=<dir> output_dir=<dir> [compare=[<dir>]] probes.lengths=[512,1024] perplexity.files=[..]`"""

from __future__ import annotations

from pathlib import Path

from .config import EvalConfig
from .evaluate import evaluate, ignored_keys, table, validate

SCHEMA = EvalConfig
CONFIG_MODULE = "salatrain.config"  # the schema alone: conf/'s groups (model/, ...) must not capture `model=`


__all__ = ["SCHEMA", "check", "ignored_keys", "run"]


def check(cfg: EvalConfig) -> None:
    validate(cfg)


def run(cfg: EvalConfig) -> dict:
    report = evaluate(cfg)
    print(table(report))
    print(f"\nwrote {Path(cfg.output_dir) / 'eval.json'} ({report['seconds']} s)")
    return report
