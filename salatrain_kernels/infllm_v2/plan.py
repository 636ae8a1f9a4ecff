"""The launch plan of stage (c): row chunks, tile tables and launch settings of one attention call, and the
forward and backward that run the window (window.py) and gather (gather.py) kernels from it.

With a local window W > 0 a sparse row's softmax is split in two: the gather kernel writes its normalised
partial output and log-sum-exp (fp32, for one chunk of rows at a time: PART_BUDGET_BYTES), the local kernel
starts its online softmax from them and writes the final row. The backward needs no merge beyond dq: with the
final lse and delta = rowsum(dO·O), the two key sets contribute independently (dq partials merged the same
way as o). Gathered dk/dv run over the transposed block lists (`key_map`, built on the device without a host
synchronisation) in chunks of at most DKDV_CHUNK
queries per block.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..utils import LOG2E, dot_precision, interpreting, new_empty, next_pow2, row_sum, should_tune
from .attn_steps import kv_descriptors
from .gather import _gather_dkdv_kernel, gather_dq, gather_fwd
from .shared import SHARE_MAX_UNION, check_share, pack_share, shared_dq, shared_fwd, union_lists
from .layout import DenseRows, DocLayout
from .naive import first_local_block
from .window import _local_dkdv_kernel, _local_dq_kernel, local_fwd

__all__ = ["AttnPlan", "SparseAttnFn", "sort_block_lists", "window_split_exact"]

DQ_MODES = ("gather", "atomic")
KV_LOADS = ("pointer", "tma")
DKDV_ROWS = 64  # gathered dk/dv, pipelined: query rows (queries x G heads) per step on tensor cores
DKDV_CHUNK = 256  # queries per dk/dv program of one block (bounds the work of heavily selected blocks; programs of
# one block add by atomics); 0: one program per block takes all its queries and adds by a plain read-add-write
DKDV_PREFETCH = True  # gathered dk/dv: load each step's q/dO rows during the step before (registers; gather.py)
DKDV_KEYS = None  # keys per gathered dk/dv program (None: the whole block; a divisor of it splits each chunk)
INTERPRETER_TOKENS = 16  # queries per gather program under the interpreter (1 reproduces the GPU code path)
INTERPRETER_DKDV_ROWS = 256  # gathered dk/dv rows per step under the interpreter (tests set it small: many steps)
INTERPRETER_DKDV_CHUNK = 4096  # the interpreter takes a block's queries in one program (tests set it small)
PART_BUDGET_BYTES = 512 * 2**20  # fp32 partial outputs of one row chunk (window split)
# groups of fewer than 16 query heads per K/V head: with share_tokens=1 (and dq_mode="gather"), neighbouring queries
# fill the rest of the 16-row tile and share their gathered blocks (shared.pack_share). One H200, 32K, fwd+bwd
# (docs/perf.md, "Small groups: neighbouring queries fill the tile"): 1.18x at G = 4, 2.1x at G = 1, 0.97-1.01x at
# G = 7 on random q/k; 1.1-2.6x where selections overlap as a real model's
PACK_SMALL_GROUPS = True


@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, n, D: tl.constexpr, BD: tl.constexpr, BLOCK: tl.constexpr):
    """delta[i] = sum_d o[i, d] · do[i, d] over the flattened (row, head) pairs."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, BD)
    mask = (i < n)[:, None] & (d < D)[None, :]
    off = i.to(tl.int64)[:, None] * D + d[None, :]
    o = tl.load(o_ptr + off, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + i, row_sum(o * do, 1), mask=i < n)


def _qk_strides(q3: torch.Tensor, k3: torch.Tensor) -> dict:
    return dict(stride_qr=q3.stride(0), stride_qh=q3.stride(1), stride_kr=k3.stride(0), stride_kh=k3.stride(1))


