"""The one training loop: every stage (align, distill, lm) runs through :func:`run_stage`.

Per optimizer step, each rank takes its rows of the global batch (rows are indexed globally, so any number of
ranks reads the same data), runs ``grad_accum`` micro-batches through DeepSpeed, and the loss is the exact
token-weighted mean over the whole global batch (each micro-batch's sum is divided by the global number of
targets, counted before the step). A non-finite loss on any rank skips the whole step on every rank (the
optimizer leaves parameters and moments untouched) and is counted; ``trainer.max_bad_steps`` in a row stops
the run with the last checkpoint intact.

Outputs in ``output_dir``: config.yaml, metrics.jsonl, checkpoints/, and at the end the HF checkpoint of the
trained model, stage_report.json and, for align, align_report.json.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import interrupt
from ..data import packed_layout
from ..errors import UserError
from ..hf_checkpoint import CheckpointDir, copy_side_files, load_tokenizer
from ..memory import check_training_memory
from ..rundir import OutputDir, write_text_atomic
from ..tracking import RunLogger, progress_line
from . import engine, faults
from .checkpoint import Store, TrainState, check_same_model, load_rng, read_meta, read_state, save_rng, tag, write_state
from .config import TrainConfig, input_paths, rows_per_step, validate
from .optim import Schedule, build_optimizer, param_groups, select_trainable
from .profile import StepProfiler, phase
from .sequence_parallel import SequenceParallel
from .stages import STAGES, build_stage

log = logging.getLogger("salatrain.train")


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    checkpoint: Path | None
    extras: dict = field(default_factory=dict)  # engine, stage (for callers in the same process)


def run_stage(cfg: TrainConfig, keep_engine: bool = False) -> TrainResult:
    """Run one training stage as configured; returns when the stage is done (or raises UserError).

    The DeepSpeed engines are released at the end, so stages can follow each other in one process;
    ``keep_engine=True`` keeps them in ``result.extras`` ("engine", "engines", "stage") for inspection.
    """
    validate(cfg)
    run = Run(cfg)
    try:
        result = run.train()
    finally:
        try:
            run.logger.close()
        finally:
            run.close()
    if not keep_engine:
        engine.release(result.extras.pop("engines"))
        result.extras.clear()
    return result


class Run:
    def __init__(self, cfg: TrainConfig):
        self.cfg, self.t_start = cfg, time.time()
        self.dist = engine.init_distributed()
        self.sp = SequenceParallel(cfg.trainer.sequence_parallel, self.dist.rank, self.dist.world_size)
        self.out = Path(cfg.output_dir).expanduser().absolute()
        self.paths, self.data_files = input_paths(cfg)
        self.outdir = OutputDir(cfg.output_dir, "train", overwrite=cfg.overwrite, reuse=True)
        self.outdir.check(run_inputs(cfg, self.paths, self.data_files))
        _hold_lock(self.outdir, self.dist)
        try:
            self._setup()
        except BaseException:
            self.outdir.release()
            raise

    def _setup(self) -> None:
        """Open every input, then create output_dir (nothing is written there if an input is bad)."""
        cfg = self.cfg
        self.store = Store(self.out / "checkpoints")
        self.start = self.store.resolve(cfg.resume)
        if self.start is not None:
            self._check_compatible(self.start)
        _seed(cfg.trainer.seed)
        self._build_data()
        self._build_stage()
        if self.start is not None:
            note = check_same_model(self.start, self.stage.config.to_dict(), self.paths["model"])
            if note and self.dist.is_main:
                log.warning(note)
        check_training_memory(cfg, self.stage.config, self.stage, self.teacher, self.dist)
        if self.dist.is_main:
            self.outdir.create()
            write_text_atomic(self.out / "config.yaml", _to_yaml(cfg))
        self._build_engine()
        self.state = TrainState(seq_len=cfg.trainer.seq_len, data_tokens=self.data.num_tokens)
        if self.start is not None:
            self._restore(self.start)
        faults.install_nan_grad(self.stage, lambda: self.state.step + 1)
        self.logger = RunLogger(self.out, cfg.logging.wandb, _to_dict(cfg), self.dist.is_main, self.state.step)
        self.profiler = StepProfiler(cfg.trainer.profile_steps, self.dist.device, self.out,
                                     self.rows * cfg.trainer.seq_len)

    def close(self) -> None:
        """Release the output directory (its lock); the engines are released by the caller."""
        self.outdir.release()

    # ---------------------------------------------------------------------------------------------- setup

    def _tokenizer_dir(self) -> str:
        return STAGES[self.cfg.stage.loss].tokenizer_dir(self.paths)

    def _build_data(self) -> None:
        from dataclasses import replace

        from ..data import build_packed

        CheckpointDir(self._tokenizer_dir())
        self.tokenizer = load_tokenizer(self._tokenizer_dir())
        self.tokenizer.model_max_length = 1 << 62
        settings = replace(self.cfg.data, files=self.data_files)
        with engine.local_main_first(self.dist):
            self.data = build_packed(settings, self.tokenizer, self.cfg.trainer.seq_len)
        self.rows, self.gas = rows_per_step(self.cfg, self.sp.dp_size)
        if self.dist.is_main:
            log.info("data: %d documents, %d tokens, %d rows of %d per epoch; %d rows per step (%d ranks × %d "
                     "micro-batches × %d)%s", self.data.num_documents, self.data.num_tokens, self.data.rows_per_epoch,
                     self.cfg.trainer.seq_len, self.rows, self.sp.dp_size, self.gas, self.cfg.trainer.micro_batch_size,
                     f", each row split over {self.sp.size} ranks" if self.sp.size > 1 else "")

    def _build_stage(self) -> None:
        cfg = self.cfg
        self.dtype = torch.bfloat16 if cfg.trainer.precision == "bf16" else torch.float32
        fuse = cfg.trainer.fuse_elementwise and self.dist.device.type == "cuda"
        self.stage, self.teacher = build_stage(cfg, self.paths, self.dtype, fuse, self.dist.is_main)
        if self.teacher is not None:
            self.sp.parallelize(self.teacher)
        self.sp.parallelize(self.stage)

    def _build_engine(self) -> None:
        cfg = self.cfg
        mixers, qk = list(self.stage.config.mixer_types), bool(self.stage.config.qk_norm)
        named = dict(self.stage.student.named_parameters())
        trainable = select_trainable(named, self.stage.trainable(cfg), mixers, qk)
        self.optimizer = build_optimizer(param_groups(named, trainable, cfg.optim, mixers, qk), cfg.optim)
        self.flops = self._flops_per_token()
        self.eng = engine.initialize(self.stage, self.optimizer, engine.ds_config(cfg, self.gas),
                                     cfg.deepspeed.fused_grad_checks)
        if self.teacher is not None:
            module, self._teacher_engine = engine.place_frozen(self.teacher, cfg, self.dist)
            self.stage.attach_teacher(module)
        self.schedule = Schedule(self.optimizer, cfg.trainer.max_steps, cfg.optim)
        peak = cfg.logging.peak_tflops
        if peak is None:
            from .flops import measure_peak_tflops

            peak = measure_peak_tflops(self.dist.device)
        self.peak = peak
        if self.dist.is_main:
            n_train = sum(p.numel() for n, p in named.items() if n in trainable)
            log.info("stage %s (loss %s): %.2fM of %.2fM parameters train; ZeRO-%d, %s, %d ranks",
                     cfg.stage.name, cfg.stage.loss, n_train / 1e6, sum(p.numel() for p in named.values()) / 1e6,
                     cfg.deepspeed.zero_stage, cfg.trainer.precision, self.dist.world_size)

    def _flops_per_token(self) -> float:
        return self.stage.flops_per_token(self.cfg.trainer.seq_len, self.cfg.stage.sparse_attention, self.teacher)

    def _restore(self, ckpt: Path) -> None:
        engine.load_checkpoint(self.eng, ckpt)
        state = read_state(ckpt)
        if self.dist.is_main and (state.seq_len, state.data_tokens) != (self.state.seq_len, self.state.data_tokens):
            log.warning("%s was written with seq_len %d over %d data tokens, this run has %d over %d: the data "
                        "position (%d rows) now points elsewhere in the stream", ckpt, state.seq_len,
                        state.data_tokens, self.state.seq_len, self.state.data_tokens, state.rows)
        state.seq_len, state.data_tokens = self.state.seq_len, self.state.data_tokens
        self.state = state
        self.schedule.set_step(self.state.step)
        if not load_rng(ckpt, self.dist.rank):
            log.warning("%s has no RNG state for rank %d (different number of ranks); RNG reseeded", ckpt,
                        self.dist.rank)
        if self.dist.is_main:
            log.info("resumed from %s at step %d (%d rows consumed)", ckpt, self.state.step, self.state.rows)

    def _check_compatible(self, ckpt: Path) -> None:
        """DeepSpeed restores optimizer shards only for the same loss, ZeRO stage and (ZeRO >= 1) rank count."""
        meta, cfg, world = read_meta(ckpt), self.cfg, self.dist.world_size
        was = f"loss {meta['loss']}, ZeRO-{meta['zero_stage']}, {meta['world_size']} ranks"
        now = f"loss {cfg.stage.loss}, ZeRO-{cfg.deepspeed.zero_stage}, {world} ranks"
        if (meta["loss"] != cfg.stage.loss or meta["zero_stage"] != cfg.deepspeed.zero_stage
                or (meta["zero_stage"] > 0 and meta["world_size"] != world)):
            raise UserError(f"cannot resume from {ckpt} ({was}) with {now}; resume with the same settings, or "
                            f"start a new run from its weights (salatrain export checkpoint={ckpt} output_dir=<dir>, "
                            "then model.path=<dir>)")

    # ---------------------------------------------------------------------------------------------- training

    def train(self) -> TrainResult:
        cfg = self.cfg
        last_loss = None
        first, started = self.state.step + 1, None  # the ETA counts from the end of the first step (compilation)
        for step in range(first, cfg.trainer.max_steps + 1):
            with self.profiler.step(step):
                row = self._train_step(step)
            faults.poison_weights(step, self.optimizer)
            interrupt.check()
            last_loss = row["loss"] if row["loss"] is not None else last_loss
            now = time.perf_counter()
            started = now if started is None else started
            if step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps:
                self.logger.log(row)
                if self.dist.is_main:
                    per_step = (now - started) / (step - first) if step > first else None
                    log.info(progress_line(row, cfg.trainer.max_steps, per_step))
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0 and step < cfg.trainer.max_steps:
                self.save()
        self._check_finite()
        ckpt = self.store.latest()
        if cfg.trainer.save_final and (ckpt is None or read_state(ckpt).step != self.state.step):
            ckpt = self.save()
        return self._finish(ckpt, last_loss if last_loss is not None else self._logged_loss())

    def _logged_loss(self) -> float | None:
        rows = [json.loads(line) for line in self.logger.path.read_text().splitlines()] \
            if self.logger.path.is_file() else []
        losses = [r["loss"] for r in rows if r.get("loss") is not None]
        return losses[-1] if losses else None

    def _rows_of(self, first: int, micro: int) -> list[int]:
        return rank_rows(first, micro, self.sp.dp_rank, self.sp.dp_size, self.cfg.trainer.micro_batch_size)

    def _train_step(self, step: int) -> dict:
        t0 = time.perf_counter()
        dev = self.dist.device
        with phase("data"):
            batches = self._micro_batches()
            local = torch.tensor([float(sum(self.stage.count(b) for b in batches))])
            batches = [_to_device(b, dev) for b in batches]
        with phase("sync"):
            count = float(engine.all_reduce(local.to(dev))[0])
        scale = self.dist.world_size * self.gas / max(count, 1.0)
        lr = self.schedule.lr
        loss_sum, stats = torch.zeros((), dtype=torch.float64, device=dev), {}
        ok = torch.ones(1, device=dev)
        for i, b in enumerate(batches):
            with phase("forward"):
                loss, st = self.eng(**b)
            if faults.nan_loss(step):
                loss = loss * float("nan")
            ok = ok * torch.isfinite(loss.detach()).float()
            with phase("backward"):
                self.eng.backward(loss * scale)
            if i == len(batches) - 1:  # the optimizer steps now: every rank skips it if any loss was not finite
                with phase("sync"):
                    finite = bool(engine.all_reduce(ok, "min")[0] > 0)
                self.optimizer.skip_next = not finite
            with phase("optimizer"):
                self.eng.step()
            loss_sum += loss.detach().double()
            for k, v in st.items():
                stats[k] = stats.get(k, 0) + v.double()
        self.optimizer.skip_next = False
        self.schedule.step()
        with phase("sync"):
            totals = self._reduce(loss_sum, stats)
        return self._account(step, finite, count, totals, lr, time.perf_counter() - t0)

    def _micro_batches(self) -> list[dict]:
        """The step's micro-batches on the host, from the current data position. Whole rows (no sequence
        parallelism) carry their document layout and target positions, built here so that no forward reads
        anything back from the device (:func:`salatrain.data.packed_layout`); sequence shards carry their whole
        rows' document layout (:meth:`SequenceParallel.shard`)."""
        batches = [self.sp.shard(self.data.batch(self._rows_of(self.state.rows, m))) for m in range(self.gas)]
        if self.sp.size == 1:
            batches = [{**b, **packed_layout(b)} for b in batches]
        return batches

    def _reduce(self, loss_sum: torch.Tensor, stats: dict) -> dict:
        keys = sorted(stats)
        flat = torch.cat([loss_sum.reshape(1)] + [stats[k].reshape(-1) for k in keys])
        flat = engine.all_reduce(flat).cpu()
        out, i = {"loss": flat[0]}, 1
        for k in keys:
            n = stats[k].numel()
            out[k] = flat[i : i + n] if stats[k].dim() else flat[i]
            i += n
        return out

    def _account(self, step: int, finite: bool, count: float, totals: dict, lr: float, dt: float) -> dict:
        st, cfg = self.state, self.cfg
        grad_norm = _float(self.eng.get_global_grad_norm()) if finite else None
        # a non-finite gradient skips the step too (DeepSpeed's ZeRO/bf16 optimizers, or our AdamW)
        finite = finite and not self.optimizer.skipped and (grad_norm is None or math.isfinite(grad_norm))
        tokens = self.rows * cfg.trainer.seq_len
        st.step, st.rows, st.tokens = step, st.rows + self.rows, st.tokens + tokens
        row = {"step": step, "loss": float(totals["loss"]) / max(count, 1.0) if finite else None, "lr": lr,
               "grad_norm": grad_norm if finite else None, "tokens": st.tokens,
               "tokens_per_s": tokens / dt, "step_time": dt, "mem_gb": _memory_gb(self.dist.device)}
        if self.peak:
            row["mfu"] = self.flops * tokens / dt / (self.peak * 1e12 * self.dist.world_size)
        for k, v in totals.items():
            if k == "layer_mse":
                row["align_mse"] = (v / max(count, 1.0)).tolist()
            elif k != "loss":
                row[k] = float(v) / max(count, 1.0)
        if finite:
            st.bad_in_row = 0
            return row
        st.bad_in_row, st.bad_total = st.bad_in_row + 1, st.bad_total + 1
        row.update(skipped=True, bad_steps=st.bad_total)
        if self.dist.is_main:
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row, %d in total)", step,
                        st.bad_in_row, st.bad_total)
        if st.bad_in_row >= cfg.trainer.max_bad_steps:
            self.logger.log(row)
            last = self.store.latest()
            raise UserError(f"{st.bad_in_row} steps in a row (up to step {step}) had a non-finite loss or gradient "
                            f"(trainer.max_bad_steps={cfg.trainer.max_bad_steps}); stopped. Last checkpoint: "
                            f"{last or 'none'}; lower optim.lr or check the data")
        return row

    # ---------------------------------------------------------------------------------------------- saving

    def _check_finite(self) -> None:
        """Stop, saving and exporting nothing, when a trained parameter (this rank's optimizer partition, the
        master copy under ZeRO) holds NaN or inf."""
        bad = torch.zeros(1, device=self.dist.device)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                bad += (~torch.isfinite(p.detach())).any().float()
        if float(engine.all_reduce(bad)[0]) == 0:
            return
        last = self.store.latest()
        raise UserError(f"training diverged: the weights hold NaN or inf after step {self.state.step}; nothing "
                        f"was saved or exported. Last finite checkpoint: {last or 'none'}; lower optim.lr (or check "
                        "the data) and train from it")

    def save(self) -> Path:
        self._check_finite()
        partial = self.store.begin(self.dist.is_main)
        engine.barrier()
        name = tag(self.state.step)
        engine.save_checkpoint(self.eng, partial, name)
        written = partial / name
        save_rng(written, self.dist.rank)
        engine.barrier()
        faults.kill_in_save(self.state.step)
        final = self.store.root / name
        if self.dist.is_main:
            write_state(written, self.state, self._meta())
            hf = written / "hf"
            hf.mkdir()
            self.stage.config.save_pretrained(hf)
            copy_side_files(Path(self._tokenizer_dir()), hf)
            self.store.commit(written, self.cfg.trainer.keep_checkpoints)
            log.info("saved checkpoint %s", final)
        engine.barrier()
        return final

    def _meta(self) -> dict:
        cfg, base = self.cfg, self.stage.base
        return {"stage": cfg.stage.name, "loss": cfg.stage.loss, "zero_stage": cfg.deepspeed.zero_stage,
                "precision": cfg.trainer.precision, "world_size": self.dist.world_size,
                "sequence_parallel": self.sp.size, "base": str(base.path) if base is not None else None,
                "base_fingerprint": base.fingerprint() if base is not None else None,
                "model": self.paths["model"], "teacher": self.paths["teacher"]}

    def _finish(self, ckpt: Path | None, last_loss: float | None) -> TrainResult:
        report = {"stage": self.cfg.stage.name, "loss": self.cfg.stage.loss, "steps": self.state.step,
                  "tokens": self.state.tokens, "final_loss": last_loss, "bad_steps": self.state.bad_total,
                  "checkpoint": str(ckpt) if ckpt else None, "model": self.paths["model"],
                  "teacher": self.paths["teacher"],
                  "world_size": self.dist.world_size, "seconds": round(time.time() - self.t_start, 1)}
        extra = self.stage.reports(self._eval_stats)
        if self.dist.is_main:
            if self.cfg.trainer.export and ckpt is not None:
                from .export import export_checkpoint

                export_checkpoint(ckpt, self.out)
            for name, content in extra.items():
                write_text_atomic(self.out / name, json.dumps(content, indent=2))
            write_text_atomic(self.out / "stage_report.json", json.dumps(report, indent=2))
            self.logger.summary({"final_loss": last_loss, "steps": self.state.step})
            log.info("stage %s done: %d steps, final loss %s, outputs in %s", self.cfg.stage.name, self.state.step,
                     f"{last_loss:.5f}" if last_loss is not None else "n/a", self.out)
        engine.barrier()
        engines = [e for e in (self.eng, getattr(self, "_teacher_engine", None)) if e is not None]
        return TrainResult(self.out, self.state.step, last_loss, ckpt,
                           {"engine": self.eng, "stage": self.stage, "engines": engines})

    def _eval_stats(self):
        """(statistics summed over every rank, tokens, train state) of the global batch after the last training
        rows, without gradients: what a stage's end-of-stage report measures."""
        total: dict = {}
        with torch.no_grad():
            for b in self._micro_batches():
                _, st = self.eng(**_to_device(b, self.dist.device))
                for k, v in st.items():
                    total[k] = total[k] + v.double() if k in total else v.double()
        total = {k: engine.all_reduce(v).cpu() for k, v in sorted(total.items())}
        return total, self.rows * self.cfg.trainer.seq_len, self.state


