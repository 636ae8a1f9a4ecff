"""trainer.sequence_parallel (DeepSpeed Ulysses) on CPU: sequence shards, block selection, validation, and
real multi-process runs (torchrun, gloo) against one device.

The multi-process checks launch torchrun: SP=2 vs one device on a tiny model with all three mixers (losses and
every gradient), `salatrain train recipe=tiny trainer.sequence_parallel=2` vs one process, and (slow) 2 × 2
data × sequence parallel with an exact resume.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from salatrain.cli import main
from salatrain.data import IGNORE
from salatrain.errors import UserError
from salatrain.models import SalaHybridConfig, SalaHybridForCausalLM
from salatrain.models.modeling_sala_hybrid import SeqInfo
from salatrain.train import compose_train, run_stage
from salatrain.train.sequence_parallel import SequenceParallel, check_splittable, select_blocks
from salatrain.train.stages import count_targets
from tests.helpers.common import data_cache  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def torchrun(nproc: int, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), *args]
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ one process


def _sp(size: int, rank: int) -> SequenceParallel:
    sp = SequenceParallel.__new__(SequenceParallel)  # the data side only: no process group
    sp.size, sp.rank = size, rank
    return sp


def test_shards_cover_the_rows_and_keep_every_target():
    ids = torch.arange(2 * 12).view(2, 12)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], list(range(12))])
    labels = ids.masked_fill(pos == 0, IGNORE)
    batch = {"input_ids": ids, "position_ids": pos, "labels": labels}
    shards = [_sp(3, r).shard(batch) for r in range(3)]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards], 1), ids)
    assert torch.equal(torch.cat([s["position_ids"] for s in shards], 1), pos)
    shifted = torch.cat([s["shift_labels"] for s in shards], 1)
    assert torch.equal(shifted[:, :-1], labels[:, 1:]) and bool((shifted[:, -1] == IGNORE).all())
    assert sum(count_targets(s) for s in shards) == count_targets(batch)
    # every shard carries the whole rows' documents, built on the host, for the model's pre-hook
    for s in shards:
        assert s["cu_seqlens"].tolist() == [0, 5, 12, 24] and s["cu_seqlens"].dtype == torch.int32
        assert s["max_seqlen"] == 12
    one_doc = {"input_ids": ids, "position_ids": torch.arange(12).repeat(2, 1)}
    assert "cu_seqlens" not in _sp(3, 0).shard(one_doc), "rows of one document stay rows"
    assert _sp(1, 0).shard(batch) is batch


def test_sequence_parallel_must_divide_ranks_seq_len_and_heads(capsys):
    with pytest.raises(UserError, match=r"must divide the number of ranks \(1\)"):
        SequenceParallel(2, 0, 1)
    assert main(["train", "recipe=tiny", "trainer.sequence_parallel=3", "output_dir=x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trainer.sequence_parallel=3 must divide trainer.seq_len=128" in err and "\n" not in err

    def model(heads, kv, **sparse):
        return SalaHybridForCausalLM(SalaHybridConfig(
            vocab_size=32, hidden_size=48, intermediate_size=32, num_hidden_layers=2, num_attention_heads=heads,
            num_key_value_heads=kv, head_dim=8, mixer_types=["sparse_attention", "linear_attention"],
            sparse_config=sparse))

    check_splittable(model(6, 3), 3)
    check_splittable(model(6, 1), 3)  # one K/V head, replicated to the 3 ranks
    with pytest.raises(UserError, match=r"must divide the query heads of every layer; layer 0 \(SparseAttention\)"):
        check_splittable(model(6, 3), 4)
    with pytest.raises(UserError, match="the 3 key/value heads of layer 0"):
        check_splittable(model(6, 3), 2)
    with pytest.raises(UserError, match="nope_logit_scale"):
        check_splittable(model(6, 3, nope_logit_scale=True), 3)


def test_row_chunked_selection_equals_whole_sequence_selection():
    """select_blocks scores documents in row ranges (prefixes of each document) under a byte budget; the blocks
    must be those of the kernels' stages run on whole documents."""
    from salatrain_kernels.infllm_v2 import infllmv2_block_scores, infllmv2_select

    p = dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, topk=2, window_size=16, dense_len=32,
             normalizer="exact")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 200, 4, 16, generator=g), torch.randn(1, 200, 2, 16, generator=g)
    cu = torch.tensor([0, 120, 150, 200], dtype=torch.int32)
    seq = SeqInfo(torch.zeros(1, 200, dtype=torch.long), 0, cu)
    got = select_blocks(q, k, seq, p, "torch", budget_bytes=2 * 4 * 2 * 8)  # two rows at a time
    keys = ("block_size", "kernel_size", "kernel_stride", "normalizer")
    scores = infllmv2_block_scores(q, k, cu_seqlens=cu, backend="torch", **{x: p[x] for x in keys})
    want = infllmv2_select(scores, cu_seqlens=cu, backend="torch",
                           **{x: p[x] for x in ("block_size", "init_blocks", "topk", "window_size")})
    for s, e in ((0, 120), (120, 150), (150, 200)):
        rows = slice(s + p["dense_len"], e)
        assert torch.equal(got[:, :, rows], want[:, :, rows])
        assert bool((got[:, :, s : s + p["dense_len"]] == -1).all())
    assert int((got[0, :, 100] >= 0).sum()) == 2 * 3, "selection is sparse there (3 of 8 blocks per group)"


