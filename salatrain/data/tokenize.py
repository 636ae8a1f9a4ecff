"""Records → token ids and a loss mask, with the model's tokenizer.

text      ids of the text (the tokenizer's special tokens, plus EOS when ``append_eos``); every token a target
messages  the tokenizer's chat template rendered; targets are the tokens of assistant turns (their content and
          the template's end-of-turn text), found by rendering the conversation up to each turn and matching
          character offsets, so it works for any prefix-consistent template
"""

from __future__ import annotations

import hashlib
import json

from ..errors import UserError


def encode_text(text: str, tokenizer, append_eos: bool) -> tuple[list[int], list[int]]:
    ids = tokenizer(text)["input_ids"]
    eos = tokenizer.eos_token_id
    if append_eos and eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return ids, [1] * len(ids)


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = render(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise UserError("the tokenizer's chat template is not prefix-consistent (rendering the first turns "
                            "does not give a prefix of the whole conversation); cannot mask non-assistant turns")
        spans.append((len(before), len(upto)))
    return full, spans


def encode_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise UserError('chat records must be {"messages": [{"role": ..., "content": ...}, ...]}')
    full, spans = assistant_spans(messages, tokenizer)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= start < e for s, e in spans)) for start, _ in enc["offset_mapping"]]
    return enc["input_ids"], mask


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of what tokenizing depends on (vocabulary, merges, special tokens, chat template)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    return h.hexdigest()[:16]


def tokenize_part(part, tokenizer, append_eos: bool, num_proc: int = 1):
    """A ``datasets.Dataset`` of ``input_ids``, ``loss_mask``, ``length``; records without targets dropped."""
    if part.kind == "messages" and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{part.name}: chat records need a tokenizer with a chat template")

    def fn(batch):
        out = {"input_ids": [], "loss_mask": [], "length": []}
        for record in batch[part.kind]:
            if part.kind == "text":
                ids, mask = encode_text(record, tokenizer, append_eos)
            else:
                ids, mask = encode_chat(record, tokenizer)
            out["input_ids"].append(ids)
            out["loss_mask"].append(mask)
            out["length"].append(len(ids))
        return out

    fingerprint = hashlib.sha256(
        f"{part.dataset._fingerprint}|{tokenizer_fingerprint(tokenizer)}|{part.kind}|{append_eos}".encode()
    ).hexdigest()[:16]
    from datasets import Features, Sequence, Value

    features = Features({"input_ids": Sequence(Value("int32")), "loss_mask": Sequence(Value("uint8")),
                         "length": Value("int64")})
    # num_proc=1 means this process: datasets >= 5 would start a pool of one worker (and swap os.environ)
    ds = part.dataset.map(fn, batched=True, batch_size=256, remove_columns=[part.kind],
                          num_proc=num_proc if num_proc > 1 else None,
                          features=features, new_fingerprint=fingerprint, desc=f"tokenize {part.name}")
    return ds.filter(lambda b: [sum(m) > 0 for m in b["loss_mask"]], batched=True,
                     new_fingerprint=fingerprint + "-nonempty")
