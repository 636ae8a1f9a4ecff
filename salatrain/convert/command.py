"""`salatrain convert model=<dense dir> output_dir=<dir> plan.method=uniform|plan.sparse_layers=[..]|plan.file=..`"""

from __future__ import annotations

import json
import sys

from ..config.schema import ConvertConfig
from .convert import convert, ignored_keys, validate

SCHEMA = ConvertConfig
# Composed from the schema alone: the training config groups (model/, data/, ...) must not capture `model=`.
CONFIG_MODULE = "salatrain.config"


__all__ = ["SCHEMA", "check", "ignored_keys", "run"]


def check(cfg: ConvertConfig) -> None:
    validate(cfg)


def run(cfg: ConvertConfig) -> None:
    out = convert(cfg)
    report = json.loads((out / "conversion_report.json").read_text())
    kl = report["kl_check"]
    kl_text = f"KL(dense||hybrid) {kl['kl_mean']:.4f}" if "kl_mean" in kl else f"KL check skipped ({kl['skipped']})"
    print(
        f"wrote {out}: {len(report['sparse_layers'])} sparse layers {report['sparse_layers']}, "
        f"{len(report['linear_layers'])} Lightning layers, +{report['parameters']['added'] / 1e6:.1f}M parameters, "
        f"{kl_text}, {report['seconds']} s",
        file=sys.stderr,
    )
