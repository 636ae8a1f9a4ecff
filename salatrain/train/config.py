"""Typed config of `salatrain train` (composed by Hydra from recipes/ and the groups in conf/).

    output_dir, resume        where the run lives; resume=auto|never|<checkpoint dir>
    model, teacher            HF checkpoint dirs (``builtin:tiny-dense`` / ``builtin:tiny-hybrid`` build tiny ones)
    data                      files or hub names, text or chat records, packing seed
    trainer                   steps, sequence length, batch, precision, checkpointing, loss chunking
    optim                     AdamW, per-group learning rates, schedule
    deepspeed                 ZeRO stage and buckets
    logging                   W&B and MFU peak
    stage                     what is trained and with which loss (StageSpec: align, distill, lm)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..config.schema import WANDB_MODES, LoggingSettings
from ..data.settings import DataSettings
from ..errors import UserError

LOSSES = ("mse_align", "kl", "lm")
SCHEDULES = ("constant", "linear", "cosine", "wsd", "exponential")


@dataclass
class ModelSettings:
    path: Optional[str] = None  # dense or hybrid HF checkpoint dir; align: the dense base model
    kernel_backend: str = "auto"  # auto | triton | torch (mixers of the hybrid model)


@dataclass
class TeacherSettings:
    path: Optional[str] = None  # frozen teacher for loss=kl (a dense or hybrid HF checkpoint dir)


@dataclass
class TrainerSettings:
    max_steps: int = 100
    save_every: int = 0  # 0: only at the end
    seq_len: int = 4096
    micro_batch_size: int = 1  # packed rows per rank per forward
    sequence_parallel: int = 1  # ranks that split each row (DeepSpeed Ulysses); data-parallel ranks = ranks / this
    global_batch_tokens: int = 4096  # tokens per optimizer step over all ranks (seq_len × rows)
    precision: str = "bf16"  # bf16 | fp32
    activation_checkpointing: bool = False
    grad_clip: float = 1.0
    seed: int = 0
    max_bad_steps: int = 3  # abort after this many optimizer steps in a row with a non-finite loss
    keep_checkpoints: int = 2
    log_every: int = 1
    loss_chunk_tokens: int = 2048  # lm_head + loss computed this many tokens at a time
    export: bool = True  # write the HF checkpoint into output_dir at the end
    save_final: bool = True  # false (benchmarks): no checkpoint at the end, hence no export
    profile_steps: list[int] = field(default_factory=list)  # [first, last]: time phases, then one step's kernels
    fuse_elementwise: bool = True  # CUDA: norms, RoPE, SwiGLU and gates as torch.compile'd kernels


@dataclass
class OptimSettings:
    lr: float = 1e-4  # transferred parameters
    lr_new: Optional[float] = None  # parameters new in the hybrid (gates, output norm, ...); None: lr
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    schedule: str = "cosine"  # constant | linear | cosine | wsd | exponential
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr / lr (cosine, linear, wsd, exponential)
    decay_fraction: float = 0.1  # wsd: the last fraction of steps decays
    wsd_decay: str = "exponential"  # shape of the wsd decay: linear | cosine | exponential


@dataclass
class DeepSpeedSettings:
    zero_stage: int = 2
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 200_000_000
    allgather_bucket_size: int = 200_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the DeepSpeed config last


@dataclass
class TrainLoggingSettings(LoggingSettings):
    peak_tflops: Optional[float] = None  # per device, for MFU; None: measured on CUDA, no MFU on CPU


@dataclass
class StageSpec:
    """A training stage as data; one loop runs every stage.

    loss             mse_align: every attention layer's Lightning replacement regresses the frozen teacher
                     layer's attention output (model.path is the dense base); kl: KL(teacher ‖ student) on
                     next-token distributions; lm: next-token cross-entropy
    trainable        name patterns: all, attention, linear_attention, sparse_attention, full_attention, new,
                     mlp, norms, embeddings, or fnmatch globs on parameter names (model.layers.3.*)
    teacher          the stage needs teacher.path
    sparse_attention false: sparse layers attend densely for this stage (dense_len = ∞; the exported
                     checkpoint keeps its own dense_len)
    """

    name: str = "lm"
    loss: str = "lm"
    trainable: list[str] = field(default_factory=lambda: ["all"])
    teacher: bool = False
    sparse_attention: bool = True
    kl_temperature: float = 1.0


@dataclass
class TrainConfig:
    """salatrain train recipe=<name> model.path=<dir> data.files=[...] output_dir=<dir> [key=value ...]"""

    output_dir: Optional[str] = None
    resume: str = "auto"
    model: ModelSettings = field(default_factory=ModelSettings)
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    data: DataSettings = field(default_factory=DataSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    logging: TrainLoggingSettings = field(default_factory=TrainLoggingSettings)
    stage: StageSpec = field(default_factory=StageSpec)


def _choice(value: str, options: tuple[str, ...], key: str) -> None:
    if value not in options:
        raise UserError(f"{key} must be one of {', '.join(options)} (got {value!r})")


def _positive(value: int, key: str) -> None:
    if value <= 0:
        raise UserError(f"{key} must be positive (got {value})")


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks that need no files; raises UserError with a one-line message."""
    if not cfg.output_dir:
        raise UserError("missing output_dir=<dir>")
    if not cfg.model.path and not (cfg.stage.loss == "mse_align" and cfg.teacher.path):
        raise UserError("missing model.path=<HF checkpoint dir>")
    _choice(cfg.stage.loss, LOSSES, "stage.loss")
    _choice(cfg.optim.schedule, SCHEDULES, "optim.schedule")
    _choice(cfg.optim.wsd_decay, ("linear", "cosine", "exponential"), "optim.wsd_decay")
    _choice(cfg.trainer.precision, ("bf16", "fp32"), "trainer.precision")
    _choice(cfg.logging.wandb.mode, WANDB_MODES, "logging.wandb.mode")
    _choice(cfg.model.kernel_backend, ("auto", "triton", "torch"), "model.kernel_backend")
    _choice(cfg.data.text_sample_by, ("document", "paragraph", "line"), "data.text_sample_by")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"deepspeed.zero_stage must be 0, 1, 2 or 3 (got {cfg.deepspeed.zero_stage})")
    for key in ("max_steps", "seq_len", "micro_batch_size", "global_batch_tokens", "loss_chunk_tokens",
                "max_bad_steps", "log_every"):
        _positive(getattr(cfg.trainer, key), f"trainer.{key}")
    prof = list(cfg.trainer.profile_steps)
    if prof and (len(prof) != 2 or not 1 <= prof[0] <= prof[1] < cfg.trainer.max_steps):
        raise UserError(f"trainer.profile_steps takes [first,last] with 1 <= first <= last < trainer.max_steps="
                        f"{cfg.trainer.max_steps} (the step after last is traced), got {prof}")
    if cfg.trainer.save_every < 0 or cfg.trainer.keep_checkpoints < 1:
        raise UserError("trainer.save_every must be >= 0 and trainer.keep_checkpoints >= 1")
    _positive(cfg.trainer.sequence_parallel, "trainer.sequence_parallel")
    if cfg.trainer.seq_len % cfg.trainer.sequence_parallel:
        raise UserError(f"trainer.sequence_parallel={cfg.trainer.sequence_parallel} must divide "
                        f"trainer.seq_len={cfg.trainer.seq_len}")
    if cfg.trainer.global_batch_tokens % cfg.trainer.seq_len:
        raise UserError(f"trainer.global_batch_tokens={cfg.trainer.global_batch_tokens} is not a multiple of "
                        f"trainer.seq_len={cfg.trainer.seq_len}")
    if not cfg.data.files:
        raise UserError("missing data.files=[<file or dataset>, ...]")
    if (cfg.stage.teacher or cfg.stage.loss == "kl") and not cfg.teacher.path:
        raise UserError(f"stage {cfg.stage.name!r} (loss={cfg.stage.loss}) needs a teacher: pass teacher.path=<dir>")
    if cfg.stage.kl_temperature <= 0:
        raise UserError("stage.kl_temperature must be positive")
    if len(cfg.optim.betas) != 2:
        raise UserError("optim.betas takes two values, e.g. [0.9,0.95]")


def rows_per_step(cfg: TrainConfig, dp_size: int) -> tuple[int, int]:
    """(global rows per optimizer step, gradient accumulation steps) for ``dp_size`` data-parallel ranks (ranks
    / trainer.sequence_parallel: the ranks of one sequence-parallel group share their rows)."""
    rows = cfg.trainer.global_batch_tokens // cfg.trainer.seq_len
    per_pass = cfg.trainer.micro_batch_size * dp_size
    if rows % per_pass:
        ranks = "data-parallel ranks" if cfg.trainer.sequence_parallel > 1 else "ranks"
        raise UserError(
            f"trainer.global_batch_tokens={cfg.trainer.global_batch_tokens} is {rows} sequences of "
            f"{cfg.trainer.seq_len}, not a multiple of micro_batch_size × {ranks} = {per_pass}"
        )
    return rows, rows // per_pass