class TileUnions(NamedTuple):
    """A row chunk's union block lists for the shared kernels (shared.union_lists) over its sparse rows in row
    order (``rows``: tile j takes rows[j·TQ:(j+1)·TQ], neighbours of one document), and the per-query kernels'
    list lengths with the sharing tiles' rows at 0 (None when every tile shares)."""

    rows: torch.Tensor
    union: torch.Tensor
    bits: torch.Tensor
    count: torch.Tensor
    use: torch.Tensor
    gb_krow0: torch.Tensor
    gb_kend: torch.Tensor
    unshared: torch.Tensor | None

    def kernel_args(self) -> dict:
        return dict(rows_ptr=self.rows, union_ptr=self.union, bits_ptr=self.bits, ucount_ptr=self.count,
                    use_ptr=self.use, gb_krow0_ptr=self.gb_krow0, gb_kend_ptr=self.gb_kend,
                    stride_uh=self.union.stride(0), stride_ut=self.union.stride(1), stride_ch=self.count.stride(0))


@dataclass
class RowChunk:
    """Rows [lo, hi): local tiles (first row, rows, doc) for the forward and for dq (their own tile height),
    and the sparse rows gathered, latest first."""

    lo: int
    hi: int
    tiles: tuple
    sparse_rows: torch.Tensor
    dq_tiles: tuple


