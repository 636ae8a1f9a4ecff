"""bench/bench_infllmv2.block_overlap on CPU (the PyTorch reference's selection), as bench/selection_overlap.py uses
it on a real model's q/k: 1.0 means no two neighbouring queries share a gathered block, 1/TQ that a tile's
queries all chose the same blocks."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(block_size=16, kernel_size=16, kernel_stride=8, init_blocks=1, topk=4, window_size=32, dense_len=128)


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_infllmv2", ROOT / "bench" / "bench_infllmv2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("tq", [2, 4])
def test_identical_queries_share_and_random_ones_do_not(tq):
    bench = _bench()
    g = torch.Generator().manual_seed(0)
    T, hq, hkv, d = 512, 4, 1, 16
    k = torch.randn(1, T, hkv, d, generator=g)
    random_q = torch.randn(1, T, hq, d, generator=g)
    same_q = random_q[:, :1].expand(1, T, hq, d).contiguous()  # every position asks the same question
    shared = bench.block_overlap(same_q, k, tq, SETTINGS)
    alone = bench.block_overlap(random_q, k, tq, SETTINGS)
    assert 1 / tq <= shared < 1.15 / tq   # one block list per tile (up to the causal edge moving along it)
    assert alone > 1.5 / tq               # i.i.d. queries pick mostly different blocks
    assert alone <= 1.0


def test_no_sparse_rows_gives_none():
    bench = _bench()
    q, k = torch.randn(1, 64, 4, 16), torch.randn(1, 64, 1, 16)
    assert bench.block_overlap(q, k, 4, SETTINGS) is None


def test_smollm2_settings_are_the_quality_recipes():
    """bench/selection_overlap.py's default settings are the sparse settings of every SmolLM2 quality recipe."""
    from omegaconf import OmegaConf

    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("selection_overlap", ROOT / "bench" / "selection_overlap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def sparse_blocks(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "sparse" and isinstance(value, dict):
                    yield value
                else:
                    yield from sparse_blocks(value)
        elif isinstance(node, list):
            for value in node:
                yield from sparse_blocks(value)

    found = 0
    for recipe in sorted((ROOT / "recipes").glob("pipeline_*_smollm2.yaml")):
        tree = OmegaConf.to_container(OmegaConf.load(recipe))
        for block in sparse_blocks(tree):
            found += 1
            assert {k: block[k] for k in mod.SMOLLM2} == mod.SMOLLM2, recipe.name
    assert found >= 1
