"""Config schema of `salatrain select`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config.ranges import at_least, between, random_seed
from ..config.schema import LoggingSettings
from ..eval.config import ProbeSettings


@dataclass
class HeldoutText:
    """Held-out text for C_i = −(LM loss): ``files`` or the built-in corpus ``builtin`` (pydoc | stdlib)."""

    files: list[str] = field(default_factory=list)
    builtin: str = "pydoc"
    text_field: str = "text"
    seq_len: int = at_least(2, 1024)
    max_tokens: int = at_least(2, 4096)


@dataclass
class SweepSettings:
    """How R_i and C_i are measured when sweeping (aligned=...)."""

    probes: ProbeSettings = field(default_factory=lambda: ProbeSettings(lengths=[1024], num_samples=4))
    text: HeldoutText = field(default_factory=HeldoutText)
    retrieval_metric: str = "answer_logprob"  # answer_logprob (continuous) | exact_match
    retrieval_tasks: list[str] = field(default_factory=list)  # lm-eval tasks instead of the probes, e.g. ruler_qa_squad
    commonsense_tasks: list[str] = field(default_factory=list)  # lm-eval tasks instead of −loss, e.g. hellaswag
    lm_eval_limit: Optional[int] = at_least(1, None)
    lm_eval_num_fewshot: Optional[int] = at_least(0, None)
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class SelectConfig:
    """salatrain select model=<dense dir> aligned=<align output> output_dir=<dir> [method=halo ratio=0.25 ...]
    or       salatrain select metrics=<metrics.json> output_dir=<dir> [method=...]"""

    model: Optional[str] = None  # the dense base (sweep mode; also gives the layer count for uniform/random)
    aligned: Optional[str] = None  # align-stage output (sweep mode)
    metrics: Optional[str] = None  # {"layers": {"0": {"retrieval": .., "commonsense": ..}, ...}} (metrics mode)
    num_layers: Optional[int] = at_least(1, None)  # uniform/random with neither model nor metrics
    output_dir: Optional[str] = None
    method: str = "halo"  # halo | retrieval | uniform | random
    ratio: float = between(0.0, 1.0, 0.25, lo_open=True)
    keep_first: bool = True
    keep_last: bool = True
    include: list[int] = at_least(0, [])
    exclude: list[int] = at_least(0, [])
    seed: int = random_seed()  # method=random
    sweep: SweepSettings = field(default_factory=SweepSettings)
    overwrite: bool = False
    logging: LoggingSettings = field(default_factory=LoggingSettings)
