"""Training checkpoints: atomic, with a ``latest`` pointer, holding all a run needs to continue exactly.

    <output_dir>/checkpoints/
        latest                 name of the newest complete checkpoint, replaced atomically after it exists
        step_00000012/
            mp_rank_00_model_states.pt, *optim_states.pt    DeepSpeed: module and optimizer (every rank)
            trainer_state.json     step, rows consumed (the data position), tokens, bad-step counters
            rng_rank_<r>.pt        RNG states of rank r (python, numpy, torch, cuda)
            meta.json              what `salatrain export` needs: loss, ZeRO stage, precision, base model
            hf/                    the student's config.json and tokenizer files
        .partial/              a checkpoint being written; never read, replaced by the next save

A checkpoint is written under .partial/, every file fsynced, then renamed into place, then ``latest`` is
rewritten (temp file, fsync, rename): a crash at any moment leaves the previous complete checkpoint and a
``latest`` that names a complete one. Assumes a filesystem shared by all ranks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import interrupt
from ..errors import UserError

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
META_FILE = "meta.json"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    rows: int = 0  # global packed rows consumed: the data position
    tokens: int = 0
    bad_in_row: int = 0
    bad_total: int = 0
    seq_len: int = 0  # the row length and corpus size the data position refers to
    data_tokens: int = 0


def tag(step: int) -> str:
    return f"step_{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    with interrupt.deferred():
        os.replace(tmp, path)
        _fsync(path.parent)


def is_complete(ckpt: Path) -> bool:
    return (ckpt / STATE_FILE).is_file() and (ckpt / META_FILE).is_file()


class Store:
    """The checkpoints of one run (``<output_dir>/checkpoints``)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if p.is_dir() and is_complete(p))

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if pointer.is_file():
            ckpt = self.root / pointer.read_text(errors="replace").strip()
            if ckpt.parent == self.root and is_complete(ckpt):
                return ckpt
            log.warning("%s names %s, which is not a complete checkpoint; using the newest complete one", pointer, ckpt)
        done = self.complete()
        return done[-1] if done else None

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint a run starts from: resume=auto (latest here, if any), never, or a path."""
        if resume == "never":
            if self.latest() is not None:
                raise UserError(f"{self.root} already holds checkpoints; pass resume=auto to continue that run or "
                                "choose another output_dir")
            return None
        if resume == "auto":
            return self.latest()
        return find_checkpoint(resume, "resume")

    def begin(self, is_main: bool) -> Path:
        """The directory a new checkpoint is written into (.partial/, emptied by the main rank)."""
        partial = self.root / ".partial"
        if is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        return partial

    def commit(self, written: Path, keep: int) -> Path:
        """Main rank: make the fully written ``.partial/<tag>`` the latest checkpoint, drop old ones."""
        fsync_tree(written)
        final = self.root / written.name
        interrupt.check()
        with interrupt.deferred():
            if final.exists():
                shutil.rmtree(final)
            os.replace(written, final)
            _fsync(self.root)
            write_atomic(self.root / "latest", final.name)
            script = written.parent / "zero_to_fp32.py"  # DeepSpeed's consolidation script, kept beside them
            if script.is_file():
                os.replace(script, self.root / script.name)
            shutil.rmtree(written.parent, ignore_errors=True)  # .partial/: nothing of it is read
        for old in self.complete()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def find_checkpoint(path: str, key: str) -> Path:
    """A complete checkpoint directory, or the latest one of a training output_dir."""
    p = Path(path).expanduser()
    if is_complete(p):
        return p
    found = Store(p / "checkpoints").latest() if (p / "checkpoints").is_dir() else None
    if found is None:
        raise UserError(f"{key}={path}: not a complete training checkpoint (expected a checkpoints/step_* "
                        "directory or a training output_dir holding one)")
    return found


def write_state(ckpt: Path, state: TrainState, meta: dict) -> None:
    (ckpt / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=2))
    (ckpt / META_FILE).write_text(json.dumps(meta, indent=2))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise UserError(f"{path} is corrupt (not a JSON object); resume from or export another checkpoint "
                        f"(resume=<{path.parent.parent}/step_N>)")
    return data


def read_state(ckpt: Path) -> TrainState:
    data = _read_json(ckpt / STATE_FILE)
    try:
        return TrainState(**data)
    except TypeError:
        raise UserError(f"{ckpt / STATE_FILE} does not hold a salatrain trainer state (keys {sorted(data)})") from None


def read_meta(ckpt: Path) -> dict:
    if not (ckpt / META_FILE).is_file():
        raise UserError(f"{ckpt} is not a salatrain training checkpoint ({META_FILE} missing)")
    meta = _read_json(ckpt / META_FILE)
    missing = [k for k in ("loss", "zero_stage", "precision", "world_size") if k not in meta]
    if missing:
        raise UserError(f"{ckpt / META_FILE} lacks {missing}: not a salatrain training checkpoint")
    return meta


ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "mixer_types", "tie_word_embeddings")


def check_same_model(ckpt: Path, config: dict, model_path: str | None) -> str | None:
    """Refuse to resume ``ckpt`` into a model of another shape (``config``: this run's model config as a dict,
    compared with the checkpoint's hf/config.json), before anything is written; return a warning when the run
    names another model.path than the run that wrote the checkpoint (resuming continues that run's weights)."""
    theirs_file = ckpt / "hf" / "config.json"
    theirs = _read_json(theirs_file) if theirs_file.is_file() else {}
    meta = read_meta(ckpt)
    started = meta.get("model")
    diffs = [f"{k} {_brief(theirs[k])} there, {_brief(config[k])} here" for k in ARCHITECTURE_KEYS
             if k in theirs and k in config and theirs[k] != config[k]]
    if diffs:
        shown = "; ".join(diffs[:3])
        raise UserError(f"cannot resume from {ckpt}: it was trained for another model ({shown}); resume it with "
                        f"the model it started from (model.path={started}), or start this run afresh (resume=never)")
    if started and model_path and _same_path(started, model_path) is False:
        return (f"model.path={model_path} is not used: resuming from {ckpt} continues the run that started from "
                f"{started}, with that run's weights; pass resume=never to start from "
                f"{model_path} instead")
    return None


def _brief(value) -> str:
    """A config value for a one-line message: lists as counts per item (mixer_types of 30 layers)."""
    if isinstance(value, list):
        from collections import Counter

        return "[" + ", ".join(f"{n} × {v}" for v, n in Counter(map(str, value)).items()) + "]"
    return str(value)


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_rng(ckpt: Path, rank: int) -> None:
    path = ckpt / f"rng_rank_{rank}.pt"
    torch.save(rng_state(), path)
    _fsync(path)


def load_rng(ckpt: Path, rank: int) -> bool:
    path = ckpt / f"rng_rank_{rank}.pt"
    if not path.is_file():
        return False
    try:
        state = torch.load(path, weights_only=False)
    except OSError:
        raise
    except Exception as e:
        raise UserError(f"{path} is truncated or corrupt ({str(e).splitlines()[0][:120]}); resume from another "
                        "checkpoint") from None
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True