# ------------------------------------------------------------------------------------------------ torchrun


def test_two_ranks_split_sequences_with_the_losses_and_gradients_of_one(tmp_path):
    """All three mixers, whole GQA groups per rank and groups split over both ranks (K/V replicated, queries
    gathered for selection), packed documents across the shard cut, longrope, activation checkpointing."""
    out = tmp_path / "sp.json"
    torchrun(2, "-m", "tests.helpers.sp_check", str(out))
    results = json.loads(out.read_text())
    assert set(results) == {"gqa", "split_groups"}
    for variant, batches in results.items():
        for batch, r in batches.items():
            assert r["loss"] == pytest.approx(r["loss_ref"], rel=1e-6), (variant, batch)
            assert r["grad_err"] <= 1e-5 * r["grad_scale"], (variant, batch, r)
        # packed rows' documents came from the host (the shard's cu_seqlens), not read back per sparse layer
        assert batches["two_rows_with_boundaries"]["host_bounds"] and not batches["one_document"]["host_bounds"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("one") / "run"
    run_stage(compose_train("tiny", [f"output_dir={out}", f"trainer.max_steps={STEPS}",
                                     f"data.cache_dir={data_cache}"]))
    return out


def test_train_tiny_with_two_sequence_parallel_ranks_logs_the_losses_of_one_process(tmp_path, data_cache,
                                                                                      one_process):
    out = tmp_path / "run"
    torchrun(2, "-m", "salatrain.cli", "train", "recipe=tiny", "trainer.sequence_parallel=2", f"output_dir={out}",
             f"trainer.max_steps={STEPS}", f"data.cache_dir={data_cache}")
    meta = json.loads((out / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").read_text())
    assert (meta["world_size"], meta["sequence_parallel"]) == (2, 2)
    assert losses(out) == pytest.approx(losses(one_process), rel=1e-5)


@pytest.mark.slow
def test_data_times_sequence_parallel_resumes_exactly(tmp_path, data_cache, one_process):
    """4 ranks = 2 data-parallel groups × 2 sequence-parallel ranks, ZeRO-2: a run resumed from its step-3
    checkpoint logs what the uninterrupted run logged, and both what one process logs. The same checkpoint
    resumed with 4 sequence-parallel ranks (each GQA group of the tiny model split over 2 ranks) continues the
    same losses: ZeRO shards over all ranks and the data position counts global rows, whatever the split."""
    run, resumed, resplit = tmp_path / "run", tmp_path / "resumed", tmp_path / "resplit"
    common = ["-m", "salatrain.cli", "train", "recipe=tiny", f"trainer.max_steps={STEPS}",
              f"data.cache_dir={data_cache}"]
    ckpt = f"resume={run / 'checkpoints' / 'step_00000003'}"
    torchrun(4, *common, "trainer.sequence_parallel=2", f"output_dir={run}", "trainer.save_every=3")
    torchrun(4, *common, "trainer.sequence_parallel=2", f"output_dir={resumed}", ckpt)
    torchrun(4, *common, "trainer.sequence_parallel=4", f"output_dir={resplit}", ckpt)
    assert losses(run) == pytest.approx(losses(one_process), rel=1e-5)
    assert losses(resumed) == losses(run)[3:]
    assert losses(resplit) == pytest.approx(losses(run)[3:], rel=1e-6)
