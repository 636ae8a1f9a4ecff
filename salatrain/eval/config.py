"""Config schema of `salatrain eval` (probe and text settings are shared with `salatrain select`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .probes import TASKS
from ..config.ranges import at_least, random_seed
from ..config.schema import LoggingSettings


@dataclass
class ProbeSettings:
    """Synthetic retrieval probes: ``num_samples`` per task and length, generated from ``seed``."""

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    lengths: list[int] = at_least(32, [1024, 2048])
    num_samples: int = at_least(1, 8)
    seed: int = random_seed()


@dataclass
class TextSettings:
    """Text for perplexity: ``files`` (.jsonl records with ``text_field``, any other file one document), or
    the built-in corpus ``builtin`` (pydoc | stdlib) when ``files`` is empty; ``builtin=none`` skips it."""

    files: list[str] = field(default_factory=list)
    builtin: str = "pydoc"
    text_field: str = "text"
    seq_lens: list[int] = at_least(2, [1024])
    max_tokens: int = at_least(2, 16384)  # per sequence length


@dataclass
class LmEvalSettings:
    """lm-evaluation-harness tasks by name (needs ``pip install 'lm_eval[hf]'`` and the tasks' data)."""

    tasks: list[str] = field(default_factory=list)
    limit: Optional[int] = at_least(1, None)
    num_fewshot: Optional[int] = at_least(0, None)
    batch_size: int = at_least(1, 1)


@dataclass
class EvalConfig:
    """salatrain eval model=<dir> output_dir=<dir> [compare=[<dir>,..]] probes.lengths=[512,1024] ..."""

    model: Optional[str] = None
    compare: list[str] = field(default_factory=list)  # more models, scored on the very same samples
    names: list[str] = field(default_factory=list)  # column labels (default: folder names)
    output_dir: Optional[str] = None
    probes: ProbeSettings = field(default_factory=ProbeSettings)
    perplexity: TextSettings = field(default_factory=TextSettings)
    lm_eval: LmEvalSettings = field(default_factory=LmEvalSettings)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    chunk_tokens: Optional[int] = at_least(1, None)  # feed long sequences through the cache this many tokens at a time
    overwrite: bool = False
    logging: LoggingSettings = field(default_factory=LoggingSettings)
