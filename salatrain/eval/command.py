"""`salatrain eval model=<dir> output_dir=<dir> [compare=[<dir>]] probes.lengths=[512,1024] perplexity.files=[..]`"""

from __future__ import annotations

from pathlib import Path

from .config import EvalConfig
from .evaluate import evaluate, table

SCHEMA = EvalConfig
CONFIG_MODULE = "salatrain.config"  # the schema alone: conf/'s groups (model/, ...) must not capture `model=`


def run(cfg: EvalConfig) -> dict:
    report = evaluate(cfg)
    print(table(report))
    print(f"\nwrote {Path(cfg.output_dir) / 'eval.json'} ({report['seconds']} s)")
    return report
