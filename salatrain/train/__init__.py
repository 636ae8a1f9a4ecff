"""Continual training on DeepSpeed: stage recipes (align, distill, lm), one loop, exact resume, HF export.

The one place DeepSpeed is imported (``engine.py``). Programmatic use::

    from salatrain.train import compose_train, run_stage
    result = run_stage(compose_train("tiny", ["output_dir=out", "trainer.max_steps=5"]))
"""

from __future__ import annotations


def compose_train(recipe, overrides=()):
    from .command import compose_train as _compose

    return _compose(recipe, overrides)


def run_stage(cfg, keep_engine=False):
    from .loop import run_stage as _run

    return _run(cfg, keep_engine)


__all__ = ["compose_train", "run_stage"]
