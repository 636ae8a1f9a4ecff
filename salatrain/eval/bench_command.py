"""`salatrain bench model=<dir> [compare=[<dense dir>]] lengths=[8K,32K,128K] output_dir=<dir>`"""

from __future__ import annotations

from pathlib import Path

from .bench import run_bench, validate
from .bench_config import BenchConfig
from .bench_report import table

SCHEMA = BenchConfig
CONFIG_MODULE = "salatrain.config"  # the schema alone: conf/'s groups (model/, ...) must not capture `model=`


__all__ = ["SCHEMA", "check", "run"]


def check(cfg: BenchConfig) -> None:
    validate(cfg)


def run(cfg: BenchConfig) -> dict:
    report = run_bench(cfg)
    out = Path(cfg.output_dir)
    print(table(report))
    print(f"\nwrote {out / 'bench.json'} and {out / 'bench.png'} ({report['seconds']} s)")
    return report
