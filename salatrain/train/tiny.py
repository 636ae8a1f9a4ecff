"""Built-in tiny assets for CPU runs and tests, made offline and cached under ``$SALATRAIN_CACHE/tiny-v1``:

    builtin:tiny-corpus   Python's documentation (``pydoc_data.topics``) as jsonl, one topic per record
    builtin:tiny-chat     chat records built from the same text (user asks, assistant quotes)
    builtin:tiny-dense    a random Llama: hidden 64, 4 layers, 4 heads / 2 KV heads, a 512-token byte-level BPE
                          trained on the corpus (ChatML template)
    builtin:tiny-hybrid   tiny-dense converted: sparse layers 0 and 3 (block 16, dense_len 32), Lightning 1 and 2

Any path of a config that starts with ``builtin:`` goes through :func:`resolve`. Building takes seconds and is
guarded by a file lock, so concurrent ranks or test workers build once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError
from ..realmodel import cache_root

VERSION = "tiny-v1"
PREFIX = "builtin:"
VOCAB_SIZE = 512
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPARSE = dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, topk=2, window_size=16, dense_len=32)


def root() -> Path:
    return cache_root() / VERSION


def resolve(path: str | None) -> str | None:
    """``builtin:<name>`` → the built asset's path (built on first use); any other path unchanged."""
    if path is None or not str(path).startswith(PREFIX):
        return path
    name = str(path)[len(PREFIX):]
    builders = {"tiny-corpus": _corpus, "tiny-chat": _chat, "tiny-dense": _dense, "tiny-hybrid": _hybrid}
    if name not in builders:
        raise UserError(f"unknown built-in {path!r}; available: {', '.join(PREFIX + n for n in builders)}")
    from filelock import FileLock

    root().mkdir(parents=True, exist_ok=True)
    with FileLock(str(root() / ".lock")):
        return str(builders[name]())


def doc_topics() -> list[tuple[str, str]]:
    """(topic, text) pairs of Python's reference documentation (``pydoc_data``), sorted by topic."""
    from pydoc_data.topics import topics

    return sorted((k, v.strip()) for k, v in topics.items() if v.strip())


def _write_atomic(out: Path, text: str) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)


def _corpus() -> Path:
    out = root() / "corpus.jsonl"
    if not out.exists():
        _write_atomic(out, "".join(json.dumps({"text": text, "topic": name}) + "\n" for name, text in doc_topics()))
    return out


def _chat() -> Path:
    out = root() / "chat.jsonl"
    if not out.exists():
        lines = []
        for name, text in doc_topics():
            parts = [text[i : i + 240] for i in range(0, min(len(text), 720), 240)]
            msgs = [{"role": "system", "content": "You quote the Python reference."}]
            msgs += [{"role": "user", "content": f"What does the reference say about {name}?"},
                     {"role": "assistant", "content": parts[0]}]
            for part in parts[1:]:
                msgs += [{"role": "user", "content": "Go on."}, {"role": "assistant", "content": part}]
            lines.append(json.dumps({"messages": msgs}) + "\n")
        _write_atomic(out, "".join(lines))
    return out


def _build_dir(out: Path, fill) -> Path:
    if (out / "config.json").exists():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        fill(tmp)
        if out.exists():  # an incomplete build (no config.json) left by a killed process: replace it
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def bpe_tokenizer(texts: list[str]):
    """A 512-token byte-level BPE trained on ``texts`` (seconds), with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL[0], pad_token=SPECIAL[0])
    fast.chat_template = CHATML
    return fast


def _dense() -> Path:
    def fill(tmp: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = bpe_tokenizer([t for _, t in doc_topics()])
        cfg = LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _build_dir(root() / "dense", fill)


def _hybrid() -> Path:
    dense = _dense()
    out = root() / "hybrid"
    if (out / "config.json").exists():
        return out
    from ..config.schema import ConvertConfig, PlanSettings, SparseSettings
    from ..convert.convert import convert

    if out.exists():  # an incomplete build left by a killed process
        shutil.rmtree(out)

    convert(ConvertConfig(model=str(dense), output_dir=str(out), plan=PlanSettings(sparse_layers=[0, 3]),
                          sparse=SparseSettings(**SPARSE), kl_check=False))
    return out