def run_inputs(cfg: TrainConfig, paths: dict | None = None, data_files: list | None = None) -> dict:
    """The paths a run reads, by config key (output_dir may not overlap any); a resume checkpoint inside
    output_dir's own checkpoints is the run itself."""
    paths = paths or {"model": cfg.model.path, "teacher": cfg.teacher.path}
    inputs = {"model.path": paths["model"], "teacher.path": paths["teacher"],
              "data.files": list(data_files if data_files is not None else cfg.data.files)}
    if cfg.resume not in ("auto", "never"):
        own = Path(cfg.output_dir).expanduser().absolute() / "checkpoints"
        resume = Path(cfg.resume).expanduser().absolute()
        if own != resume and own not in resume.parents:
            inputs["resume"] = cfg.resume
    return inputs


def _hold_lock(outdir: OutputDir, dist) -> None:
    """Rank 0 takes the run's lock (one per run, whatever the number of ranks); every rank fails alike when
    another run holds it."""
    error = None
    if dist.is_main:
        try:
            outdir.lock()
        except UserError as e:
            error = str(e)
    ok = engine.all_reduce(torch.tensor([0.0 if error else 1.0], device=dist.device), "min")
    if float(ok[0]) < 1:
        raise UserError(error or f"output_dir {outdir.given} is in use by another salatrain run ({outdir.holder()})")


