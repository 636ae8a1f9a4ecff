"""DeepSpeed, and the only module of salatrain that imports it: process group, engine, frozen teacher
placement, checkpoint files and their consolidation, and the sequence-parallel pieces (groups, Ulysses
all-to-all attention) that ``sequence_parallel.py`` applies to the model.

Launchers: ``deepspeed --no_local_rank``, ``torchrun`` or plain ``python`` (one process: the rendezvous
variables are set here). Without CUDA, DeepSpeed runs its CPU accelerator with gloo (DS_ACCELERATOR=cpu).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import io
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _KnownOptimizer(logging.Filter):
    """Our AdamW is torch's with a skippable step; DeepSpeed calls any subclass "untested"."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_env() -> bool:
    """Set the rendezvous variables of a one-process run; True when the port is ours to choose again."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    own_port = False
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        own_port = "MASTER_PORT" not in os.environ
        if own_port:
            os.environ["MASTER_PORT"] = str(_free_port())
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    return own_port


def _address_in_use(exc: BaseException) -> bool:
    return "EADDRINUSE" in str(exc) or "address already in use" in str(exc).lower()


PORT_ATTEMPTS = 8


def _skip_shm_comm_build() -> None:
    """On CPU, DeepSpeed would JIT-compile its shared-memory all-reduce op at init: a C++ build on a machine's first
    run, behind a lock file in ~/.cache/torch_extensions that a run killed mid-build leaves behind, after which every
    later run waits on it forever. salatrain's CPU runs reduce through gloo, so the op is marked unavailable."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> Dist:
    """Join (or create) the process group; idempotent within a process."""
    own_port = _prepare_env()
    import deepspeed

    ds_log = logging.getLogger("DeepSpeed")
    ds_log.setLevel(logging.WARNING)
    if not any(isinstance(f, _KnownOptimizer) for f in ds_log.filters):
        ds_log.addFilter(_KnownOptimizer())
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    else:
        _skip_shm_comm_build()
    # A one-process run picks a free port and then listens on it; another run starting in the same instant can take
    # it in between (two runs launched side by side). Such a run picks another port: nothing else depends on it.
    for attempt in range(PORT_ATTEMPTS):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
            break
        except RuntimeError as exc:  # torch's DistNetworkError is a RuntimeError
            if not (own_port and _address_in_use(exc)) or attempt == PORT_ATTEMPTS - 1:
                raise
            log.info("port %s was taken before the process group listened on it; trying another",
                     os.environ["MASTER_PORT"])
            os.environ["MASTER_PORT"] = str(_free_port())
    if not _AT_EXIT:  # the group goes before the interpreter does: left to its destructor at exit, gloo sometimes
        # aborts the process after a finished run (exit status -6 although every step and file was done)
        atexit.register(_destroy_process_group)
        _AT_EXIT.append(True)
    world = torch.distributed.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() if cuda else world))
    if not cuda and local_world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(torch.distributed.get_rank(), world, local_rank, local_world, device)


_AT_EXIT: list = []


def _destroy_process_group() -> None:
    try:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except Exception as exc:  # never an error of its own at exit
        log.debug("destroying the process group at exit: %s", exc)


def barrier() -> None:
    torch.distributed.barrier()


@contextlib.contextmanager
def local_main_first(dist: Dist):
    """Local rank 0 runs the block first (fills caches), then the others."""
    if dist.local_rank != 0:
        barrier()
    yield
    if dist.local_rank == 0:
        barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    ops = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN,
           "max": torch.distributed.ReduceOp.MAX}
    torch.distributed.all_reduce(t, op=ops[op])
    return t


