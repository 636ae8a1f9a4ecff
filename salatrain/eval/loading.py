"""Open a model directory for evaluation: a hybrid checkpoint, or a dense one (as the hybrid with every layer
``full_attention`` when its family is supported, else through transformers' Auto classes)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..hf_checkpoint import CheckpointDir

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: str
    kind: str  # "hybrid" | "dense" | "transformers"
    mixer_counts: dict[str, int]


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N (got {name!r})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r}: CUDA is not available on this machine (use device=cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"dtype must be auto, {', '.join(DTYPES)} (got {dtype!r})")
    return DTYPES[dtype]


def check_model_dir(path: str) -> CheckpointDir:
    """Validate a model directory up front (config, weights, tokenizer) so errors come before any work."""
    ckpt = CheckpointDir(path)
    if not any((ckpt.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UserError(f"{ckpt.path} has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    if ckpt.model_type == "sala_hybrid":
        from ..models import SalaHybridConfig

        try:
            SalaHybridConfig.from_pretrained(ckpt.path)
        except ValueError as e:
            raise UserError(f"{ckpt.path}: {str(e).splitlines()[0]}") from None
    return ckpt


def load_model(path: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    from ..hf_checkpoint import load_tokenizer

    from ..models import SalaHybridForCausalLM
    from ..models.families import family_for
    from ..models.loading import load_dense_as_hybrid

    ckpt = check_model_dir(path)
    if ckpt.model_type == "sala_hybrid":
        try:
            model, kind = SalaHybridForCausalLM.from_pretrained(ckpt.path, dtype=dtype), "hybrid"
        except ValueError as e:  # its config.json (mixer types, sparse geometry, ...) does not hold together
            raise UserError(f"{ckpt.path}: {str(e).splitlines()[0]}") from None
    else:
        try:
            family = family_for(ckpt.model_type)
        except ValueError:
            family = None
        if family is not None:
            model, kind = load_dense_as_hybrid(ckpt, dtype=dtype), "hybrid" if family.hybrid else "dense"
        else:
            log.info("%s: model_type %r is not a salatrain family; loading with AutoModelForCausalLM",
                     ckpt.path, ckpt.model_type)
            model, kind = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=dtype), "transformers"
    tokenizer = load_tokenizer(ckpt.path)
    mixers = getattr(model.config, "mixer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    counts = {m: mixers.count(m) for m in dict.fromkeys(mixers)}
    return LoadedModel(model.to(device).eval(), tokenizer, str(ckpt.path), kind, counts)