class AttnPlan:
    """Row/tile tables and launch settings of one attention call (shared by forward and backward).

    local_window > 0 moves each sparse row's window blocks to the local tile kernels; it is exact only when
    the visible set always contains the whole window (the caller checks; see `window_split_exact`).
    dense_len_mode and local_blocks: the forms of the two rules (naive.py); which rows are dense, and where a
    sparse row's window starts.
    """

    def __init__(self, layout: DocLayout, heads: int, kv_heads: int, dim: int, dtype, block_size: int,
                 scale: float, dense_len: int, local_window: int = 0, part_budget_bytes: int | None = None,
                 dense_len_mode: str = "position", local_blocks: str = "token", share_tokens: int = 1,
                 dq_mode: str = "gather", kv_loads: str = "tma", share_max_union: float = SHARE_MAX_UNION):
        check_share(share_tokens, share_max_union)
        if dq_mode not in DQ_MODES:
            raise ValueError(f"dq_mode must be one of {', '.join(DQ_MODES)}, got {dq_mode!r}")
        if kv_loads not in KV_LOADS:
            raise ValueError(f"kv_loads must be one of {', '.join(KV_LOADS)}, got {kv_loads!r}")
        self.kv_loads = kv_loads
        self.group = heads // kv_heads
        group_pad = next_pow2(self.group)
        if PACK_SMALL_GROUPS and share_tokens == 1 and dq_mode == "gather" and group_pad < 16:
            # a small group fills group_pad of a 16-row tile: neighbouring queries fill the rest (pack_share)
            share_tokens = pack_share(self.group)
        if max(layout.qlen, default=0) < 2:
            share_tokens = 1  # one query row per document (decoding): a tile shares only within a document
        self.share = share_tokens  # > 1: neighbouring sparse rows share their gathered blocks (shared.py)
        # a shared tile's rows: share x the group padded to a power of two, at least 16 (tl.dot's tile)
        self.share_rows = max(group_pad, 16 // share_tokens)
        # ... a tile of them only when its union list is at most this fraction of its rows' entries; the other
        # tiles' rows go through the per-query gather kernels (1.0: every tile shares). A tile of at most 16 rows
        # always shares: a per-query tile has 16 rows too, so the union (never longer than the lists together)
        # cannot cost more steps
        self.share_max_union = 1.0 if share_tokens * self.share_rows <= 16 else share_max_union
        # the sparse rows' gathered dq: "gather" walks each query's block list (its own pass), "atomic" adds it in
        # the dk/dv pass over the transposed lists (shared blocks keep their own dq pass)
        self.dq_atomic = dq_mode == "atomic" and share_tokens == 1
        self._unions: dict[int, tuple] = {}
        self.layout, self.heads, self.kv_heads, self.dim = layout, heads, kv_heads, dim
        self.block_size, self.scale = block_size, scale
        self.dense = DenseRows.build(layout, dense_len, dense_len_mode)
        self.local_blocks = local_blocks
        self.prec = dot_precision(dtype)
        self.bd = max(16, next_pow2(dim))
        # tile sizes: 16-bit inputs use tensor-core tiles; fp32 ("ieee" FMA dots, tests only) small ones that
        # keep shared memory far below the limit; the interpreter takes big tiles (fewer steps)
        small = self.prec == "ieee" and not interpreting()
        self.tile_m = 64 if interpreting() or small or self.bd > 128 else 128
        self.local_bn = 32 if small else 64
        # dq takes its own (smaller) tiles; the interpreter uses a height unlike tile_m so CPU tests cover that
        self.dq_tile_m = 32 if small or interpreting() else 64
        self.fwd_config = (8, 2) if small else ((8, 3) if self.tile_m == 128 else (4, 2))
        self.gather_rows = max(16, next_pow2(self.group))
        self.blocks_per_step = max(1, 64 // block_size)  # 64-key tiles (the interpreter takes a whole list)
        self.tokens_per_prog = INTERPRETER_TOKENS if interpreting() else 1  # >1 only to cut interpreter overhead
        self.dkdv_chunk = INTERPRETER_DKDV_CHUNK if interpreting() else DKDV_CHUNK
        # gathered dk/dv: each step's q/dO rows loaded during the step before (DKDV_PREFETCH) where that was
        # measured faster: 16-bit groups of 16 heads of 128 (SALA's shape; H200, docs/perf.md); elsewhere Triton's
        # pipeliner (level at 3 heads of 64; other shapes not timed). Query rows (TP queries x G heads, padded) per
        # step: 32 prefetched (registers), 64 pipelined. Local dk/dv: programs per group.
        sala_shape = self.prec != "ieee" and self.group >= 16 and self.bd == 128
        self.dkdv_prefetch = DKDV_PREFETCH and (interpreting() or sala_shape)
        if interpreting():
            self.dkdv_rows = INTERPRETER_DKDV_ROWS
        else:
            self.dkdv_rows = 32 if self.prec == "ieee" or self.dkdv_prefetch else DKDV_ROWS
        self.dkdv_nsplit = min(self.group, 4)
        # gathered dk/dv (num_warps, num_stages); None: 4 warps (fp32 tests: 8), 1 stage prefetched, 2 pipelined (a
        # sweep knob). At D = 128, 4 warps run two programs per SM where 8 warps ran one: the kernel waits on its
        # q/dO gathers, and a second program hides them (fwd+bwd 1.20x / 1.18x at 32K / 128K, H200)
        self.dkdv_gather_launch = None
        self.dkdv_keys = DKDV_KEYS or block_size
        if DKDV_KEYS and (block_size % DKDV_KEYS or (DKDV_KEYS < 16 and not interpreting())):
            raise ValueError(f"DKDV_KEYS={self.dkdv_keys} must divide block_size {block_size} (and be >= 16 for the "
                             "GPU's matmul tiles)")
        # local dk/dv: key tile x query step (Triton's flash-attention backward uses 128 keys x 32 queries; the
        # fp32 test path keeps small tiles for shared memory, head dims > 128 keep 64 keys for registers)
        wide_keys = not small and self.bd <= 128
        self.dkdv_bn, self.dkdv_bm = (128, 32) if wide_keys else (self.local_bn, self.dq_tile_m)
        # local dk/dv (num_warps, num_stages), a sweep knob; None: 8 warps at D >= 128, else 4; 2 stages
        self.dkdv_local_launch = None
        self.window = local_window if self.dense.has_sparse(layout) else 0
        until = self.dense.until
        rows = layout.num_rows
        if self.window:
            budget = PART_BUDGET_BYTES if part_budget_bytes is None else part_budget_bytes
            per_chunk = max(self.tile_m, budget // (4 * heads * (dim + 1)))
            bounds = [(lo, min(lo + per_chunk, rows)) for lo in range(0, rows, per_chunk)]
            local_pos_hi = 2**62
        else:
            bounds, local_pos_hi = [(0, rows)], until
        self.chunks = [
            RowChunk(lo, hi, layout.tiles(self.tile_m, 0, local_pos_hi, lo, hi), layout.rows(until, 2**62, lo, hi),
                     layout.tiles(self.dq_tile_m, 0, local_pos_hi, lo, hi))
            for lo, hi in bounds
        ]
        qend = [p0 + n for p0, n in zip(layout.qpos0, layout.qlen)]
        self.key_hi = [n if self.window else min(e, u) for n, e, u in zip(layout.length, qend, until)]
        tables = dict(kstart=layout.kstart, len=layout.length, qstart=layout.qstart, qpos0=layout.qpos0, qend=qend)
        self.docs = {f"doc_{name}_ptr": layout.doc_tensor(x) for name, x in tables.items()}
        self.row_tables = dict(row_pos_ptr=layout.row_pos, row_kbase_ptr=layout.row_kbase)

    def list_lengths(self, idx3: torch.Tensor) -> torch.Tensor:
        """Entries of each list the gather kernels take [HKV, R] int32: the valid ones (listed first),
        before the local window when there is one."""
        valid = idx3 >= 0
        if self.window:
            first_local = first_local_block(self.layout.row_pos.long(), self.block_size, self.window, self.local_blocks)
            valid &= idx3 < first_local[None, :, None]
        return valid.sum(-1, dtype=torch.int32)

    def _blocks_per_step(self, k_slots: int) -> int:
        """Blocks per gather step. The interpreter takes a whole list per step (fewer steps), within Triton's
        2^20-element tile limit: its tile is [TOK·M rows, TOK·NBI·BS keys], so long lists (topk near or past
        the number of blocks) take several steps."""
        if not (interpreting() and self.tokens_per_prog > 1):
            return self.blocks_per_step
        tok = self.tokens_per_prog
        cap = max(1, (1 << 20) // (tok * tok * self.gather_rows * self.block_size))
        return max(1, min(next_pow2(k_slots), 1 << (cap.bit_length() - 1)))

    def _one_block(self, idx3) -> bool:
        """Whether a gather program takes one query's one block per step (the GPU code path)."""
        return self.tokens_per_prog == 1 and self._blocks_per_step(idx3.shape[-1]) == 1

    def _gather_meta(self, k_slots):
        return dict(G=self.group, M=self.gather_rows, TOK=self.tokens_per_prog, D=self.dim, BD=self.bd,
                    BS=self.block_size, NBI=self._blocks_per_step(k_slots), PREC=self.prec)

    def _kv_args(self, k3, v3, idx3) -> tuple[dict, dict]:
        """How the gather and the shared kernels load K/V (built once per forward or backward): tensor descriptors
        (kv_loads="tma", a layout the bulk copies accept, and for the gather kernels one query's one block per
        step) or pointers (the descriptor arguments are then the tensors, unused). FULL: every gathered block lies
        wholly before its query's local window (window split), so all its rows are visible and the descriptor path
        masks nothing."""
        descs = kv_descriptors(k3, v3, self.block_size, self.bd) if self.kv_loads == "tma" else None
        pointers = dict(k_desc=k3, v_desc=v3, DESC=False, FULL=bool(self.window))
        shared = pointers if descs is None else dict(pointers, k_desc=descs[0], v_desc=descs[1], DESC=True)
        return (shared if self._one_block(idx3) else pointers), shared

    def _shared_meta(self):
        return dict(G=self.group, M=self.share_rows, TQ=self.share, D=self.dim, BD=self.bd, BS=self.block_size,
                    PREC=self.prec)

    @cached_property
    def _global_blocks(self):
        """Once per call (forward and backward share the plan): (global block number of each row's document's
        first block [rows], first key row and end key row of each global block, number of global blocks)."""
        layout = self.layout
        base, gb_krow0, gb_kend = layout.global_blocks(self.block_size)
        row_doc_base = torch.repeat_interleave(
            layout.doc_tensor(base), layout.doc_tensor(layout.qlen).long(), output_size=layout.num_rows
        )
        return row_doc_base, gb_krow0, gb_kend, gb_krow0.numel()

    def _union(self, ci: int, idx3, counts):
        """Union block lists of row chunk ci (built once per call: forward and backward share the plan)."""
        if ci not in self._unions:
            row_doc_base, gb_krow0, gb_kend, num_gblocks = self._global_blocks
            # the gather kernels take the sparse rows latest position first, documents interleaved; tiles take them
            # in (descending) row order, so that a tile's queries are neighbours in one document (a tile that spans
            # two never shares); with one document both orders are the same
            rows = torch.sort(self.chunks[ci].sparse_rows, descending=True).values
            u, ubits, ucount, use = union_lists(idx3, counts, rows, row_doc_base, num_gblocks, self.share,
                                                self.share_max_union)
            # the per-query kernels' list lengths: 0 for the rows of sharing tiles (their zero outputs are written
            # first and overwritten by the shared kernel); None when every tile shares (one document, no rule)
            unshared = None
            if self.share_max_union < 1.0 or self.layout.num_docs > 1:
                row_use = use.repeat_interleave(self.share, dim=1)[:, :rows.numel()] != 0
                unshared = counts.clone()
                unshared[:, rows.long()] = torch.where(row_use, 0, counts[:, rows.long()])
            self._unions[ci] = TileUnions(rows, u, ubits, ucount, use, gb_krow0, gb_kend, unshared)
        return self._unions[ci]

    def _local_meta(self, tile_m=None):
        return dict(G=self.group, D=self.dim, BD=self.bd, BM=tile_m or self.tile_m, BN=self.local_bn,
                    BS=self.block_size, WIN=self.window, PREC=self.prec, BLOCK_LOCAL=self.local_blocks == "block")

    # forward ------------------------------------------------------------------------------------------
    def forward(self, q3, k3, v3, idx3):
        rows = q3.shape[0]
        o = new_empty(q3.shape, q3.dtype, q3.device)
        lse = new_empty((rows, self.heads), torch.float32, q3.device)
        counts = self.list_lengths(idx3)
        scale_log2 = self.scale * LOG2E
        tune = should_tune(q3, self.group)
        kv_gather, kv_shared = self._kv_args(k3, v3, idx3)
        for ci, ch in enumerate(self.chunks):
            part_o, part_lse, base = o, lse, 0
            n_sparse = ch.sparse_rows.numel()
            if n_sparse and self.window:
                part_o = new_empty((ch.hi - ch.lo, self.heads, self.dim), torch.float32, q3.device)
                part_lse = new_empty((ch.hi - ch.lo, self.heads), torch.float32, q3.device)
                base = ch.lo
            union = self._union(ci, idx3, counts) if n_sparse and self.share > 1 else None
            if n_sparse and (union is None or union.unshared is not None):  # per-query lists (first: see _union)
                gather_fwd.launch(
                    (triton.cdiv(n_sparse, self.tokens_per_prog), self.kv_heads), tune,
                    q_ptr=q3, k_ptr=k3, v_ptr=v3, o_ptr=part_o, lse_ptr=part_lse, idx_ptr=idx3,
                    count_ptr=counts if union is None else union.unshared,
                    rows_ptr=ch.sparse_rows, n_rows=n_sparse, **self.row_tables, out_row_base=base,
                    **_qk_strides(q3, k3), stride_or=part_o.stride(0), stride_oh=part_o.stride(1),
                    stride_lr=part_lse.stride(0), stride_ih=idx3.stride(0), stride_ir=idx3.stride(1),
                    stride_ch=counts.stride(0), scale_log2=scale_log2, **self._gather_meta(idx3.shape[-1]),
                    **kv_gather,
                )
            if union is not None:  # tiles of neighbouring rows that share their blocks
                shared_fwd.launch(
                    (union.count.shape[1], self.kv_heads), tune,
                    q_ptr=q3, k_ptr=k3, v_ptr=v3, o_ptr=part_o, lse_ptr=part_lse, **union.kernel_args(),
                    n_rows=n_sparse, **self.row_tables, out_row_base=base,
                    **_qk_strides(q3, k3), stride_or=part_o.stride(0), stride_oh=part_o.stride(1),
                    stride_lr=part_lse.stride(0), scale_log2=scale_log2, **self._shared_meta(), **kv_shared,
                )
            row0, nrows, _ = ch.tiles
            if row0.numel():
                local_fwd.launch(
                    (row0.numel(), self.heads), tune and self.tile_m == 128,
                    q_ptr=q3, k_ptr=k3, v_ptr=v3, o_ptr=o, lse_ptr=lse, part_o_ptr=part_o, part_lse_ptr=part_lse,
                    tile_row0_ptr=row0, tile_nrows_ptr=nrows, **self.row_tables,
                    n_tiles=row0.numel(), part_row_base=base, **self.dense.kernel_args(),
                    **_qk_strides(q3, k3), stride_or=o.stride(0), stride_oh=o.stride(1), stride_lr=lse.stride(0),
                    stride_pr=part_o.stride(0), stride_ph=part_o.stride(1), stride_plr=part_lse.stride(0),
                    scale_log2=scale_log2, **self._local_meta(), HAS_PART=bool(n_sparse and self.window),
                    default=self.fwd_config,
                )
        return o, lse

    # backward -----------------------------------------------------------------------------------------
    def backward(self, do3, q3, k3, v3, o3, lse, idx3):
        rows_heads = q3.shape[0] * self.heads
        delta = torch.empty((q3.shape[0], self.heads), dtype=torch.float32, device=q3.device)
        _delta_kernel[(triton.cdiv(rows_heads, 64),)](o_ptr=o3, do_ptr=do3, delta_ptr=delta, n=rows_heads,
                                                      D=self.dim, BD=self.bd, BLOCK=64)
        dq = new_empty(q3.shape, q3.dtype, q3.device)
        dk = torch.zeros(k3.shape, dtype=torch.float32, device=k3.device)
        dv = torch.zeros(k3.shape, dtype=torch.float32, device=k3.device)
        counts = self.list_lengths(idx3)
        grads = dict(q_ptr=q3, k_ptr=k3, v_ptr=v3, do_ptr=do3, lse_ptr=lse, delta_ptr=delta, **_qk_strides(q3, k3),
                     stride_lr=lse.stride(0), scale_log2=self.scale * LOG2E, scale=self.scale)
        wide = self.bd >= 128
        tune = should_tune(q3, self.group)
        kv_gather, kv_shared = self._kv_args(k3, v3, idx3)
        any_sparse = any(ch.sparse_rows.numel() for ch in self.chunks)
        dq_acc = None
        if any_sparse and self.dq_atomic:  # the gathered dq of every sparse row, added by the dk/dv pass
            dq_acc = torch.zeros(q3.shape, dtype=torch.float32, device=q3.device)
            self._gather_dkdv(grads, idx3, counts, dk, dv, dq_acc)
        for ci, ch in enumerate(self.chunks):
            part, base = dq, 0
            n_sparse = ch.sparse_rows.numel()
            if n_sparse and dq_acc is not None:
                part, base = dq_acc, 0
            elif n_sparse and self.window:
                part, base = new_empty((ch.hi - ch.lo, self.heads, self.dim), torch.float32, q3.device), ch.lo
            union = self._union(ci, idx3, counts) if n_sparse and dq_acc is None and self.share > 1 else None
            if n_sparse and dq_acc is None and (union is None or union.unshared is not None):
                gather_dq.launch(
                    (triton.cdiv(n_sparse, self.tokens_per_prog), self.kv_heads), tune,
                    **grads, dq_ptr=part, idx_ptr=idx3, count_ptr=counts if union is None else union.unshared,
                    rows_ptr=ch.sparse_rows, n_rows=n_sparse,
                    **self.row_tables, out_row_base=base, stride_ih=idx3.stride(0), stride_ir=idx3.stride(1),
                    stride_ch=counts.stride(0), stride_dqr=part.stride(0), stride_dqh=part.stride(1),
                    **self._gather_meta(idx3.shape[-1]), **kv_gather,
                )
            if union is not None:
                shared_dq.launch(
                    (union.count.shape[1], self.kv_heads), tune,
                    **grads, dq_ptr=part, **union.kernel_args(), n_rows=n_sparse,
                    **self.row_tables, out_row_base=base, stride_dqr=part.stride(0), stride_dqh=part.stride(1),
                    **self._shared_meta(), **kv_shared,
                )
            row0, nrows, _ = ch.dq_tiles  # tiles of dq_tile_m rows: the kernel's BM must cover each tile
            if row0.numel():
                _local_dq_kernel[(row0.numel(), self.heads)](
                    **grads, dq_ptr=dq, part_ptr=part, tile_row0_ptr=row0, tile_nrows_ptr=nrows, **self.row_tables,
                    n_tiles=row0.numel(), part_row_base=base, **self.dense.kernel_args(),
                    stride_pr=part.stride(0), stride_ph=part.stride(1),
                    **self._local_meta(self.dq_tile_m), HAS_PART=bool(n_sparse and self.window),
                    num_warps=4, num_stages=2,
                )
        kdoc, kstart = self.layout.key_tiles(self.dkdv_bn, self.key_hi)
        if kdoc.numel():
            nsplit = self.dkdv_nsplit
            warps, stages = self.dkdv_local_launch or (8 if wide else 4, 2)
            _local_dkdv_kernel[(kdoc.numel(), self.kv_heads, nsplit)](
                **grads, dk_ptr=dk, dv_ptr=dv, ktile_doc_ptr=kdoc, ktile_start_ptr=kstart, **self.docs,
                **self.dense.kernel_args(doc=True), stride_dkr=dk.stride(0), stride_dkh=dk.stride(1),
                **dict(self._local_meta(self.dkdv_bm), BN=self.dkdv_bn), NSPLIT=nsplit,
                num_warps=warps, num_stages=stages,
            )
        if dq_acc is not None and not self.window:  # sparse rows took no local dq kernel: their whole dq
            rows = torch.cat([ch.sparse_rows for ch in self.chunks]).long()
            dq.index_copy_(0, rows, dq_acc.index_select(0, rows).to(dq.dtype))
        elif any_sparse and dq_acc is None:
            self._gather_dkdv(grads, idx3, counts, dk, dv)
        return dq, dk.to(k3.dtype), dv.to(v3.dtype)

    def _gather_dkdv(self, grads, idx3, counts, dk, dv, dq_acc=None):
        chunks, n_chunks, entry_row, gb_krow0, gb_kend, num_gblocks = self.key_map(idx3, counts)
        group_pad = next_pow2(self.group)
        per_step = max(1, self.dkdv_rows // group_pad)
        dq_out = dk if dq_acc is None else dq_acc  # (an unused pointer without DQ)
        # prefetched steps load in registers: the loop's pipeliner is off, one stage
        stages = 1 if self.dkdv_prefetch else 2
        num_warps, num_stages = self.dkdv_gather_launch or ((8, stages) if self.prec == "ieee" else (4, stages))
        _gather_dkdv_kernel[(chunks[0].numel() * (self.block_size // self.dkdv_keys),)](
            **grads, dk_ptr=dk, dv_ptr=dv, dq_ptr=dq_out, chunk_key_ptr=chunks[0], chunk_e0_ptr=chunks[1],
            chunk_e1_ptr=chunks[2], n_chunks_ptr=n_chunks,
            entry_row_ptr=entry_row, gb_krow0_ptr=gb_krow0, gb_kend_ptr=gb_kend, **self.row_tables,
            num_gblocks=num_gblocks, stride_dkr=dk.stride(0), stride_dkh=dk.stride(1),
            stride_dqr=dq_out.stride(0), stride_dqh=dq_out.stride(1),
            G=self.group, GP=group_pad, TP=per_step, D=self.dim, BD=self.bd, BS=self.block_size, BK=self.dkdv_keys,
            PREC=self.prec, DQ=dq_acc is not None, ATOMIC=self.dkdv_chunk != 0,
            PREFETCH=self.dkdv_prefetch, num_warps=num_warps,
            num_stages=num_stages,
        )

    def key_map(self, idx3, counts):
        """Transposed block lists: (group, global block) -> the sparse rows that selected it, in chunks, built on
        the device with no host synchronisation (the number of chunks is not read back: the grid is its upper
        bound, ``n_keys + ceil(entries / chunk)``, and programs past ``n_chunks`` return at once). A block's chunks
        are consecutive (launching chunks by their first row instead, so that the programs running at once gather
        the same rows' q/dO from L2, measured level on an H200: docs/perf.md).

        Only the entries the gather kernels take (the first `counts` of each list). Returns ((chunk key, first
        entry, end entry), n_chunks [1] on the device, entry_row, block first key row, block end key row, number
        of global blocks); chunk key = group · num_gblocks + global block.
        """
        rows = torch.cat([ch.sparse_rows for ch in self.chunks]).long()
        row_doc_base, gb_krow0, gb_kend, num_gblocks = self._global_blocks
        lists = idx3.index_select(1, rows)  # [HKV, NS, K]
        taken = torch.arange(lists.shape[-1], device=idx3.device) < counts.index_select(1, rows)[..., None]
        n_keys = self.kv_heads * num_gblocks
        key_dtype = torch.int32 if n_keys < 2**31 - 1 else torch.int64
        heads_off = (torch.arange(self.kv_heads, device=idx3.device) * num_gblocks)[:, None, None]
        keys = (lists + row_doc_base[rows][None, :, None] + heads_off).to(key_dtype)
        keys = torch.where(taken, keys, torch.full_like(keys, n_keys)).flatten()
        sorted_keys, order = torch.sort(keys)  # entries not taken (key n_keys) sort last and are never read
        # each key's first entry by a binary search of the sorted keys (torch.bincount reads its input's maximum
        # back to the host on CUDA: a synchronisation that drained the GPU's queue in every backward)
        bounds = torch.searchsorted(sorted_keys, torch.arange(n_keys + 1, device=idx3.device, dtype=key_dtype))
        starts, counts_per_key = bounds[:-1], bounds[1:] - bounds[:-1]
        entry_row = rows[(order // lists.shape[-1]) % rows.numel()].int()
        chunk = self.dkdv_chunk or max(1, keys.numel())  # 0: a block's whole list in one program (no atomics)
        per_key = (counts_per_key + chunk - 1) // chunk
        chunk_end = torch.cumsum(per_key, 0)  # one past each key's last chunk
        max_chunks = n_keys + triton.cdiv(keys.numel(), chunk)
        c = torch.arange(max_chunks, device=idx3.device)
        key = torch.searchsorted(chunk_end, c, right=True).clamp_(max=n_keys - 1)
        within = c - (chunk_end - per_key)[key]
        e0 = starts[key] + within * chunk
        e1 = torch.minimum(e0 + chunk, starts[key] + counts_per_key[key])
        chunks = (key.int(), e0.int(), e1.int())
        return chunks, chunk_end[-1:].int(), entry_row, gb_krow0, gb_kend, num_gblocks


def window_split_exact(init_blocks: int, topk: int, window_size: int, block_size: int,
                       local_blocks: str = "token") -> bool:
    """The window's blocks (at most (W-1)//B_s + 2; W//B_s + 1 under local_blocks="block") plus the init blocks
    always fit in K: every visible set contains the whole local window, so it can be computed by the local tile
    kernels."""
    num_selected = topk + window_size // block_size
    window_blocks = window_size // block_size + 1 if local_blocks == "block" else (window_size - 1) // block_size + 2
    return window_size > 0 and init_blocks + window_blocks <= num_selected


class SparseAttnFn(torch.autograd.Function):
    """o = attention(q, k, v) over dense rows and listed blocks; block lists are constants."""

    @staticmethod
    def forward(ctx, q, k, v, idx3, plan: AttnPlan):
        batch, seqlen_q, heads, dim = q.shape
        q3 = q.contiguous().view(batch * seqlen_q, heads, dim)
        k3 = k.contiguous().view(-1, k.shape[2], dim)
        v3 = v.contiguous().view(-1, v.shape[2], dim)
        o3, lse = plan.forward(q3, k3, v3, idx3)
        ctx.save_for_backward(q3, k3, v3, o3, lse, idx3)
        ctx.plan, ctx.shapes = plan, (q.shape, k.shape)
        return o3.view(q.shape)

    @staticmethod
    def backward(ctx, do):
        q3, k3, v3, o3, lse, idx3 = ctx.saved_tensors
        q_shape, k_shape = ctx.shapes
        do3 = do.contiguous().view(q3.shape)
        dq, dk, dv = ctx.plan.backward(do3, q3, k3, v3, o3, lse, idx3)
        return dq.view(q_shape), dk.view(k_shape), dv.view(k_shape), None, None


def sort_block_lists(idx3: torch.Tensor) -> torch.Tensor:
    """Valid entries first in ascending order, -1 after: the layout the kernels walk."""
    big = torch.iinfo(torch.int32).max
    ordered = torch.sort(torch.where(idx3 < 0, big, idx3), dim=-1).values
    return torch.where(ordered == big, -1, ordered).int()
