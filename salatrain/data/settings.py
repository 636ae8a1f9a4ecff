"""What to read and how to pack it (the ``data`` group of the train config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config.ranges import between, random_seed


@dataclass
class DataSettings:
    files: list[str] = field(default_factory=list)  # *.jsonl/json/parquet/txt (globs ok), or hub dataset names
    text_field: str = "text"
    messages_field: str = "messages"  # chat records {"messages": [{"role", "content"}]}: loss on assistant turns
    text_sample_by: str = "document"  # plain-text files: one document per file | paragraph | line
    hub_split: str = "train"
    hub_config: Optional[str] = None
    shuffle: bool = True
    seed: int = random_seed()
    append_eos: bool = True
    num_proc: int = between(1, 1024, 1)
    cache_dir: Optional[str] = None  # datasets cache (default: HF_DATASETS_CACHE)
