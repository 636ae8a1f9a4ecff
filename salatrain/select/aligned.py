"""The align stage's output read one Lightning layer at a time.

An align output is an HF checkpoint whose config has every layer ``linear_attention`` and whose
``model.layers.{i}.self_attn.*`` tensors are layer i's aligned Lightning mixer, plus ``align_report.json``
(``base_fingerprint``: the dense base it was aligned from; ``per_layer_mse``).
"""

from __future__ import annotations

import json
import logging

import torch

from ..errors import UserError
from ..hf_checkpoint import CheckpointDir
from ..models import SalaHybridConfig
from ..models.modeling_sala_hybrid import LightningAttention

log = logging.getLogger(__name__)
_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "vocab_size")


class AlignedLayers:
    """Validated align output; ``layer(i)`` builds layer i's aligned ``LightningAttention``."""

    def __init__(self, path: str, base: CheckpointDir, base_config: SalaHybridConfig):
        self.ckpt = CheckpointDir(path, what="aligned")
        self.report = self._check_report(base)
        try:
            self.config = SalaHybridConfig.from_pretrained(self.ckpt.path)
        except (ValueError, TypeError, OSError) as e:
            raise UserError(f"{self.ckpt.path}: not a salatrain hybrid checkpoint ({str(e).splitlines()[0]})") from None
        mixers = self.config.mixer_types
        if self.ckpt.model_type != "sala_hybrid" or any(m != "linear_attention" for m in mixers):
            raise UserError(f"{self.ckpt.path} is not an align output (expected every layer linear_attention)")
        for key in _SHAPE_KEYS:
            if getattr(self.config, key) != getattr(base_config, key):
                raise UserError(f"aligned {key}={getattr(self.config, key)} does not match the base model's "
                                f"{getattr(base_config, key)}")

    def _check_report(self, base: CheckpointDir) -> dict:
        path = self.ckpt.path / "align_report.json"
        if not path.is_file():
            log.warning("%s has no align_report.json; cannot check it was aligned from %s", self.ckpt.path, base.path)
            return {}
        try:
            report = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        fp = report.get("base_fingerprint")
        if fp and fp != base.fingerprint():
            raise UserError(f"{self.ckpt.path} was aligned from a different base model than {base.path} "
                            f"(fingerprint {fp} != {base.fingerprint()})")
        return report

    def layer(self, i: int, dtype: torch.dtype, device: torch.device) -> LightningAttention:
        prefix = f"model.layers.{i}.self_attn."
        keys = [k for k in self.ckpt.key_files() if k.startswith(prefix)]
        with self.ckpt.reader() as r:
            state = {k[len(prefix):]: r.get(k) for k in keys}
        mixer = LightningAttention(self.config, i)
        missing, unexpected = mixer.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"{self.ckpt.path}: layer {i} Lightning weights do not match (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
        return mixer.to(device=device, dtype=dtype).eval()
