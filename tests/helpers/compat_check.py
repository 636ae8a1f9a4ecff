"""Run under another transformers release (PYTHONPATH=<that release>): the model still matches transformers'
Llama/Qwen3, caches and generates, and saves/loads. Prints the checked version on success."""

import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from salatrain.models import SalaHybridForCausalLM  # noqa: E402
from salatrain.models.loading import load_dense_as_hybrid  # noqa: E402
from tests.helpers.checkpoints import make_dense_checkpoint, reference_model  # noqa: E402
from tests.test_checkpoint_roundtrip import _greedy_without_cache, tiny_hybrid  # noqa: E402


def main(expected_version: str) -> None:
    assert transformers.__version__ == expected_version, transformers.__version__
    ids = torch.randint(0, 96, (2, 33), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("llama", "qwen3", "mistral"):
            d = make_dense_checkpoint(family, Path(tmp) / family)
            with torch.no_grad():
                diff = (reference_model(family)(ids).logits - load_dense_as_hybrid(d)(ids, use_cache=False).logits)
            assert diff.abs().max() <= 1e-4, (family, diff.abs().max())
        model = tiny_hybrid(seed=1)
        with torch.no_grad():
            cached = model.generate(ids[:, :12], max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert torch.equal(cached, _greedy_without_cache(model, ids[:, :12], 20))
        model.save_pretrained(Path(tmp) / "h")
        again = SalaHybridForCausalLM.from_pretrained(Path(tmp) / "h")
        with torch.no_grad():
            assert torch.equal(model(ids, use_cache=False).logits, again(ids, use_cache=False).logits)
        check_released_modeling(Path(tmp) / "sala", ids)
    print("compat-ok", transformers.__version__)


def check_released_modeling(out: Path, ids: torch.Tensor) -> None:
    """The modeling files written for MiniCPM-SALA's format load, match salatrain's model and generate."""
    import shutil

    from transformers import AutoModelForCausalLM

    from salatrain.convert.minicpm_sala import CODE_DIR, MODEL_FILES
    from tests.helpers.sala_released import make_sala_checkpoint

    make_sala_checkpoint(out)
    for name in MODEL_FILES:
        shutil.copy2(CODE_DIR / name, out / name)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        diff = remote(ids, use_cache=False).logits - load_dense_as_hybrid(out)(ids, use_cache=False).logits
    assert diff.abs().max() <= 1e-5, diff.abs().max()
    with torch.no_grad():
        cached = remote.generate(ids[:1, :12], attention_mask=torch.ones_like(ids[:1, :12]), max_new_tokens=24,
                                 do_sample=False)
    greedy = ids[:1, :12]
    with torch.no_grad():
        for _ in range(cached.shape[1] - 12):
            greedy = torch.cat([greedy, remote(greedy, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(cached, greedy), (cached, greedy)


if __name__ == "__main__":
    main(sys.argv[1])
