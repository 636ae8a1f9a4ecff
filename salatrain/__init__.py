"""salatrain: turn a pretrained dense Transformer into a fast long-context hybrid and keep training it.

Importing salatrain registers the hybrid model (``model_type="sala_hybrid"``) with transformers' Auto classes.
"""

from .models import SalaHybridConfig, SalaHybridForCausalLM, SalaHybridModel

__version__ = "0.1.0"
__all__ = ["SalaHybridConfig", "SalaHybridForCausalLM", "SalaHybridModel", "__version__"]
