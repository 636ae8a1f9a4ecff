"""Sequence parallelism (DeepSpeed Ulysses) for the hybrid's three mixers, applied from outside the model.

``trainer.sequence_parallel=N`` splits every packed row over N consecutive ranks (an SP group; data-parallel
ranks × N = world size). The model stays single-device code; :meth:`SequenceParallel.parallelize` wraps each
mixer's ``attend`` (its parameter-free core attention over heads) in DeepSpeed's ``DistributedAttention``:

    q/k/v [B, T/N, H, D] (this rank's tokens, every head)
        -> all-to-all -> [B, T, H/N, D] (every token, this rank's heads) -> the mixer's own attend
        -> all-to-all -> [B, T/N, H, D]

Projections, norms, RoPE, gates, MLPs and the loss stay per token on the shard. Per mixer:

    full_attention    as DeepSpeed does it: whole GQA groups per rank; K/V heads fewer than N are replicated
    linear_attention  heads sharded; each rank's decay rates are its global heads' slopes
    sparse_attention  N divides the K/V heads: whole GQA groups per rank, so the mixer's own selection (Triton
                      or reference) sums each group's scores over all its heads and picks what one GPU picks.
                      K/V heads fewer than N: each K/V head is replicated to the N/HKV ranks that share its
                      group's query heads; those ranks gather the group's queries (no gradient) so each
                      scores and selects blocks from the whole group, as one GPU would, then attends over
                      the selected blocks with its own heads (salatrain_kernels' three InfLLM-V2 stages)

Documents keep their boundaries: each model forward gathers the SP group's position_ids (global, restarting
at every document) and rebuilds the global token layout (``cu_seqlens``), which the mixers see after the
all-to-all. Rows of several documents bring that layout from the host: :meth:`SequenceParallel.shard` adds the
whole rows' ``cu_seqlens`` / ``max_seqlen`` (built from their position_ids, where they cost nothing) to every
shard, and the model's pre-hook takes them out of the model's arguments (they describe the whole rows, not the
shard), so no sparse layer reads the document bounds back from the device. RoPE stays per token (each shard's own
position ids); a longrope rotary picks its factor set from the whole row, as on one GPU. The data loop gives the
N ranks of one data-parallel group the same rows and each rank its sequence shard
(:meth:`SequenceParallel.shard`), with next-token targets shifted before the cut.

DeepSpeed's data-parallel group stays the whole world (no ``mpu``): ZeRO shards over all ranks and averages
gradients over all of them. A row's gradient is the sum of its shards' (each all-to-all's backward hands a
shard its part), and each rank's loss is its targets' sum over the global target count (the loop's scaling,
unchanged), so an update is the token-weighted mean of the global batch as without sequence parallelism, and a
checkpoint is that of a data-parallel run on as many ranks.

Legend: B rows, T tokens of a row, N = sequence_parallel, H query heads, HKV key/value heads, D head dim.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..data import IGNORE, packed_layout
from ..errors import UserError
from ..models.modeling_sala_hybrid import (FullAttention, LightningAttention, SalaHybridModel, SeqInfo,
                                           SparseAttention, _sequence_layout)
from . import engine

MIXER_CLASSES = (FullAttention, LightningAttention, SparseAttention)
SCORE_BUDGET_BYTES = 512 * 2**20  # fp32 block scores of the query rows scored at once (split GQA groups)


@dataclass
class Layout:
    """The global token layout of one forward's rows: ``seq`` as the model builds it from the whole rows'
    position_ids (``flat``: the B rows were flattened into one row of packed documents)."""

    seq: SeqInfo
    positions: torch.Tensor  # [B, T]
    flat: bool

    @property
    def rows(self) -> int:
        return self.positions.shape[0]


class SequenceParallel:
    """This rank's place in the data-parallel × sequence-parallel grid, and the wrappers that split sequences.

    Ranks r·N … r·N + N − 1 form SP group r (data-parallel rank r); ``rank`` is the position inside it.
    With size 1 every method is the identity."""

    def __init__(self, size: int, rank: int, world_size: int):
        if size < 1 or world_size % size:
            raise UserError(f"trainer.sequence_parallel={size} must divide the number of ranks ({world_size})")
        self.size, self.rank = size, rank % size
        self.dp_size, self.dp_rank = world_size // size, rank // size
        self.group = engine.sequence_parallel_group(size) if size > 1 else None
        self._current: Layout | None = None
        self._bound: dict[int, tuple[weakref.ref, Layout]] = {}
        self._gather_groups: dict[int, object] = {}

    # -------------------------------------------------------------------------------------------- data

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's sequence shard of whole rows: input_ids and position_ids cut along T; ``labels``
        [B, T] become ``shift_labels`` (the target of each position: the next token's label, IGNORE at the end
        of the row), so a shard's last token still predicts the first token of the next shard."""
        if self.size == 1:
            return batch
        t = batch["input_ids"].shape[1]
        cut = slice(self.rank * t // self.size, (self.rank + 1) * t // self.size)
        out = {k: batch[k][:, cut] for k in ("input_ids", "position_ids")}
        # the whole rows' documents (when some row holds several): for the model's pre-hook, not the shard
        out.update(packed_layout({"position_ids": batch["position_ids"]}))
        labels = batch.get("labels")
        if labels is not None:
            shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1)
            out["shift_labels"] = shifted[:, cut]
        return out

    # -------------------------------------------------------------------------------------------- model

    def parallelize(self, module: nn.Module) -> None:
        """Split every mixer under ``module`` over the SP group: its models gather their rows' position_ids
        once per forward, its mixers' ``attend`` runs between two all-to-alls. Raises UserError for head counts
        the group cannot split."""
        if self.size == 1:
            return
        check_splittable(module, self.size)
        for m in module.modules():
            if isinstance(m, SalaHybridModel):
                m.register_forward_pre_hook(self._begin_forward, with_kwargs=True)
                m.rotary_emb.register_forward_hook(self._global_rope)
            elif isinstance(m, MIXER_CLASSES):
                m.attend = self._wrap(m)

    def _begin_forward(self, module, args, kwargs):
        """Model pre-hook: the SP group's position_ids [B, T/N] each → the rows' global layout; the whole rows'
        ``cu_seqlens`` / ``max_seqlen`` from :meth:`shard` (host), when given, are taken out of the model's
        arguments and lay out the documents without a read from the device."""
        pos = kwargs.get("position_ids")
        assert pos is not None and not args, "sequence parallelism needs keyword input_ids and position_ids"
        kwargs = dict(kwargs)
        cu, longest = kwargs.pop("cu_seqlens", None), kwargs.pop("max_seqlen", None)
        positions = torch.cat(engine.all_gather(pos, self.group), dim=1)
        flat_h = positions.new_empty(*positions.shape, 0, dtype=torch.float32)
        _, seq, _, flat = _sequence_layout(flat_h, None, positions, cu, None, longest if cu is not None else None)
        self._current = Layout(seq, positions, flat)
        return args, kwargs

    def _global_rope(self, module, args, output):
        """Rotary hook: a longrope rotary picks short or long factors from the largest position of its input;
        recompute it on the whole rows (as one GPU does) and keep this shard's part."""
        if module.rope_type != "longrope":
            return output
        lay = self._current
        cos, sin = type(module).forward(module, args[0], lay.positions)
        t = lay.positions.shape[1] // self.size
        part = slice(self.rank * t, (self.rank + 1) * t)
        return tuple(x[:, part].reshape(o.shape) for x, o in zip((cos, sin), output))

    def _layout_of(self, seq: SeqInfo) -> Layout:
        """The global layout of the forward that built the local ``seq`` (bound on first sight, so recomputed
        layers and a teacher's captured inputs find theirs)."""
        entry = self._bound.get(id(seq))
        if entry is None or entry[0]() is not seq:
            self._bound = {k: v for k, v in self._bound.items() if v[0]() is not None}
            assert self._current is not None, "a mixer ran outside a parallelized model's forward"
            entry = (weakref.ref(seq), self._current)
            self._bound[id(seq)] = entry
        return entry[1]

    # -------------------------------------------------------------------------------------------- mixers

    def _wrap(self, m):
        """The SP ``attend`` of mixer ``m``: shard tokens -> all-to-all -> m's own attend -> all-to-all back."""
        core, n = m.attend, self.size
        replicas = max(1, n // m.num_kv_heads)  # ranks per K/V head (> 1: K/V heads replicated)
        if isinstance(m, SparseAttention) and replicas > 1:
            core = self._split_group_sparse(m, replicas)
        elif isinstance(m, LightningAttention):
            lightning = core
            core = lambda q, k, v, seq, decay: lightning(q, k, v, seq, decay)[0]  # noqa: E731

        def local(q, k, v, lay: Layout, *extra):  # whole rows of this rank's heads
            if lay.flat:
                q, k, v = (x.reshape(1, -1, *x.shape[2:]) for x in (q, k, v))
            o = core(q, k, v, lay.seq, *extra)
            return o.reshape(lay.rows, -1, *o.shape[2:])

        ulysses = engine.ulysses_attention(local, self.group)

        def attend(q, k, v, seq, *extra):
            lay = self._layout_of(seq)
            shape = q.shape
            q, k, v = (x.reshape(lay.rows, -1, *x.shape[2:]) for x in (q, k, v))
            if replicas > 1:
                k, v = k.repeat_interleave(replicas, dim=2), v.repeat_interleave(replicas, dim=2)
            o = ulysses(q, k, v, 0, None, lay, *extra)
            return o.reshape(*shape[:2], *o.shape[2:])

        if not isinstance(m, LightningAttention):
            return attend

        def attend_lightning(q, k, v, seq, decay, initial_state=None, output_final_state=False):
            if initial_state is not None or output_final_state:
                raise ValueError("sequence parallelism splits training forwards; it keeps no recurrent state")
            return attend(q, k, v, seq, decay.view(n, -1)[self.rank]), None

        return attend_lightning

    def _split_group_sparse(self, m: SparseAttention, replicas: int):
        """Core of a sparse layer whose GQA groups span ``replicas`` ranks (one K/V head each after
        replication): the group's queries are gathered for block selection, attention uses this rank's."""
        group = self._gather_group(replicas)
        own = m.attend

        def core(q, k, v, seq: SeqInfo):
            params = m.sparse_params  # read per call: a stage may turn selection off (dense_len = ∞)
            if seq.max_doc_len <= params["dense_len"]:  # every query is dense: no selection
                return own(q, k, v, seq)
            backend = m.kernel_backend if m._triton_fits(q) else "torch"
            with torch.no_grad():
                q_group = torch.cat(engine.all_gather(q.detach(), group), dim=2)
                blocks = select_blocks(q_group, k.detach(), seq, params, backend)
            from salatrain_kernels.infllm_v2 import infllmv2_block_attn

            return infllmv2_block_attn(q, k, v, blocks, block_size=params["block_size"], cu_seqlens=seq.cu_for_host,
                                       dense_len=params["dense_len"], backend=backend)

        return core

    def _gather_group(self, replicas: int):
        """The process group of this rank and the other ranks of its SP group that hold the same K/V head.
        Every rank creates every such group, in one order, the first time a split is needed."""
        if replicas not in self._gather_groups:
            world, mine = self.dp_size * self.size, None
            for first in range(0, world, replicas):
                g = engine.new_group(list(range(first, first + replicas)))
                if first == self.dp_rank * self.size + self.rank // replicas * replicas:
                    mine = g
            self._gather_groups[replicas] = mine
        return self._gather_groups[replicas]


def check_splittable(module: nn.Module, size: int) -> None:
    """UserError unless every mixer under ``module`` can be split over ``size`` ranks: query heads a multiple of
    ``size``; K/V heads a multiple or a divisor of it (then replicated); no NoPE logit scaling (its positions
    would be the shard's); no dynamic RoPE (its frequencies depend on earlier batches)."""
    for m in module.modules():
        if isinstance(m, SalaHybridModel) and "dynamic" in m.rotary_emb.rope_type:
            raise UserError(f"rope_type {m.rotary_emb.rope_type!r} (frequencies that depend on earlier batches) is "
                            f"not supported with trainer.sequence_parallel={size}")
        if not isinstance(m, MIXER_CLASSES):
            continue
        where = f"layer {m.layer_idx} ({type(m).__name__})"
        if m.num_heads % size:
            raise UserError(f"trainer.sequence_parallel={size} must divide the query heads of every layer; {where} "
                            f"has {m.num_heads}")
        if m.num_kv_heads % size and size % m.num_kv_heads:
            raise UserError(f"trainer.sequence_parallel={size} and the {m.num_kv_heads} key/value heads of {where} "
                            "must divide one another (fewer key/value heads than ranks are replicated)")
        if isinstance(m, SparseAttention) and m.nope_logit_scale:
            raise UserError(f"{where}: sparse_config.nope_logit_scale is not supported with "
                            f"trainer.sequence_parallel={size} (an inference-time option: turn it off for training)")


def select_blocks(q: torch.Tensor, k: torch.Tensor, seq: SeqInfo, params: dict, backend: str,
                  budget_bytes: int = SCORE_BUDGET_BYTES) -> torch.Tensor:
    """InfLLM-V2's visible blocks [B, HKV, T, K] int32 (−1 padded; rows below dense_len left empty) of the
    queries q [B, T, G·HKV, D] over keys k [B, T, HKV, D] laid out as ``seq``. Scores are computed per
    document, for row ranges that end a prefix of it (the stage functions take queries as the last rows of
    their keys), so at most ``budget_bytes`` of fp32 scores exist at once."""
    from salatrain_kernels.infllm_v2 import infllmv2_block_scores, infllmv2_select

    p, b, t = params, q.shape[0], q.shape[1]
    scoring = dict(block_size=p["block_size"], kernel_size=p["kernel_size"], kernel_stride=p["kernel_stride"],
                   normalizer=p["normalizer"], backend=backend)
    choice = dict(block_size=p["block_size"], init_blocks=p["init_blocks"], topk=p["topk"],
                  window_size=p["window_size"], backend=backend)
    num_selected = p["topk"] + p["window_size"] // p["block_size"]
    out = torch.full((b, k.shape[2], t, num_selected), -1, dtype=torch.int32, device=q.device)
    bounds = seq.cu_for_host.tolist() if seq.cu_seqlens is not None else [0, t]
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        per_row = 4 * b * k.shape[2] * math.ceil(length / p["block_size"])
        step = max(1, budget_bytes // per_row)
        for lo in range(p["dense_len"], length, step):
            hi = min(length, lo + step)
            scores = infllmv2_block_scores(q[:, start + lo : start + hi], k[:, start : start + hi], **scoring)
            out[:, :, start + lo : start + hi] = infllmv2_select(scores, seqlen_k=hi, **choice)
    return out
