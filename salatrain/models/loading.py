"""Load a dense HF checkpoint as the hybrid model with every layer ``full_attention`` (the reference the
conversion and the tests compare against; equals transformers' own model for the supported families)."""

from __future__ import annotations

import torch

from ..hf_checkpoint import CheckpointDir
from .configuration_sala_hybrid import SalaHybridConfig
from .families import family_for
from .modeling_sala_hybrid import SalaHybridForCausalLM


def dense_config(src: CheckpointDir, **overrides) -> SalaHybridConfig:
    kw = family_for(src.model_type).hybrid_config_kwargs(src.config)
    kw.update(overrides)
    return SalaHybridConfig(**kw)


def load_dense_as_hybrid(src: CheckpointDir | str, dtype: torch.dtype = torch.float32, **overrides) -> SalaHybridForCausalLM:
    """The dense checkpoint as a hybrid with every layer full_attention, on CPU, parameters built directly in
    ``dtype`` (no random initialisation: every weight comes from the checkpoint; buffers such as RoPE
    frequencies stay fp32). A checkpoint whose keys do not match is a ValueError naming them."""
    from transformers.initialization import no_init_weights

    src = src if isinstance(src, CheckpointDir) else CheckpointDir(src)
    cfg = dense_config(src, **overrides)
    family = family_for(src.model_type)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = SalaHybridForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    with src.reader() as r:
        state = {k: r.get(k) for k in src.key_files() if not family.is_dropped(k)}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{src.path}: missing {missing[:3]}, unexpected {unexpected[:3]} weights")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
