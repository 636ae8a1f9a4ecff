"""The document layout and target positions a trainer builds on the host (so a forward reads nothing back from
the device) give the same losses and gradients as the model and loss working them out themselves."""

import numpy as np
import pytest
import torch
from datasets import Dataset

from salatrain.data import IGNORE, PackedSequences, packed_layout
from salatrain.models import SalaHybridForCausalLM
from salatrain.train.stages import AlignStage, DistillStage, LMStage, load_model
from salatrain.train.tiny import resolve
from tests.helpers.common import one_thread  # noqa: F401 (fixtures)


def _batch(lengths, seq_len=48, rows=3, seed=1):
    ids = [list(range(7 * k, 7 * k + n)) for k, n in enumerate(lengths)]
    masks = [[int(i % 5 != 3) for i in range(n)] for n in lengths]  # some tokens are not targets
    docs = Dataset.from_dict({"input_ids": [[t % 500 for t in d] for d in ids], "loss_mask": masks,
                              "length": list(lengths)})
    return PackedSequences(docs, seq_len=seq_len, seed=seed).batch(list(range(rows)))


def test_layout_matches_the_rows():
    batch = _batch([30, 10, 70, 25, 9, 40])
    lay = packed_layout(batch)
    b, t = batch["input_ids"].shape
    cu = lay["cu_seqlens"].tolist()
    assert lay["cu_seqlens"].dtype == torch.int32 and cu[0] == 0 and cu[-1] == b * t
    assert set(range(0, b * t, t)) <= set(cu)  # every row starts a document
    flat = batch["position_ids"].reshape(-1)
    for s, e in zip(cu[:-1], cu[1:]):
        assert flat[s:e].tolist() == list(range(flat[s].item(), flat[s].item() + e - s))
    assert lay["max_seqlen"] == max(e - s for s, e in zip(cu[:-1], cu[1:]))
    shifted = torch.cat([batch["labels"][:, 1:], torch.full((b, 1), IGNORE)], 1).reshape(-1)
    want = torch.nonzero(shifted != IGNORE).flatten()
    assert torch.equal(lay["target_index"], want) and torch.equal(lay["target"], shifted[want])
    assert 0 < len(want) < b * (t - 1)


def test_rows_of_one_document_each_stay_rows():
    batch = _batch([200], seq_len=48, rows=3)
    assert not np.any(batch["position_ids"][:, 1:].numpy() == 0)
    assert set(packed_layout(batch)) == {"target_index", "target"}


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _run(stage, batch):
    stage.zero_grad(set_to_none=True)
    loss, stats = stage(**batch)
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, _grads(stage)


@pytest.mark.parametrize("kind", ["lm", "kl", "mse_align"])
def test_stages_give_the_same_loss_and_gradients_with_the_host_layout(kind, one_thread):
    torch.manual_seed(0)
    path = resolve("builtin:tiny-hybrid")
    student = SalaHybridForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    assert student.config.sparse_config["dense_len"] < 48  # the sparse layers select blocks in these rows
    teacher = load_model(resolve("builtin:tiny-dense")).eval()  # every layer full_attention
    if kind == "lm":
        stage = LMStage(student, chunk=64)
    elif kind == "kl":
        stage = DistillStage(student, chunk=64, temperature=1.0)
        stage.attach_teacher(teacher)
    else:
        from salatrain.hf_checkpoint import CheckpointDir

        stage = AlignStage(teacher, CheckpointDir(resolve("builtin:tiny-dense")))
        stage.attach_teacher(teacher)
    batch = _batch([30, 10, 70, 25, 9, 40, 33, 61])
    assert "cu_seqlens" in packed_layout(batch)
    plain = _run(stage, batch)
    host = _run(stage, {**batch, **packed_layout(batch)})
    torch.testing.assert_close(host[0], plain[0], rtol=1e-5, atol=1e-6)
    assert host[1].keys() == plain[1].keys()
    for k in plain[1]:
        torch.testing.assert_close(host[1][k], plain[1][k], rtol=1e-5, atol=1e-6)
    assert plain[2].keys() == host[2].keys() and len(plain[2]) > 0
    for name, g in plain[2].items():
        torch.testing.assert_close(host[2][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_document_bounds_stay_on_the_host_for_the_sparse_layout():
    """The trainer moves a micro-batch to the device but its cu_seqlens (the sparse kernels lay out their documents
    from host numbers, which a device tensor would have to be read back for, once per sparse layer); the model keeps
    the host bounds beside its device copy."""
    from salatrain.models.modeling_sala_hybrid import _sequence_layout
    from salatrain.train.loop import _to_device

    batch = {**_batch([30, 10, 70, 25, 9, 40]), **packed_layout(_batch([30, 10, 70, 25, 9, 40]))}
    moved = _to_device(batch, torch.device("meta"))
    assert moved["cu_seqlens"] is batch["cu_seqlens"] and moved["input_ids"].device.type == "meta"
    h = torch.zeros(*batch["input_ids"].shape, 8, device="meta")
    cu = batch["cu_seqlens"].long()  # any integer dtype from a caller: the host copy is int32
    _, seq, _, flattened = _sequence_layout(h, None, moved["position_ids"], cu, None, batch["max_seqlen"])
    assert flattened and seq.cu_seqlens.device.type == "meta" and seq.cu_seqlens.dtype == torch.int32
    assert seq.cu_host.device.type == "cpu" and seq.cu_host.dtype == torch.int32
    assert seq.cu_host.tolist() == batch["cu_seqlens"].tolist()
    # bounds already on the device: nothing on the host to keep
    _, seq, _, _ = _sequence_layout(h, None, moved["position_ids"], cu.to("meta"), None, batch["max_seqlen"])
    assert seq.cu_host is None
