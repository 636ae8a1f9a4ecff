"""salatrain: turn a pretrained dense Transformer into a fast long-context hybrid and keep training it.

Importing salatrain registers the hybrid model (``model_type="sala_hybrid"``) with transformers' Auto classes.
"""

import os as _os
import sys as _sys

# OpenMP threads that spin while waiting cost 3x throughput on a shared CPU (2 cores, other jobs running);
# passive waiting costs little when the CPU is free. It must be set before torch loads its OpenMP runtime.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# `salatrain --help` lists the commands without loading torch and transformers (seconds): the console entry
# (salatrain_entry) sets SALATRAIN_HELP_ONLY=1 for that one case, and nothing else runs in its process.
if _os.environ.get("SALATRAIN_HELP_ONLY") != "1":
    from .models import SalaHybridConfig, SalaHybridForCausalLM, SalaHybridModel  # noqa: E402

__version__ = "0.1.0"
__all__ = ["SalaHybridConfig", "SalaHybridForCausalLM", "SalaHybridModel", "__version__"]