def sequence_parallel_group(size: int):
    """This rank's group of ``size`` consecutive ranks, from DeepSpeed's sequence-parallel state (created once
    per process and size; ``size`` > 1 divides the world size)."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    try:
        group = mpu.get_sequence_parallel_group()
    except AssertionError:  # not created yet
        group = None
    if group is not None and mpu.get_sequence_parallel_world_size() == size:
        return group
    if group is not None:
        mpu._release_sequence_parallel_groups()
    mpu.initialize_sequence_parallel(size)
    return mpu.get_sequence_parallel_group()


def new_group(ranks: list[int]):
    """A process group of ``ranks``; every rank of the world calls this with the same lists in the same order."""
    import deepspeed.comm

    return deepspeed.comm.new_group(ranks)


def all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    """``t`` of every rank of ``group``, in group-rank order (no gradient)."""
    import deepspeed.comm

    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size(group))]
    deepspeed.comm.all_gather(parts, t.contiguous(), group=group)
    return parts


def ulysses_attention(local_attention, group) -> torch.nn.Module:
    """DeepSpeed Ulysses around ``local_attention(q, k, v, *args)``: q/k/v [B, T/N, heads, D] sequence shards
    go through an all-to-all to [B, T, heads/N, D] head shards (rank r gets the r-th contiguous slice of every
    head dimension), the local attention runs on whole sequences, and its output goes back to [B, T/N, heads,
    D]. Call the result as ``attn(q, k, v, 0, None, *args)`` (batch dim 0, no rotary). Head counts must be
    multiples of the group size."""
    from deepspeed.sequence.layer import DistributedAttention

    return DistributedAttention(local_attention, group, scatter_idx=2, gather_idx=1)


def ds_config(cfg: TrainConfig, grad_accum: int) -> dict:
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage > 0:
        zero.update(overlap_comm=ds.overlap_comm, contiguous_gradients=ds.contiguous_gradients,
                    reduce_bucket_size=ds.reduce_bucket_size, allgather_bucket_size=ds.allgather_bucket_size)
    if ds.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
                    stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold)
    config = {
        "train_micro_batch_size_per_gpu": cfg.trainer.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.trainer.grad_clip,
        # check_grad_overflow stays on (DeepSpeed's default): the ZeRO-1/2 optimizer steps our AdamW one parameter
        # group at a time, so only DeepSpeed's test, made before any group steps, can skip a whole step for a
        # non-finite gradient under bf16. With it off, a NaN in one group skipped that group and stepped the
        # others (tests/test_run_guarantees.py). Its ~8 small ops per tensor cost no measurable throughput
        # (docs/perf.md: 193.6K tokens/s with it, 194.7K without, within the spread between machines).
        "bf16": {"enabled": cfg.trainer.precision == "bf16", "check_grad_overflow": True},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 60,
        "wall_clock_breakdown": False,
    }
    return _merge(config, dict(ds.extra))


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def initialize(module: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict,
               fused_grad_checks: bool = True):
    """A DeepSpeed engine around ``module`` with the torch ``optimizer`` (no compiled DeepSpeed ops).
    ``fused_grad_checks``: ZeRO-1/2's per-tensor overflow test and gradient norm run as multi-tensor kernels
    (grad_checks.py)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    if fused_grad_checks:
        from .grad_checks import fuse

        fuse(engine.optimizer)
    return engine


def place_frozen(model: torch.nn.Module, cfg: TrainConfig, dist: Dist):
    """Put a frozen model (the teacher) where the student is: sharded by a ZeRO-3 engine under ZeRO-3,
    otherwise whole on this rank's device in the training precision. Returns (module to call, keepalive)."""
    model.requires_grad_(False).eval()
    dtype = torch.bfloat16 if cfg.trainer.precision == "bf16" else torch.float32
    if cfg.deepspeed.zero_stage == 3:
        import deepspeed

        ds = cfg.deepspeed
        config = {
            "train_micro_batch_size_per_gpu": cfg.trainer.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "bf16": {"enabled": dtype == torch.bfloat16},
            "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size,
                                  "stage3_param_persistence_threshold": ds.stage3_param_persistence_threshold},
            "steps_per_print": 1 << 60,
        }
        engine, _, _, _ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine.module, engine
    for p in model.parameters():  # parameters only: rotary/decay buffers stay fp32
        p.data = p.data.to(device=dist.device, dtype=dtype)
    return model.to(dist.device), None


def release(engines) -> None:
    """Free DeepSpeed engines (hooks, partitioned parameters, optimizer memory) so another run can start in
    the same process."""
    import gc

    for e in engines:
        if hasattr(e, "destroy"):
            e.destroy()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_checkpoint(engine, save_dir: Path, tag: str) -> None:
    """Model and optimizer files of every rank under ``save_dir/tag`` (all ranks call this). A failed write
    (torch.save reports a full disk or a file-size limit as a RuntimeError about stream positions) is an
    I/O error; the checkpoint being written is never committed."""
    try:
        engine.save_checkpoint(str(save_dir), tag=tag, client_state={}, save_latest=False)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise OSError(errno.EIO, f"writing the checkpoint failed ({first})", str(save_dir / tag)) from e


def load_checkpoint(engine, ckpt: Path) -> None:
    """Restore model and optimizer states from the checkpoint directory ``ckpt`` (all ranks call this)."""
    try:
        path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
    except Exception as e:
        _unreadable(ckpt, e)
    if path is None:
        raise UserError(f"cannot load the training checkpoint {ckpt} (DeepSpeed found no states there)")


def consolidated_state_dict(engine) -> dict | None:
    """The full module state dict on rank 0 (None elsewhere); gathers ZeRO-3 shards. All ranks call this."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if torch.distributed.get_rank() == 0 else None


def read_checkpoint_state_dict(ckpt: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full module state dict stored in a checkpoint directory, without an engine (one process, CPU).

    ZeRO-3 shards are consolidated from the fp32 optimizer partitions (DeepSpeed's zero_to_fp32); for stages
    0-2 the module states file holds the whole module in its training dtype.
    """
    try:
        if zero_stage == 3:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
                return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name))
        states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return dict(states["module"])
    except Exception as e:
        _unreadable(ckpt, e)


def _unreadable(ckpt: Path, e: Exception):
    """A checkpoint file that cannot be read: an I/O error as it is, anything else (a truncated or corrupt
    file) as a one-line UserError."""
    if isinstance(e, (OSError, UserError)) and not isinstance(e, FileNotFoundError):
        raise e
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    raise UserError(f"cannot read the training checkpoint {ckpt} ({first}); a file is missing, truncated or "
                    "corrupt: resume from or export another checkpoint") from None
