"""Load a supported HF checkpoint as the hybrid model: a dense base with every layer ``full_attention`` (the
reference the conversion and the tests compare against; equals transformers' own model for the supported families),
or a MiniCPM-SALA checkpoint with its own layer mix."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..hf_checkpoint import CheckpointDir
from .configuration_sala_hybrid import SalaHybridConfig
from .families import family_for
from .modeling_sala_hybrid import SalaHybridForCausalLM


def source_config(src: CheckpointDir, **overrides) -> SalaHybridConfig:
    """The checkpoint's model as a hybrid config: dense bases all ``full_attention``, hybrids their own mix."""
    kw = family_for(src.model_type).hybrid_config_kwargs(src.config)
    kw.update(overrides)
    return SalaHybridConfig(**kw)


def dense_config(src: CheckpointDir, **overrides) -> SalaHybridConfig:
    """The config of a dense base model (what align and select start from); a hybrid checkpoint is refused."""
    family = family_for(src.model_type)
    if family.hybrid:
        raise UserError(f"{src.path} is a {family.name} hybrid checkpoint; this step needs the dense base model")
    return source_config(src, **overrides)


def load_dense_as_hybrid(src: CheckpointDir | str, dtype: torch.dtype = torch.float32, **overrides) -> SalaHybridForCausalLM:
    """The checkpoint as a hybrid (a dense one with every layer full_attention), on CPU, parameters built directly
    in ``dtype`` (no random initialisation: every weight comes from the checkpoint; buffers such as RoPE
    frequencies stay fp32). A checkpoint whose keys do not match is a ValueError naming them."""
    from transformers.initialization import no_init_weights

    src = src if isinstance(src, CheckpointDir) else CheckpointDir(src)
    cfg = source_config(src, **overrides)
    family = family_for(src.model_type)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = SalaHybridForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    with src.reader() as r:
        state = {family.hybrid_key(k): r.get(k) for k in src.key_files() if not family.is_dropped(k)}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, t in state.items():
        if k in shapes and tuple(t.shape) != shapes[k]:
            raise ValueError(f"{src.path}: {family.source_key(k)} has shape {list(t.shape)}, config.json implies "
                             f"{list(shapes[k])}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [family.source_key(k) for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    unexpected = [family.source_key(k) for k in unexpected]
    if missing or unexpected:
        raise ValueError(f"{src.path}: missing {missing[:3]}, unexpected {unexpected[:3]} weights")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
