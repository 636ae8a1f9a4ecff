"""Sequence parallelism against one device, run by tests/test_sequence_parallel.py under
``torchrun --nproc_per_node 2 -m tests.helpers.sp_check <out.json>`` (CPU, gloo).

Every rank builds the same tiny hybrid (sparse, Lightning and full attention layers), computes the lm loss and
its gradients of whole rows on its own (the one-device reference), then the same rows split over the two
ranks (SequenceParallel with size 2: its shards, its Ulysses-wrapped mixers); shard losses and gradients are
summed over the ranks and compared with the reference. Variants: 2 K/V heads (whole GQA groups per rank) and
1 K/V head (each group split over both ranks, K/V replicated, queries gathered for block selection) with a
longrope rotary and activation checkpointing. Rank 0 writes {variant: {batch: {"loss", "loss_ref",
"grad_err", "grad_scale", "host_bounds"}}} to the output file ("host_bounds": the global layout's document bounds
came from the shard's host cu_seqlens).
"""

from __future__ import annotations

import copy
import json
import sys

import torch

from salatrain.data import IGNORE
from salatrain.models import SalaHybridConfig, SalaHybridForCausalLM
from salatrain.train import engine
from salatrain.train.sequence_parallel import SequenceParallel
from salatrain.train.stages import LMStage, count_targets, enable_activation_checkpointing

SPARSE = dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, topk=2, window_size=16, dense_len=32)
LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=64,
                short_factor=[1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
                long_factor=[1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0])
VARIANTS = {
    "gqa": dict(kv_heads=2, mixers=["sparse_attention", "linear_attention", "full_attention", "sparse_attention"],
                rope=None, checkpointing=False),
    "split_groups": dict(kv_heads=1, mixers=["sparse_attention", "full_attention", "linear_attention",
                                             "sparse_attention"], rope=LONGROPE, checkpointing=True),
}


def model_of(kv_heads: int, mixers: list[str], rope: dict | None) -> SalaHybridForCausalLM:
    torch.manual_seed(0)
    cfg = SalaHybridConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=len(mixers),
                           num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                           mixer_types=mixers, sparse_config=SPARSE, rope_parameters=rope, bos_token_id=None,
                           eos_token_id=None)
    model = SalaHybridForCausalLM(cfg)
    with torch.no_grad():  # gates away from zero, so that every path carries signal
        for name, p in model.named_parameters():
            if name.endswith(("z_proj.weight", "g_proj.weight")):
                p.normal_(0, 0.2)
    return model.train()


def packed(doc_lengths: list[list[int]], seed: int) -> dict[str, torch.Tensor]:
    """Rows of documents: position ids restart at each document; the first token of a document and a few
    random tokens are not targets."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in doc_lengths])
    ids = torch.randint(0, 64, pos.shape, generator=g)
    labels = ids.masked_fill(pos == 0, IGNORE).masked_fill(torch.rand(pos.shape, generator=g) < 0.1, IGNORE)
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


BATCHES = {
    "two_rows_with_boundaries": packed([[100, 28], [64, 40, 24]], seed=1),  # a boundary at the shard cut (64)
    "one_document": packed([[128]], seed=2),  # no restart: the model keeps rows unflattened
}


def run(stage: LMStage, batch: dict, count: int) -> torch.Tensor:
    stage.zero_grad(set_to_none=True)
    loss, _ = stage(**batch)
    (loss / count).backward()
    return loss.detach()


def check(variant: dict, sp: SequenceParallel) -> dict:
    ref = model_of(variant["kv_heads"], variant["mixers"], variant["rope"])
    split = copy.deepcopy(ref)
    if variant["checkpointing"]:
        enable_activation_checkpointing(split)
    ref_stage, sp_stage = LMStage(ref, chunk=48), LMStage(split, chunk=48)
    sp.parallelize(sp_stage)
    out = {}
    for name, batch in BATCHES.items():
        count = count_targets(batch)
        loss_ref = run(ref_stage, batch, count)
        loss = run(sp_stage, sp.shard(batch), count)
        host_bounds = sp._current.seq.cu_host is not None  # the layout of the last forward
        engine.all_reduce(loss)
        err, scale = 0.0, 0.0
        for (n, p_ref), (_, p) in zip(ref.named_parameters(), split.named_parameters()):
            grad = engine.all_reduce(p.grad.clone())
            err = max(err, float((grad - p_ref.grad).abs().max()))
            scale = max(scale, float(p_ref.grad.abs().max()))
        out[name] = {"loss": float(loss) / count, "loss_ref": float(loss_ref) / count, "grad_err": err,
                     "grad_scale": scale, "host_bounds": host_bounds}
    return out


def main() -> None:
    dist = engine.init_distributed()
    sp = SequenceParallel(2, dist.rank, dist.world_size)
    results = {name: check(v, sp) for name, v in VARIANTS.items()}
    if dist.is_main:
        with open(sys.argv[1], "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
