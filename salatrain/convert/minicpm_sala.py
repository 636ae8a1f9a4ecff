"""A hybrid in MiniCPM-SALA's released format (DESIGN §5), for the loaders built for that model.

    unfit(config)              what the released schema cannot express, each named (empty: it fits)
    rule_changes(config)       selection rules the released loaders apply instead of the hybrid's (a note, not
                               a refusal: outputs differ only for sequences of dense_len tokens or more)
    released_config(config)    the config.json dict: released keys, plus the entries an import kept verbatim
    write_released(...)        weights under the released names, config.json with ``auto_map`` to the modeling
                               files of ``salatrain/models/released`` (torch + transformers only), side files
    export_hf_dir(src, out)    a salatrain HF hybrid directory → the released format, one tensor at a time

The weight names are the hybrid's except the sparse output gate (``g_proj`` → ``o_gate``), through the same
rename table the import uses (``families/minicpm_sala.py``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Iterable

import torch

from ..errors import UserError
from ..hf_checkpoint import CheckpointDir, ShardWriter, copy_side_files, parse_size
from ..models.configuration_sala_hybrid import SalaHybridConfig
from ..models.families import minicpm_sala as family
from .transfer import meta_shapes

log = logging.getLogger(__name__)
FORMATS = ("salatrain", "minicpm_sala")
CODE_DIR = Path(__file__).resolve().parent.parent / "models" / "released"
MODEL_FILES = ("configuration_minicpm_sala.py", "modeling_minicpm_sala.py")
AUTO_MAP = {
    "AutoConfig": "configuration_minicpm_sala.MiniCPMSALAConfig",
    "AutoModel": "modeling_minicpm_sala.MiniCPMSALAModel",
    "AutoModelForCausalLM": "modeling_minicpm_sala.MiniCPMSALAForCausalLM",
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)} (got {fmt!r})")


def rope_scaling(cfg: SalaHybridConfig) -> dict | None:
    """The hybrid's RoPE as the released ``rope_scaling`` entry (None: plain RoPE)."""
    rp = dict(cfg.rope_parameters or {})
    kind = rp.get("rope_type", "default")
    if kind == "default":
        return None
    if kind == "longrope":
        keys = ("long_factor", "short_factor", "original_max_position_embeddings")
        return {"rope_type": "longrope", **{k: rp.get(k) for k in keys}}
    return {"rope_type": kind}


def unfit(cfg: SalaHybridConfig) -> list[str]:
    """Everything about ``cfg`` the released schema cannot express, one phrase each."""
    mixers = cfg.mixer_types
    sparse = [i for i, m in enumerate(mixers) if m == "sparse_attention"]
    linear = [i for i, m in enumerate(mixers) if m == "linear_attention"]
    out = []
    full = [i for i, m in enumerate(mixers) if m == "full_attention"]
    if full:
        out.append(f"full_attention layers {full} (the schema has only sparse and Lightning layers)")
    if mixers and mixers[0] != "sparse_attention":
        out.append(f"layer 0 is {mixers[0]} (the released code needs layer 0 sparse)")
    if cfg.qkv_bias or cfg.o_bias:
        which = "q/k/v" if not cfg.o_bias else ("q/k/v/o" if cfg.qkv_bias else "o")
        out.append(f"{which} projection biases (the schema has no attention biases)")
    if cfg.mlp_bias:
        out.append("MLP biases")
    if cfg.qk_norm and sparse:
        out.append(f"q/k norms in the sparse layers {sparse} (the released sparse layers have none)")
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        out.append(f"head_dim={cfg.head_dim} != hidden_size/num_attention_heads="
                   f"{cfg.hidden_size // cfg.num_attention_heads} (the released sparse layers use the latter)")
    if linear and not math.log2(cfg.num_attention_heads).is_integer():
        out.append(f"{cfg.num_attention_heads} Lightning heads, not a power of two (the released decay slopes "
                   "differ from 2^(-8h/H))")
    sc, lc = cfg.sparse_config, cfg.lightning_config
    if sc["nope_logit_scale"] and sparse:
        out.append("sparse.nope_logit_scale (the released sparse layers do not scale logits)")
    if lc["norm_eps"] is not None and lc["norm_eps"] != cfg.rms_norm_eps and linear:
        out.append(f"lightning.norm_eps={lc['norm_eps']} != rms_norm_eps={cfg.rms_norm_eps}")
    uses_rope = (linear and lc["use_rope"]) or (sparse and sc["use_rope"])
    if uses_rope:
        out += family.rope_unsupported(rope_scaling(cfg), cfg.max_position_embeddings)
    return out


def check_released(cfg: SalaHybridConfig) -> None:
    bad = unfit(cfg)
    if bad:
        raise UserError(f"the MiniCPM-SALA format cannot express this hybrid: {'; '.join(bad)}")


