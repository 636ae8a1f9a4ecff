"""method=stepwise: keep layers one at a time, each measured given the layers kept before it.

HALO's sweep linearises one layer at a time with every other layer still attention, so it cannot see layers that
matter only together (on SmolLM2-135M, docs/quality.md: the layers whose single linearisation hurt retrieval most
were a cluster, 16–19, and the plan kept them and retrieved nothing after distillation, while evenly spaced layers
retrieved). Stepwise selection measures the converted model the plan will become:

    start   every layer linear (its aligned Lightning mixer) except the forced ones (first, last, include)
    step    for each candidate layer j (not kept, not excluded): restore j's attention and measure R and C;
            keep the j with the largest R (ties: larger C, then lower index)
    until   n layers are kept

Layers before j are the same for every candidate of a step, so each step runs one forward of the current model
(caching the hidden states entering every layer) and then layers j.. for each candidate j: L·(L+1)/2 layer passes
per token at most, like one HALO sweep, once per chosen layer. R and C are the built-in metrics of
salatrain.select.sweep (probe answer log-probability or exact match, −loss on held-out text).

Per layer the plan reports R and C when it was restored, at the step it was chosen (kept layers) or at the last
step (the others), and score = the gain in R over that step's starting model.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from .config import SelectConfig, constraints_of
from .methods import Selection, check_constraints
from .sweep import AlignedLayers, ActivationCache, LayerMetrics, Metrics, SweepInputs, metrics_of, swapped

log = logging.getLogger(__name__)


@contextlib.contextmanager
def linearised(model, layers: dict[int, torch.nn.Module]):
    """``model`` with layer i's mixer replaced by ``layers[i]`` for every i given; restored afterwards."""
    with contextlib.ExitStack() as stack:
        for i, mixer in layers.items():
            stack.enter_context(swapped(model, i, mixer))
        yield model


@torch.no_grad()
def stepwise_sweep(model, aligned: AlignedLayers, samples, windows, n: int, forced: dict[int, str],
                   exclude: list[int], retrieval_metric: str = "answer_logprob",
                   device: torch.device | str = "cpu") -> tuple[list[dict], dict]:
    """(steps, cost): the layers chosen in order, each step's starting metrics and every candidate's."""
    if not samples and not windows:
        raise ValueError("the stepwise sweep needs probe samples or text windows")
    t0 = time.time()
    num_layers = len(model.model.layers)
    dtype = next(model.parameters()).dtype
    seqs = [torch.tensor([s.prompt_ids + s.answer_ids], device=device) for s in samples]
    seqs += [torch.tensor([w], device=device) for w in windows]
    texts = seqs[len(samples):]
    attention = {i: layer.self_attn for i, layer in enumerate(model.model.layers)}
    lightning = {i: aligned.layer(i, dtype, device) for i in range(num_layers)}
    kept, steps, passes = set(forced), [], 0
    tokens = sum(s.shape[1] for s in seqs)
    while len(kept) < n:
        t = time.time()
        linear = {i: m for i, m in lightning.items() if i not in kept}
        with linearised(model, linear):
            caches = [ActivationCache(model, ids) for ids in seqs]
            start = metrics_of(model, [c.final for c in caches], samples, texts, retrieval_metric)
            passes += tokens * num_layers
            candidates: dict[int, Metrics] = {}
            for j in sorted(set(linear) - set(exclude)):
                with swapped(model, j, attention[j]):
                    finals = [c.run_from(model, j) for c in caches]
                candidates[j] = metrics_of(model, finals, samples, texts, retrieval_metric)
                passes += tokens * (num_layers - j)
        best = max(candidates, key=lambda j: (candidates[j].retrieval, candidates[j].commonsense, -j))
        steps.append({"kept_before": sorted(kept), "chosen": best,
                      "start": {"retrieval": start.retrieval, "commonsense": start.commonsense},
                      "candidates": {str(j): {"retrieval": m.retrieval, "commonsense": m.commonsense, **m.detail}
                                     for j, m in candidates.items()}})
        kept.add(best)
        log.info("stepwise: step %d kept layer %d: R %.4f -> %.4f, C %.4f -> %.4f (%d candidates, %.1f s)",
                 len(steps), best, start.retrieval, candidates[best].retrieval, start.commonsense,
                 candidates[best].commonsense, len(candidates), time.time() - t)
    cost = {"tokens": tokens, "sequences": len(seqs), "steps": len(steps), "layer_token_passes": passes,
            "full_forward_equivalents": round(passes / (tokens * num_layers), 2) if tokens else 0.0,
            "seconds": round(time.time() - t0, 1)}
    return steps, cost


def per_layer(steps: list[dict], num_layers: int) -> tuple[list, list, list, list]:
    """(R, C, R gain, C gain) per layer when restored, at the step it was chosen (a chosen layer is no later
    step's candidate), else at the last step; None for layers never measured (forced or excluded)."""
    r, c, r_gain, c_gain = ([None] * num_layers for _ in range(4))
    for step in steps:
        r0, c0 = step["start"]["retrieval"], step["start"]["commonsense"]
        for key, m in step["candidates"].items():
            j = int(key)
            r[j], c[j] = m["retrieval"], m["commonsense"]
            r_gain[j], c_gain[j] = m["retrieval"] - r0, m["commonsense"] - c0
    return r, c, r_gain, c_gain


def run_stepwise(cfg: SelectConfig, num_layers: int) -> tuple[LayerMetrics, Selection]:
    cons = constraints_of(cfg)
    n, forced = check_constraints(num_layers, "stepwise", cfg.ratio, cons)
    inp = SweepInputs.load(cfg)
    steps, cost = stepwise_sweep(inp.model, inp.aligned, inp.samples, inp.windows, n, forced, cons.exclude,
                                 cfg.sweep.retrieval_metric, inp.device)
    r, c, r_gain, c_gain = per_layer(steps, num_layers)
    source = {**inp.source(cfg, "stepwise"), "order": [step["chosen"] for step in steps]}
    first = steps[0]["start"] if steps else None
    metrics = LayerMetrics(r, c, first, source, cost, raw={"method": "stepwise", "steps": steps, "cost": cost},
                           gains=(r_gain, c_gain))
    kept = sorted([*forced, *(step["chosen"] for step in steps)])
    sel = Selection(kept, r_gain, dict(sorted(forced.items())), n)
    return metrics, sel
