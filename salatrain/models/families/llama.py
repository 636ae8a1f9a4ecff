"""Llama (and Llama-architecture models such as SmolLM2): ``attention_bias`` on all four projections."""

from .base import Family, llama_like

FAMILY = Family(name="llama", model_types=("llama",), config_fn=llama_like)
