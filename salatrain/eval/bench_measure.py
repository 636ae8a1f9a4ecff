"""One `salatrain bench` measurement: a synthetic prompt through the model with its cache (prefill, first token),
then token-by-token decoding with that cache; warm-up runs first, medians of the timed runs."""

from __future__ import annotations

import inspect
import logging
import statistics

import torch

from .bench_config import BenchConfig
from .bench_device import Clock, PeakMemory, is_oom

log = logging.getLogger("salatrain.eval.bench")


def load_bench_model(kind: str, path, device: torch.device, dtype: torch.dtype):
    """The model on ``device`` in eval mode: ``kind`` hybrid (salatrain's class), transformers (transformers' own
    class: the dense baseline a user gets) or dense-as-hybrid (a salatrain family transformers does not ship)."""
    from transformers import AutoModelForCausalLM

    from ..models import SalaHybridForCausalLM
    from ..models.loading import load_dense_as_hybrid

    if kind == "hybrid":
        model = SalaHybridForCausalLM.from_pretrained(path, dtype=dtype)
    elif kind == "transformers":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = load_dense_as_hybrid(path, dtype=dtype)
    return model.to(device).eval()


def cache_arg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); the hybrid takes both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _step(model, ids: torch.Tensor, cache, arg: str):
    kw = {arg: cache} if cache is not None else {}
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    return cache, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def prefill(model, ids_BT: torch.Tensor, chunk: int | None, arg: str):
    """The prompt through the model (in ``chunk``-token pieces when given); returns (cache, first token [B, 1])."""
    cache, token, step = None, None, chunk or ids_BT.shape[1]
    for s in range(0, ids_BT.shape[1], step):
        cache, token = _step(model, ids_BT[:, s : s + step], cache, arg)
    return cache, token


@torch.no_grad()
def decode(model, cache, token: torch.Tensor, steps: int, arg: str):
    for _ in range(steps):
        cache, token = _step(model, token, cache, arg)
    return cache, token


def cache_bytes(cache) -> int | None:
    """Bytes of the tensors a cache holds: the hybrid's per-layer K/V and Lightning states, or the K/V of a
    transformers cache's layers; None for a cache of another shape."""
    from ..models import SalaHybridCache

    if isinstance(cache, SalaHybridCache):
        tensors = [*cache.keys, *cache.values, *cache.states]
    elif hasattr(cache, "layers"):
        tensors = [getattr(layer, name, None) for layer in cache.layers for name in ("keys", "values")]
    else:
        return None
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def synthetic_ids(vocab: int, batch: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


def measure(model, length: int, cfg: BenchConfig, device: torch.device) -> dict:
    """Warm-up runs, then ``cfg.repeats`` timed prefill + decode runs; medians of the timed ones."""
    from ..models.decode_graphs import GraphDecoder

    arg = cache_arg(model)
    ids = synthetic_ids(model.config.vocab_size, cfg.batch_size, length, cfg.seed, device)
    clock, peak = Clock(device), PeakMemory(device)
    graphs, note = cfg.decode_graphs and graphs_apply(model, device), ""
    why = graphs and GraphDecoder.unsupported(model)
    if why:
        graphs, note = False, f"decoded eagerly: {why}"
    for _ in range(cfg.warmup):
        cache, token = prefill(model, ids, cfg.prefill_chunk, arg)
        decode(model, cache, token, min(2, cfg.decode_tokens), arg)
        del cache, token
    runs = []
    while len(runs) < cfg.repeats:
        peak.reset()
        clock.start()
        cache, token = prefill(model, ids, cfg.prefill_chunk, arg)
        t_prefill = clock.stop()
        held = cache_bytes(cache)
        if graphs:
            try:
                t_decode = _decode_graphed(model, cache, token, cfg.decode_tokens, clock)
            except RuntimeError as e:  # (out of memory goes up as a row of its own)
                if is_oom(e):
                    raise
                # a step the graphs could not take: this model decodes as generate does, said in the row
                graphs, note = False, f"CUDA graphs failed ({str(e).strip().splitlines()[0][:120]}); decoded eagerly"
                log.warning("bench: %s", note)
                del cache, token
                continue
        else:
            clock.start()
            cache, token = decode(model, cache, token, cfg.decode_tokens, arg)
            t_decode = clock.stop()
        runs.append((t_prefill, t_decode, peak.read(), held))
        del cache, token
    t_prefill = statistics.median(r[0] for r in runs)
    t_decode = statistics.median(r[1] for r in runs)
    tokens = cfg.batch_size * length
    return {"status": "ok", "prefill_s": t_prefill, "prefill_tokens_per_s": tokens / t_prefill,
            "decode_tokens_per_s": cfg.batch_size * cfg.decode_tokens / t_decode,
            "decode_tokens": cfg.decode_tokens, "peak_memory_bytes": max(r[2] for r in runs), "cache_bytes": runs[0][3],
            "prefill_s_runs": [r[0] for r in runs], "decode_graphs": graphs, "decode_note": note}


def graphs_apply(model, device: torch.device) -> bool:
    """Whether ``decode_graphs`` decodes this model with CUDA graphs: salatrain's models on CUDA."""
    from ..models import SalaHybridForCausalLM

    return device.type == "cuda" and isinstance(model, SalaHybridForCausalLM)


def _decode_graphed(model, cache, token, steps: int, clock) -> float:
    """Seconds for ``steps`` tokens through GraphDecoder, after its warm-up and capturing steps (untimed; the cache
    grows by those few tokens)."""
    from ..models.decode_graphs import GraphDecoder

    decoder = GraphDecoder(model, cache, token)
    for _ in range(decoder.setup_steps):
        decoder.step()
    clock.start()
    for _ in range(steps):
        decoder.step()
    return clock.stop()
