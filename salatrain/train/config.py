"""Typed config of `salatrain train` (composed by Hydra from recipes/ and the groups in conf/).

    output_dir, resume        where the run lives; resume=auto|never|<checkpoint dir>; overwrite
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

from ..config.ranges import above, at_least, between, check_ranges, random_seed
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
    max_steps: int = at_least(1, 100)
    save_every: int = at_least(0, 0)  # 0: only at the end
    seq_len: int = at_least(2, 4096)
    micro_batch_size: int = at_least(1, 1)  # packed rows per rank per forward
    sequence_parallel: int = at_least(1, 1)  # ranks splitting each row (DeepSpeed Ulysses); data-parallel = ranks / this
    global_batch_tokens: int = at_least(2, 4096)  # tokens per optimizer step over all ranks (seq_len × rows)
    precision: str = "bf16"  # bf16 | fp32
    activation_checkpointing: bool = False
    grad_clip: float = at_least(0.0, 1.0)  # 0: no clipping
    seed: int = random_seed()
    max_bad_steps: int = at_least(1, 3)  # abort after this many optimizer steps in a row with a non-finite loss/grad
    keep_checkpoints: int = at_least(1, 2)
    log_every: int = at_least(1, 1)
    loss_chunk_tokens: int = at_least(1, 2048)  # lm_head + loss computed this many tokens at a time
    export: bool = True  # write the HF checkpoint into output_dir at the end
    save_final: bool = True  # false (benchmarks): no checkpoint at the end, hence no export
    profile_steps: list[int] = at_least(1, [])  # [first, last]: time phases, then one step's kernels
    fuse_elementwise: bool = True  # CUDA: norms, RoPE, SwiGLU and gates as torch.compile'd kernels


@dataclass
class OptimSettings:
    lr: float = above(0.0, 1e-4)  # transferred parameters
    lr_new: Optional[float] = above(0.0, None)  # parameters new in the hybrid (gates, output norm, ...); None: lr
    weight_decay: float = at_least(0.0, 0.1)
    betas: list[float] = between(0.0, 1.0, [0.9, 0.95], hi_open=True)
    eps: float = above(0.0, 1e-8)
    schedule: str = "cosine"  # constant | linear | cosine | wsd | exponential
    warmup_steps: int = at_least(0, 0)
    min_lr_ratio: float = between(0.0, 1.0, 0.1)  # final lr / lr (cosine, linear, wsd, exponential)
    decay_fraction: float = between(0.0, 1.0, 0.1, lo_open=True)  # wsd: the last fraction of steps decays
    wsd_decay: str = "exponential"  # shape of the wsd decay: linear | cosine | exponential


@dataclass
class DeepSpeedSettings:
    zero_stage: int = between(0, 3, 2)
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = at_least(1, 200_000_000)
    allgather_bucket_size: int = at_least(1, 200_000_000)
    stage3_prefetch_bucket_size: int = at_least(0, 50_000_000)
    stage3_param_persistence_threshold: int = at_least(0, 100_000)
    fused_grad_checks: bool = True  # ZeRO-1/2: overflow test and gradient norm as multi-tensor kernels
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the DeepSpeed config last


@dataclass
class TrainLoggingSettings(LoggingSettings):
    peak_tflops: Optional[float] = above(0.0, None)  # per device, for MFU; None: measured on CUDA, no MFU on CPU


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
    kl_temperature: float = above(0.0, 1.0)


@dataclass
class TrainConfig:
    """salatrain train recipe=<name> model.path=<dir> data.files=[...] output_dir=<dir> [key=value ...]"""

    output_dir: Optional[str] = None
    resume: str = "auto"
    overwrite: bool = False  # take over a non-empty output_dir that is not a salatrain train run
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


def validate(cfg: TrainConfig) -> None:
    """Ranges and cross-field checks that need no files; raises UserError with a one-line message."""
    if not cfg.output_dir:
        raise UserError("missing output_dir=<dir>")
    check_ranges(cfg)
    if not cfg.model.path and not (cfg.stage.loss == "mse_align" and cfg.teacher.path):
        raise UserError("missing model.path=<HF checkpoint dir>")
    _choice(cfg.stage.loss, LOSSES, "stage.loss")
    _choice(cfg.optim.schedule, SCHEDULES, "optim.schedule")
    _choice(cfg.optim.wsd_decay, ("linear", "cosine", "exponential"), "optim.wsd_decay")
    _choice(cfg.trainer.precision, ("bf16", "fp32"), "trainer.precision")
    _choice(cfg.logging.wandb.mode, WANDB_MODES, "logging.wandb.mode")
    _choice(cfg.model.kernel_backend, ("auto", "triton", "torch"), "model.kernel_backend")
    _choice(cfg.data.text_sample_by, ("document", "paragraph", "line"), "data.text_sample_by")
    prof = list(cfg.trainer.profile_steps)
    if prof and (len(prof) != 2 or not 1 <= prof[0] <= prof[1] < cfg.trainer.max_steps):
        raise UserError(f"trainer.profile_steps takes [first,last] with 1 <= first <= last < trainer.max_steps="
                        f"{cfg.trainer.max_steps} (the step after last is traced), got {prof}")
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
    if len(cfg.optim.betas) != 2:
        raise UserError("optim.betas takes two values, e.g. [0.9,0.95]")


def ignored_keys(cfg: TrainConfig) -> dict[str, str]:
    """Keys this stage does not use (setting one on the command line is an error)."""
    out = {}
    loss, o, ds = cfg.stage.loss, cfg.optim, cfg.deepspeed
    if loss != "kl":
        out["stage.kl_temperature"] = f"by loss={loss} (only loss=kl distils with a temperature)"
    if loss == "mse_align":
        out["stage.trainable"] = "by loss=mse_align (align trains every Lightning layer)"
        out["stage.sparse_attention"] = "by loss=mse_align (the aligned layers are all Lightning)"
        if cfg.teacher.path:
            out["model.path"] = f"by loss=mse_align when teacher.path is set (the dense base is {cfg.teacher.path})"
    elif loss != "kl" and not cfg.stage.teacher:
        out["teacher.path"] = f"by loss={loss} (no teacher)"
    if o.schedule != "wsd":
        out["optim.decay_fraction"] = out["optim.wsd_decay"] = f"with optim.schedule={o.schedule} (wsd only)"
    if o.schedule == "constant":
        out["optim.min_lr_ratio"] = "with optim.schedule=constant"
    if ds.zero_stage != 3:
        for key in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
            out[f"deepspeed.{key}"] = f"with deepspeed.zero_stage={ds.zero_stage} (ZeRO-3 only)"
    if ds.zero_stage in (0, 3):
        out["deepspeed.fused_grad_checks"] = f"with deepspeed.zero_stage={ds.zero_stage} (ZeRO-1/2 only)"
    if ds.zero_stage == 0:
        for key in ("overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size"):
            out[f"deepspeed.{key}"] = "with deepspeed.zero_stage=0"
    return out


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


def input_paths(cfg: TrainConfig) -> tuple[dict, list[str]]:
    """({"model", "teacher"} paths, data files) the run reads, with ``builtin:`` assets built and replaced by
    their paths (salatrain.train.tiny builds them; it is imported only when a config names one). A teacher the
    stage does not use (see ``ignored_keys``) is None, and not built."""
    teacher = cfg.teacher.path if "teacher.path" not in ignored_keys(cfg) else None
    names = [cfg.model.path, teacher, *cfg.data.files]
    if any(isinstance(n, str) and n.startswith("builtin:") for n in names):
        from .tiny import resolve
    else:
        def resolve(path):
            return path
    paths = {"model": resolve(cfg.model.path), "teacher": resolve(teacher)}
    return paths, [resolve(f) for f in cfg.data.files]