def rule_changes(cfg: SalaHybridConfig) -> dict:
    """{key: (the hybrid's value, the released one)} for the selection rules the released loaders fix."""
    if "sparse_attention" not in cfg.mixer_types:
        return {}
    return {k: (cfg.sparse_config[k], v) for k, v in family.RELEASED_RULES.items() if cfg.sparse_config[k] != v}


def released_config(cfg: SalaHybridConfig, dtype: torch.dtype | None = None) -> dict:
    """config.json of ``cfg`` in the released schema; entries kept by an import are written back unchanged."""
    sc, n = cfg.sparse_config, cfg.num_hidden_layers
    rp = cfg.rope_parameters or {}
    extra = dict(cfg.imported_config_extra or {})
    sparse_extra = extra.pop("sparse_config", {"use_nope": False})
    derived = {
        "architectures": ["MiniCPMSALAForCausalLM"],
        "auto_map": dict(AUTO_MAP),
        "model_type": "minicpm_sala",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": n,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": rp.get("rope_theta", 10000.0),
        "rope_scaling": rope_scaling(cfg),
        "scale_emb": cfg.scale_emb,
        "scale_depth": cfg.scale_depth if cfg.scale_depth is not None else math.sqrt(n),  # residual factor 1
        "dim_model_base": cfg.dim_model_base if cfg.dim_model_base is not None else cfg.hidden_size,  # logits ÷ 1
        "mixer_types": [family.SPARSE_MIXER if m == "sparse_attention" else family.LIGHTNING_MIXERS[0]
                        for m in cfg.mixer_types],
        "sparse_config": {**{k: sc[k] for k in family.SPARSE_KEYS}, **sparse_extra},
        "attention_bias": False,
        "attn_use_rope": bool(sc["use_rope"]),
        "attn_use_output_gate": True,
        "lightning_nh": cfg.num_attention_heads,
        "lightning_nkv": cfg.num_attention_heads,
        "lightning_head_dim": cfg.head_dim,
        "lightning_scale": "1/sqrt(d)",
        "lightning_use_rope": bool(cfg.lightning_config["use_rope"]),
        "qk_norm": True,
        "use_output_norm": True,
        "use_output_gate": True,
    }
    out = {"use_cache": True, **extra, **derived}
    if dtype is not None:
        for key in [k for k in ("torch_dtype", "dtype") if k in extra] or ["torch_dtype"]:
            out[key] = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    return out


def write_released(cfg: SalaHybridConfig, tensors: Iterable[tuple[str, torch.Tensor]], out: Path, *,
                   max_shard_size: str = "5GB", side_files_from: Path | None = None) -> list[str]:
    """Write ``tensors`` (hybrid names) into ``out`` in the released format; returns the shard names."""
    check_released(cfg)
    writer = ShardWriter(out, parse_size(max_shard_size))
    dtype = None
    for key, t in tensors:
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        dtype = dtype or (t.dtype if t.is_floating_point() else None)
        writer.add(family.FAMILY.source_key(key), t)
    shards = writer.finish()
    if side_files_from is not None:
        copy_side_files(Path(side_files_from), out)
    for name in MODEL_FILES:
        shutil.copy2(CODE_DIR / name, out / name)
    (out / "config.json").write_text(json.dumps(released_config(cfg, dtype), indent=2) + "\n")
    changes = rule_changes(cfg)
    if changes:
        log.warning("the MiniCPM-SALA loaders select blocks by the released rules: %s; outputs change only for "
                    "sequences of dense_len=%d tokens or more", ", ".join(f"{k} {a} -> {b}" for k, (a, b) in
                                                                        changes.items()),
                    cfg.sparse_config["dense_len"])
    return shards


def export_hf_dir(src: str | Path, out: Path, *, dtype: torch.dtype | None = None, max_shard_size: str = "5GB") -> Path:
    """A salatrain HF hybrid directory (what convert and train write) → ``out`` in the released format."""
    ckpt = CheckpointDir(src)
    if ckpt.model_type != SalaHybridConfig.model_type:
        raise UserError(f"{ckpt.path} is not a salatrain hybrid (model_type {ckpt.model_type!r}, expected "
                        f"{SalaHybridConfig.model_type!r})")
    cfg = SalaHybridConfig.from_pretrained(ckpt.path)
    check_released(cfg)
    expected, found = meta_shapes(cfg), ckpt.shapes()
    odd = sorted(set(found) ^ set(expected)) or [k for k in expected if tuple(found[k]) != expected[k]]
    if odd:
        raise UserError(f"{ckpt.path}: weights do not match its config.json (e.g. {odd[:3]})")

    def tensors():
        with ckpt.reader() as reader:
            for key in expected:
                t = reader.get(key)
                yield key, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)

    write_released(cfg, tensors(), out, max_shard_size=max_shard_size, side_files_from=ckpt.path)
    return out
