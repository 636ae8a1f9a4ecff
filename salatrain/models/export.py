"""Write config.json with ``auto_map`` and the modeling files next to the weights.

The copied files import only torch and transformers, so ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` works where salatrain is not installed. ``SalaHybridForCausalLM.save_pretrained``
does the same for whole models; this writes them for a config alone (streaming conversion).
"""

from __future__ import annotations

from pathlib import Path

from .configuration_sala_hybrid import SalaHybridConfig
from .modeling_sala_hybrid import AUTO_MAP, copy_model_code


def write_model_code(config: SalaHybridConfig, out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["SalaHybridForCausalLM"]
    config.save_pretrained(out)
    copy_model_code(out)
