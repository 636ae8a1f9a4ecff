"""Hybrid model (torch + transformers only): configuration, modeling, mixers, family adapters, layer plans."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_sala_hybrid import MIXER_TYPES, SalaHybridConfig
from .modeling_sala_hybrid import SalaHybridCache, SalaHybridForCausalLM, SalaHybridModel

AutoConfig.register(SalaHybridConfig.model_type, SalaHybridConfig, exist_ok=True)
AutoModel.register(SalaHybridConfig, SalaHybridModel, exist_ok=True)
AutoModelForCausalLM.register(SalaHybridConfig, SalaHybridForCausalLM, exist_ok=True)

__all__ = ["MIXER_TYPES", "SalaHybridCache", "SalaHybridConfig", "SalaHybridForCausalLM", "SalaHybridModel"]
