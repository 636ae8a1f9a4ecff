"""Config schema of `salatrain bench` (prefill / decode speed and peak memory against sequence length)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..config.ranges import above, at_least, random_seed
from ..config.schema import LoggingSettings

DEFAULT_LENGTHS = ["8K", "32K", "128K", "256K", "512K", "1M"]


@dataclass
class BenchConfig:
    """salatrain bench model=<dir> [compare=[<dense dir>]] lengths=[8K,32K,128K] output_dir=<dir>

    Per model and prompt length: prefill (time to first token, building the cache generation uses), decode
    tokens/s with that cache, peak memory. Token ids are synthetic (``seed``); no tokenizer or data is read.
    Lengths are token counts, plain or with a K / M suffix (×1024, ×1024²)."""

    model: Optional[str] = None
    compare: list[str] = field(default_factory=list)  # more models (the first is the baseline of the speed-ups)
    names: list[str] = field(default_factory=list)  # labels (default: folder names)
    output_dir: Optional[str] = None
    lengths: list[Any] = field(default_factory=lambda: list(DEFAULT_LENGTHS))
    decode_tokens: int = at_least(1, 32)  # tokens decoded one at a time after each prefill
    batch_size: int = at_least(1, 1)
    prefill_chunk: Optional[int] = at_least(1, None)  # feed the prompt through the cache this many tokens at a time
    warmup: int = at_least(0, 1)  # untimed prefill + decode runs before the timed ones, per model and length
    # salatrain's models decode on CUDA with the steps between attention calls replayed as CUDA graphs
    # (models.decode_graphs; its warm-up and capture steps untimed); false: forward a token at a time, as generate
    decode_graphs: bool = True
    repeats: int = at_least(1, 1)  # timed runs per model and length (the median is reported)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    memory_limit_gib: Optional[float] = above(0.0, None)  # memory to plan for (default: the device's free memory)
    skip_unfit: bool = False  # report runs whose estimate exceeds the memory as OOM instead of refusing them
    seed: int = random_seed()
    overwrite: bool = False
    logging: LoggingSettings = field(default_factory=LoggingSettings)
