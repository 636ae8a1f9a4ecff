"""SalaHybridCache keeps K/V in buffers with headroom: beam search's reordering and autograd fall back to new
tensors, a deep copy branches, and every path gives the uncached model's outputs (writing in place and replacing a
full buffer: test_checkpoint_roundtrip.py's incremental-logits and generate tests)."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.test_checkpoint_roundtrip import tiny_hybrid

SOFTMAX_LAYERS = (0, 2)  # tiny_hybrid's sparse and full-attention layers


def test_beam_search_reorders_the_cache():
    """reorder_cache replaces the views (index_select), so the next append takes a new buffer."""
    model = tiny_hybrid(seed=5)
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, num_beams=3)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_a_deep_copied_cache_branches_independently():
    model = tiny_hybrid(seed=6)
    ids = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(ids[:, :20], use_cache=True)
        cache = out["cache" if "cache" in out else "past_key_values"]
        branch = copy.deepcopy(cache)
        a = model(ids[:, 20:26], cache=cache, use_cache=True).logits
        b = model(ids[:, 20:23], cache=branch, use_cache=True).logits
        full = model(ids[:, :26], use_cache=False).logits
    torch.testing.assert_close(a, full[:, 20:26], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, full[:, 20:23], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [1, 3])
def test_with_gradients_the_cache_concatenates_and_backward_runs(steps):
    """Under autograd no buffer is written in place (it would modify tensors saved for backward)."""
    model = tiny_hybrid(seed=7)
    ids = torch.randint(0, 96, (1, 16 + steps), generator=torch.Generator().manual_seed(4))
    out = model(ids[:, :16], use_cache=True)
    cache, logits = out["cache" if "cache" in out else "past_key_values"], [out.logits]
    for t in range(16, 16 + steps):
        logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    assert all(cache._buffers[i] is None for i in SOFTMAX_LAYERS)
    torch.cat(logits, 1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
