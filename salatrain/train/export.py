"""`salatrain export checkpoint=<dir> output_dir=<dir> [format=minicpm_sala]`: a training checkpoint → an HF checkpoint.

``checkpoint`` is a ``checkpoints/step_*`` directory or a training output_dir (its latest checkpoint). ZeRO-3
shards are consolidated on CPU in one process. The result is written with ``save_pretrained`` (config with
``auto_map``, the modeling files, safetensors) plus the tokenizer files; ``from_pretrained`` loads it.
An align checkpoint holds only the Lightning layers: the rest comes from its dense base model.
``format=minicpm_sala`` writes MiniCPM-SALA's released schema instead (convert/minicpm_sala.py); its
``checkpoint`` may also be a salatrain HF hybrid directory (a convert or train output).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers.initialization import no_init_weights

from .. import interrupt
from ..convert import minicpm_sala as released
from ..errors import UserError
from ..hf_checkpoint import CheckpointDir, copy_side_files
from ..models import SalaHybridConfig, SalaHybridForCausalLM
from ..rundir import OutputDir
from .checkpoint import find_checkpoint, is_complete, read_meta

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class ExportConfig:
    """salatrain export checkpoint=<checkpoints/step_N or training output_dir> output_dir=<dir>"""

    checkpoint: Optional[str] = None
    output_dir: Optional[str] = None
    dtype: str = "auto"  # auto (the training precision) | bf16 | fp32
    format: str = "salatrain"  # salatrain | minicpm_sala (MiniCPM-SALA's released schema and loaders)
    overwrite: bool = False


SCHEMA = ExportConfig


def check(cfg: ExportConfig) -> tuple[Path, OutputDir]:
    """The checkpoint to export (for format=minicpm_sala also an HF hybrid directory) and the output directory,
    checked (nothing written)."""
    if not cfg.checkpoint or not cfg.output_dir:
        raise UserError("usage: salatrain export checkpoint=<checkpoint dir> output_dir=<dir>")
    if cfg.dtype not in ("auto", *DTYPES):
        raise UserError(f"dtype must be auto, bf16 or fp32 (got {cfg.dtype!r})")
    released.check_format(cfg.format)
    out = OutputDir(cfg.output_dir, "export", overwrite=cfg.overwrite)
    source = Path(cfg.checkpoint).expanduser()
    if _is_hybrid_dir(source):
        if cfg.format != "minicpm_sala":
            raise UserError(f"checkpoint={cfg.checkpoint} is already an HF model in salatrain's format (it loads with "
                            "transformers as it is); export takes a training checkpoint, or format=minicpm_sala "
                            "to rewrite this model in MiniCPM-SALA's released schema")
        out.check({"checkpoint": cfg.checkpoint})
        return source, out
    ckpt = find_checkpoint(cfg.checkpoint, "checkpoint")
    out.check({"checkpoint": str(ckpt), "base": read_meta(ckpt).get("base")})
    if cfg.format == "minicpm_sala":
        released.check_released(_hybrid_config(ckpt))
    return ckpt, out


def run(cfg: ExportConfig) -> None:
    ckpt, out = check(cfg)
    dtype = None if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    with out, out.atomic() as tmp:
        if cfg.format == "salatrain":
            export_checkpoint(ckpt, tmp, dtype=dtype)
        elif _is_hybrid_dir(ckpt):
            released.export_hf_dir(ckpt, tmp, dtype=dtype)
        else:
            model = build_model(ckpt, dtype)
            state = model.state_dict()
            _check_finite(ckpt, state)
            released.write_released(model.config, state.items(), tmp, side_files_from=ckpt / "hf")
    print(f"wrote {cfg.output_dir} ({cfg.format}) from {ckpt}")


def _is_hybrid_dir(path: Path) -> bool:
    """An HF directory of salatrain's hybrid (not a training checkpoint or output_dir)."""
    cfg = path / "config.json"
    if not cfg.is_file() or (path / "checkpoints").is_dir() or is_complete(path):
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == SalaHybridConfig.model_type
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _hybrid_config(ckpt: Path) -> SalaHybridConfig:
    try:
        return SalaHybridConfig.from_pretrained(ckpt / "hf")
    except (ValueError, OSError) as e:
        raise UserError(f"{ckpt / 'hf'}: not a valid hybrid config ({str(e).splitlines()[0]})") from None


def build_model(ckpt: Path, dtype: torch.dtype | None = None) -> SalaHybridForCausalLM:
    """The trained model of a checkpoint directory, on CPU, in its training precision unless ``dtype``."""
    from .engine import read_checkpoint_state_dict

    meta = read_meta(ckpt)
    state = read_checkpoint_state_dict(ckpt, meta["zero_stage"])
    student = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    if meta["loss"] == "mse_align":
        student = _with_base(student, meta)
    config = _hybrid_config(ckpt)
    with no_init_weights():  # every weight comes from the checkpoint; buffers are built from the config
        model = SalaHybridForCausalLM(config)
    missing, unexpected = model.load_state_dict(student, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"{ckpt}: checkpoint does not match its model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype or DTYPES[meta["precision"]]).eval()


def _with_base(aligned: dict, meta: dict) -> dict:
    """The base model's weights (read tensor by tensor) with every layer's attention replaced by its aligned
    Lightning layer."""
    from ..models.families import family_for

    base = CheckpointDir(meta["base"], what="base model")
    if base.fingerprint() != meta["base_fingerprint"]:
        raise UserError(f"base model {base.path} changed since the align run (fingerprint {base.fingerprint()} "
                        f"!= {meta['base_fingerprint']})")
    family = family_for(base.model_type)
    with base.reader() as reader:
        state = {k: reader.get(k) for k in base.key_files() if ".self_attn." not in k and not family.is_dropped(k)}
    state.update(aligned)
    return state


def _check_finite(ckpt: Path, state: dict) -> None:
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise UserError(f"{ckpt} holds NaN or inf in {len(bad)} of {len(state)} tensors (e.g. {bad[0]}): the run "
                        "diverged; nothing exported. Export an earlier checkpoint")


def export_checkpoint(ckpt: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """Write the HF checkpoint of ``ckpt`` into the directory ``out`` (created if needed).

    Files are written to a temporary directory inside ``out`` and moved in with ``config.json`` last, so
    ``out`` holds either the previous export or the new one as an HF checkpoint.
    """
    model = build_model(ckpt, dtype)
    _check_finite(ckpt, model.state_dict())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        copy_side_files(ckpt / "hf", tmp)
        for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
            if not (tmp / old.name).exists():
                old.unlink()
        names = sorted(p.name for p in tmp.iterdir() if p.name != "config.json") + ["config.json"]
        interrupt.check()
        with interrupt.deferred():
            for name in names:
                os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
