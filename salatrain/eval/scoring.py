"""Scoring a causal LM on probe samples and on text: answer log-probability, greedy exact match, perplexity.

Greedy exact match is computed by teacher forcing: greedy decoding reproduces the answer's first k tokens iff,
fed the prompt and the answer's first j tokens, the model's argmax is answer token j for every j < k. One
forward pass over prompt + answer therefore gives both scores (equal to running ``generate`` and comparing
the first ``len(answer)`` new tokens, without a cache or a decode loop).

Models are called as ``model(input_ids=ids, use_cache=False, logits_to_keep=k)`` — any transformers causal LM
and the hybrid. Text losses go through :func:`token_losses`, which bounds the memory of the vocabulary logits.
"""

from __future__ import annotations

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
def score_sample(model, sample: ProbeSample, device: torch.device | str = "cpu") -> SampleScore:
    ids = torch.tensor([sample.prompt_ids + sample.answer_ids], device=device)
    a = len(sample.answer_ids)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=a + 1).logits[0, :-1]
    lp, em = answer_scores(logits, torch.tensor(sample.answer_ids, device=logits.device))
    return SampleScore(sample.task, sample.length, sample.num_tokens, lp, em)


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
def token_losses(model, ids_BT: torch.Tensor) -> torch.Tensor:
    """Next-token losses [B, T-1]. The hybrid's head runs in chunks; other models return full logits."""
    from ..models import SalaHybridForCausalLM

    if isinstance(model, SalaHybridForCausalLM):
        h = model.model(input_ids=ids_BT, use_cache=False).last_hidden_state
        return -hidden_to_logprobs(model, h[:, :-1], ids_BT[:, 1:])
    logits = model(input_ids=ids_BT, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), ids_BT[:, 1:], reduction="none")


@torch.no_grad()
def perplexity(model, windows: list[list[int]], device: torch.device | str = "cpu") -> dict:
    """Mean next-token loss and perplexity over token windows (each scored independently)."""
    if not windows:
        raise ValueError("no text to score")
    total, count = 0.0, 0
    for w in windows:
        losses = token_losses(model, torch.tensor([w], device=device))
        total += float(losses.sum())
        count += losses.numel()
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "windows": len(windows),
            "seq_len": max(len(w) for w in windows)}
