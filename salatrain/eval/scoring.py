"""Scoring a causal LM on probe samples and on text: answer log-probability, greedy exact match, perplexity.

Greedy exact match is computed by teacher forcing: greedy decoding reproduces the answer's first k tokens iff,
fed the prompt and the answer's first j tokens, the model's argmax is answer token j for every j < k. One
forward pass over prompt + answer therefore gives both scores (equal to running ``generate`` and comparing
the first ``len(answer)`` new tokens, without a cache or a decode loop).

Models are called as ``model(input_ids=ids, use_cache=False, logits_to_keep=k)`` — any transformers causal LM
and the hybrid. Text losses go through :func:`token_losses`, which bounds the memory of the vocabulary logits.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .probes import ProbeSample

LOGIT_CHUNK = 1024  # positions whose vocabulary logits are materialised at once


@dataclass(frozen=True)
class SampleScore:
    task: str
    length: int
    num_tokens: int
    answer_logprob: float  # mean log p(answer token) over the answer's tokens
    exact_match: bool  # greedy continuation starts with the answer tokens


def answer_scores(logits_AV: torch.Tensor, answer_ids: torch.Tensor) -> tuple[float, bool]:
    """logits [A, V] predicting each of the A answer tokens → (mean log-prob, all argmax correct)."""
    logp = torch.log_softmax(logits_AV.float(), dim=-1)
    picked = logp.gather(-1, answer_ids.view(-1, 1)).squeeze(-1)
    return float(picked.mean()), bool((logits_AV.argmax(-1) == answer_ids).all())


@torch.no_grad()
def score_sample(model, sample: ProbeSample, device: torch.device | str = "cpu",
                 chunk_tokens: int | None = None) -> SampleScore:
    """``chunk_tokens``: feed the sequence through the model's cache this many tokens at a time (memory
    bounded by the chunk, same scores)."""
    ids = torch.tensor([sample.prompt_ids + sample.answer_ids], device=device)
    a = len(sample.answer_ids)
    if chunk_tokens and ids.shape[1] > chunk_tokens:
        start = ids.shape[1] - a - 1
        parts = [_logits(model, out)[0, max(0, start - s):] for s, out in chunk_outputs(model, ids, chunk_tokens)
                 if s + out.shape[1] > start]
        logits = torch.cat(parts)[:a]
    else:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=a + 1).logits[0, :-1]
    lp, em = answer_scores(logits, torch.tensor(sample.answer_ids, device=logits.device))
    return SampleScore(sample.task, sample.length, sample.num_tokens, lp, em)


@torch.no_grad()
def chunk_outputs(model, ids_1T: torch.Tensor, chunk: int):
    """Yields (start, out) for consecutive chunks fed through the model's cache: out is the final hidden
    states [1, c, C] for the hybrid class, the logits [1, c, V] for other transformers models."""
    from ..models import SalaHybridCache, SalaHybridForCausalLM

    hybrid = isinstance(model, SalaHybridForCausalLM)
    if hybrid:
        cache = SalaHybridCache(model.config)
    else:
        from transformers import DynamicCache

        cache = DynamicCache()
        # transformers renamed past_key_values to cache (5.2x); 5.17 knows only the old name
        arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for s in range(0, ids_1T.shape[1], chunk):
        piece = ids_1T[:, s : s + chunk]
        if hybrid:
            yield s, model.model(input_ids=piece, cache=cache, use_cache=True).last_hidden_state
        else:
            out = model(input_ids=piece, use_cache=True, **{arg: cache})
            cache = getattr(out, arg)
            yield s, out.logits


def _logits(model, out: torch.Tensor) -> torch.Tensor:
    from ..models import SalaHybridForCausalLM

    if not isinstance(model, SalaHybridForCausalLM):
        return out
    scale = model.config.logit_scale
    return model.get_output_embeddings()(out * scale if scale != 1.0 else out)


def summarize(scores: list[SampleScore]) -> dict[str, dict[str, dict]]:
    """{task: {length: {exact_match, answer_logprob, num_samples, mean_tokens}}} (means over samples)."""
    out: dict[str, dict[str, dict]] = {}
    for task in dict.fromkeys(s.task for s in scores):
        for length in sorted({s.length for s in scores if s.task == task}):
            group = [s for s in scores if s.task == task and s.length == length]
            out.setdefault(task, {})[str(length)] = {
                "exact_match": sum(s.exact_match for s in group) / len(group),
                "answer_logprob": sum(s.answer_logprob for s in group) / len(group),
                "num_samples": len(group),
                "mean_tokens": sum(s.num_tokens for s in group) / len(group),
            }
    return out


def chance(vocab_size: int) -> dict[str, float]:
    """Scores of a model that guesses uniformly: log-prob −log V per token, exact match ~0."""
    return {"exact_match": 0.0, "answer_logprob": -math.log(vocab_size)}


def hidden_to_logprobs(model, h_BTC: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """log p(target) [B, T] from final hidden states (after the model's final norm), in chunks of positions."""
    scale = getattr(model.config, "logit_scale", 1.0)
    head = model.get_output_embeddings()
    out = []
    for s in range(0, h_BTC.shape[1], LOGIT_CHUNK):
        h = h_BTC[:, s : s + LOGIT_CHUNK]
        logits = head(h * scale if scale != 1.0 else h).float()
        out.append(-F.cross_entropy(logits.transpose(1, 2), targets_BT[:, s : s + LOGIT_CHUNK], reduction="none"))
    return torch.cat(out, dim=1)


@torch.no_grad()
def token_losses(model, ids_BT: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
    """Next-token losses [B, T-1]. The hybrid's head runs in chunks; other models return full logits.
    ``chunk_tokens`` (B = 1): the sequence goes through the model's cache that many tokens at a time."""
    from ..models import SalaHybridForCausalLM

    if chunk_tokens and ids_BT.shape[1] > chunk_tokens:
        out = []
        for s, o in chunk_outputs(model, ids_BT, chunk_tokens):
            n = min(o.shape[1], ids_BT.shape[1] - 1 - s)  # the last position has no target
            targets = ids_BT[:, s + 1 : s + 1 + n]
            if isinstance(model, SalaHybridForCausalLM):
                out.append(-hidden_to_logprobs(model, o[:, :n], targets))
            else:
                out.append(F.cross_entropy(o[:, :n].float().transpose(1, 2), targets, reduction="none"))
        return torch.cat(out, dim=1)
    if isinstance(model, SalaHybridForCausalLM):
        h = model.model(input_ids=ids_BT, use_cache=False).last_hidden_state
        return -hidden_to_logprobs(model, h[:, :-1], ids_BT[:, 1:])
    logits = model(input_ids=ids_BT, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), ids_BT[:, 1:], reduction="none")


@torch.no_grad()
def perplexity(model, windows: list[list[int]], device: torch.device | str = "cpu",
               chunk_tokens: int | None = None) -> dict:
    """Mean next-token loss and perplexity over token windows (each scored independently)."""
    if not windows:
        raise ValueError("no text to score")
    total, count = 0.0, 0
    for w in windows:
        losses = token_losses(model, torch.tensor([w], device=device), chunk_tokens)
        total += float(losses.sum())
        count += losses.numel()
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "windows": len(windows),
            "seq_len": max(len(w) for w in windows)}
