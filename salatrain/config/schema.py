"""Typed configuration schemas shared by the commands (registered with Hydra's ConfigStore in ``store.py``).

Every command's config is a dataclass; the CLI composes it from defaults, recipes and ``key=value``
overrides, validates it, and converts it to the dataclass with ``OmegaConf.to_object`` so that everything
below the CLI is typed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .ranges import above, at_least, between

WANDB_MODES = ("online", "offline", "disabled")
MISSING = "???"  # OmegaConf's marker of a mandatory value (omegaconf.MISSING), without importing it here


@dataclass
class WandbSettings:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "salatrain"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingSettings:
    """W&B settings of a command (eval, select, pipeline); training adds its MFU peak to these."""

    wandb: WandbSettings = field(default_factory=WandbSettings)


@dataclass
class SparseSettings:
    """InfLLM-V2 settings of the sparse layers (DESIGN §2); MiniCPM4/SALA values by default."""

    block_size: int = at_least(1, 64)
    kernel_size: int = at_least(1, 32)
    kernel_stride: int = at_least(1, 16)  # <= kernel_size: the windows cover every key
    init_blocks: int = at_least(0, 1)
    topk: int = at_least(1, 64)  # >= init_blocks
    window_size: int = at_least(0, 2048)
    dense_len: int = at_least(0, 8192)
    normalizer: str = "exact"
    use_rope: bool = False
    nope_logit_scale: bool = False
    nope_logit_scale_base: float = above(1.0, 500.0)


@dataclass
class LightningSettings:
    chunk_size: int = at_least(1, 64)
    use_rope: bool = True
    norm_eps: Optional[float] = between(0.0, 1.0, None, lo_open=True, hi_open=True)


@dataclass
class PlanSettings:
    """Exactly one of ``file``, ``sparse_layers`` or ``method`` chooses the layer plan."""

    file: Optional[str] = None
    sparse_layers: Optional[list[int]] = at_least(0, None)
    method: Optional[str] = None  # "uniform"
    ratio: float = between(0.0, 1.0, 0.25, lo_open=True)  # plan.method=uniform


@dataclass
class ConvertConfig:
    """salatrain convert model=<dense dir> output_dir=<dir> plan.method=uniform plan.ratio=0.25"""

    model: Optional[str] = None
    output_dir: Optional[str] = None
    plan: PlanSettings = field(default_factory=PlanSettings)
    aligned: Optional[str] = None  # align-stage output whose Lightning layers replace the fresh transfer
    sparse: SparseSettings = field(default_factory=SparseSettings)
    lightning: LightningSettings = field(default_factory=LightningSettings)
    dtype: str = "auto"  # auto (as stored) | float32 | bfloat16 | float16
    max_shard_size: str = "5GB"
    kl_check: bool = True
    kl_check_tokens: int = between(2, 1 << 20, 64)
    allow_pickle: bool = False
    overwrite: bool = False