def rank_rows(first: int, micro: int, rank: int, world_size: int, micro_batch: int) -> list[int]:
    """Global row indices of micro-batch ``micro`` of ``rank`` in the step whose rows start at ``first``.

    A step's rows are first .. first + world·accum·micro_batch - 1 whatever the layout, so one process with
    gradient accumulation reads the same rows as several processes without it."""
    start = first + (micro * world_size + rank) * micro_batch
    return list(range(start, start + micro_batch))


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


HOST_KEYS = ("cu_seqlens",)  # the model copies the document bounds to the device and keeps them for host reads


def _to_device(batch: dict, device) -> dict:
    """Tensors to ``device`` (asynchronously), other entries (``max_seqlen``) and ``cu_seqlens`` as they are: the
    model reads the bounds on the host (the sparse kernels lay out their documents there) and copies them itself."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k not in HOST_KEYS else v
            for k, v in batch.items()}


def _float(x) -> float | None:
    if x is None:
        return None
    return float(x.item() if isinstance(x, torch.Tensor) else x)


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _to_dict(cfg: TrainConfig) -> dict:
    from ..config.compose import structured_to_dict

    return structured_to_dict(cfg)


def _to_yaml(cfg: TrainConfig) -> str:
    from ..config.compose import structured_to_yaml

    return structured_to_yaml(cfg)
