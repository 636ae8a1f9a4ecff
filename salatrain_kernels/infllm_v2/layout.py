"""Plumbing shared by the InfLLM-V2 kernels: document layout, row/tile tables, key compression.

Every kernel works on flattened rows: query row r in [0, R = B·Tq) of q viewed as [R, HQ, D], key row in
[0, B·Tk) of k viewed as [B·Tk, HKV, D]. A *document* is a batch element, or one cu_seqlens segment; a
query's position t counts from its document's first key. Tables are built once per layout (host side for
per-document data, device side for per-row data) so kernels never branch on varlen vs padded batches; the layouts
of recent calls are kept with their tables (LAYOUT_CACHE_SIZE), so a call of the same shape builds nothing.
"""
from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


Bound = int | list[int]  # a position bound: one for every document, or one per document

# Layouts of recent calls, by shape and document bounds (and device, stream, inference mode): a layout and the host
# tables built from it (tiles, row lists, per-document tables, with their pinned copies) are made once and reused by
# every later call of the same shape: each sparse layer of a model, the backward, the next training step. Building
# them took 6 of the 13 ms of host time of a fwd+bwd at 32K on an H200, 17 of 28 ms at 128K (docs/perf.md). 0 turns
# the reuse off. The tables are never written after they are built; they take about 2 MiB a layout at 128K tokens.
LAYOUT_CACHE_SIZE = 8
_LAYOUTS: OrderedDict = OrderedDict()
_LAYOUTS_LOCK = threading.Lock()


def clear_layout_cache() -> None:
    """Forget every kept layout (and its tables)."""
    with _LAYOUTS_LOCK:
        _LAYOUTS.clear()


def _frozen(x):
    if isinstance(x, (list, tuple)):
        return tuple(_frozen(v) for v in x)
    return x


def _kept(method):
    """Keep a DocLayout method's result per arguments on the layout (the result is shared: never written)."""

    @functools.wraps(method)
    def kept(self, *args, **kwargs):
        if not LAYOUT_CACHE_SIZE:
            return method(self, *args, **kwargs)
        key = (method.__name__, _frozen(args), tuple(sorted((k, _frozen(v)) for k, v in kwargs.items())))
        if key not in self.kept:
            self.kept[key] = method(self, *args, **kwargs)
        return self.kept[key]

    return kept


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """A host table onto ``device`` without a host synchronisation: a plain copy to CUDA from pageable memory
    waits for the stream (every kernel queued so far) before it starts, so the host stops running ahead of the
    GPU; from pinned memory the copy is queued like a kernel (the caching host allocator keeps the pinned block
    until the copy has run)."""
    if torch.device(device).type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _int32(values, device) -> torch.Tensor:
    return to_device(torch.as_tensor(values, dtype=torch.int32), device)


@dataclass
class DocLayout:
    """Where each document's queries and keys live in the flattened row spaces.

    Host lists (one entry per document): kstart (first key row), length (keys), qstart (first query row),
    qpos0 (position of the first query), qlen. Device per-row int32 tensors: row_pos (t), row_kbase (first
    key row of the row's document).
    """

    batch: int
    seqlen_q: int
    seqlen_k: int
    kstart: list[int]
    length: list[int]
    qstart: list[int]
    qpos0: list[int]
    qlen: list[int]
    row_pos: torch.Tensor
    row_kbase: torch.Tensor
    device: torch.device
    kept: dict = field(default_factory=dict, repr=False, compare=False)  # tables built from it (_kept)

    @classmethod
    def build(cls, q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor | None) -> "DocLayout":
        return cls.from_shape(q.shape[0], q.shape[1], k.shape[1], q.device, cu_seqlens)

    @classmethod
    def from_shape(cls, batch: int, seqlen_q: int, seqlen_k: int, device, cu_seqlens) -> "DocLayout":
        """The layout of a call (a kept one when a recent call had the same shape and bounds: LAYOUT_CACHE_SIZE).
        A decoding step (one query a sequence) is never kept: its key length is new every step, so it would only push
        out the layouts that recur."""
        bounds = None if cu_seqlens is None else cu_seqlens.tolist()
        device = torch.device(device)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not LAYOUT_CACHE_SIZE or seqlen_q == 1 or capturing:
            return cls._new(batch, seqlen_q, seqlen_k, device, cu_seqlens, bounds)
        stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else None
        key = (batch, seqlen_q, seqlen_k, device, stream, torch.is_inference_mode_enabled(),
               None if bounds is None else tuple(bounds))
        with _LAYOUTS_LOCK:
            layout = _LAYOUTS.get(key)
            if layout is None:
                layout = _LAYOUTS[key] = cls._new(batch, seqlen_q, seqlen_k, device, cu_seqlens, bounds)
                while len(_LAYOUTS) > LAYOUT_CACHE_SIZE:
                    _LAYOUTS.popitem(last=False)
            _LAYOUTS.move_to_end(key)
            return layout

    @classmethod
    def _new(cls, batch: int, seqlen_q: int, seqlen_k: int, device, cu_seqlens, bounds) -> "DocLayout":
        if cu_seqlens is None:
            kstart = [b * seqlen_k for b in range(batch)]
            length = [seqlen_k] * batch
            qstart = [b * seqlen_q for b in range(batch)]
            qpos0 = [seqlen_k - seqlen_q] * batch
            qlen = [seqlen_q] * batch
            pos = torch.arange(seqlen_q, dtype=torch.int32, device=device) + (seqlen_k - seqlen_q)
            row_pos = pos.repeat(batch)
            row_kbase = (torch.arange(batch, dtype=torch.int32, device=device) * seqlen_k).repeat_interleave(seqlen_q)
        else:
            if bounds[0] != 0 or bounds[-1] != seqlen_q or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
                raise ValueError(f"cu_seqlens must rise from 0 to T={seqlen_q}, got {bounds[:4]}...")
            kstart = bounds[:-1]
            length = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
            qstart, qpos0, qlen = list(kstart), [0] * len(length), list(length)
            lens = to_device(torch.as_tensor(length), device)
            starts = to_device(cu_seqlens[:-1].contiguous(), device)  # host bounds: a pinned copy, no wait
            row_kbase = torch.repeat_interleave(starts, lens, output_size=seqlen_q).int()
            row_pos = (torch.arange(seqlen_q, device=device) - row_kbase).int()
        return cls(batch, seqlen_q, seqlen_k, kstart, length, qstart, qpos0, qlen, row_pos, row_kbase, device)

    @property
    def num_docs(self) -> int:
        return len(self.length)

    @property
    def num_rows(self) -> int:
        return self.batch * self.seqlen_q

    @property
    def max_len(self) -> int:
        return max(self.length)

    def max_blocks(self, block_size: int) -> int:
        return -(-self.max_len // block_size)

    def _docs(self, values: list[int]) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.int64)

    def _bound(self, bound: Bound) -> torch.Tensor:
        return torch.tensor(bound, dtype=torch.int64) if isinstance(bound, int) else self._docs(bound)

    def _row_ranges(self, pos_lo: Bound, pos_hi: Bound, row_lo: int, row_hi: int):
        """Per document (CPU int64): first row, first position and number of the queries with position in
        [pos_lo, pos_hi) (each bound one int, or one per document) and row in [row_lo, row_hi)."""
        qs, p0, n = self._docs(self.qstart), self._docs(self.qpos0), self._docs(self.qlen)
        lo = torch.maximum(torch.maximum(p0, self._bound(pos_lo)), p0 + row_lo - qs)
        hi = torch.minimum(torch.minimum(p0 + n, self._bound(pos_hi)), p0 + row_hi - qs)
        count = torch.clamp(hi - lo, min=0)
        return qs + lo - p0, lo, count

    @_kept
    def rows(self, pos_lo: Bound = 0, pos_hi: Bound = 2**62, row_lo: int = 0, row_hi: int = 2**62) -> torch.Tensor:
        """Query rows with position in [pos_lo, pos_hi) (and row in [row_lo, row_hi)), latest positions first."""
        first_row, first_pos, count = self._row_ranges(pos_lo, pos_hi, row_lo, row_hi)
        rows, pos = cat_ranges(first_row, count), cat_ranges(first_pos, count)
        order = torch.argsort(pos, descending=True, stable=True)
        return to_device(rows[order].int(), self.device)

    @_kept
    def tiles(self, tile: int, pos_lo: Bound = 0, pos_hi: Bound = 2**62, row_lo: int = 0, row_hi: int = 2**62,
              on_device: bool = True):
        """Tiles of up to `tile` consecutive query rows of one document (positions in [pos_lo, pos_hi), rows in
        [row_lo, row_hi)). Returns int32 tensors (first row, rows in tile, document), ascending rows, on the
        layout's device (or on the host with on_device=False).
        """
        first_row, _, count = self._row_ranges(pos_lo, pos_hi, row_lo, row_hi)
        per_doc = (count + tile - 1) // tile
        row0 = cat_ranges(first_row, per_doc, tile)
        end = torch.repeat_interleave(first_row + count, per_doc)
        docs = torch.repeat_interleave(torch.arange(self.num_docs), per_doc)
        device = self.device if on_device else "cpu"
        return tuple(to_device(x.int(), device) for x in (row0, torch.clamp(end - row0, max=tile), docs))

    @_kept
    def tile_runs(self, tile: int, pos_lo: Bound, max_rows: int) -> tuple[tuple[int, int, int, int], ...]:
        """The tiles of ``tiles(tile, pos_lo)`` in consecutive runs spanning at most ``max_rows`` rows each (at least
        one tile a run): (first tile, end tile, first row, end row) per run."""
        row0, nrows, _ = self.tiles(tile, pos_lo, on_device=False)
        starts = row0.long()
        ends = starts + nrows
        runs, first = [], 0
        while first < starts.numel():  # ends ascend: the run ends at the last tile ending within max_rows
            last = max(first, int(torch.searchsorted(ends, starts[first] + max_rows, right=True)) - 1)
            runs.append((first, last + 1, int(starts[first]), int(ends[last])))
            first = last + 1
        return tuple(runs)

    @_kept
    def key_tiles(self, tile: int, pos_hi_per_doc: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tiles of `tile` keys (document index, first key position) covering positions [0, pos_hi) per doc."""
        per_doc = (torch.clamp(self._docs(pos_hi_per_doc), min=0) + tile - 1) // tile
        starts = cat_ranges(torch.zeros_like(per_doc), per_doc, tile)
        docs = torch.repeat_interleave(torch.arange(self.num_docs), per_doc)
        return to_device(docs.int(), self.device), to_device(starts.int(), self.device)

    @_kept
    def doc_tensor(self, values: list[int]) -> torch.Tensor:
        return _int32(values, self.device)

    @_kept
    def windows(self, kernel_size: int, stride: int) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
        """Compressed windows: first key row of each (int64 device), per-doc first window index and count."""
        length = self._docs(self.length)
        counts = torch.where(length >= kernel_size, (length - kernel_size) // stride + 1, 0)
        firsts = torch.cumsum(counts, 0) - counts
        rows = cat_ranges(self._docs(self.kstart), counts, stride)
        return to_device(rows, self.device), tuple(firsts.tolist()), tuple(counts.tolist())

    @_kept
    def global_blocks(self, block_size: int) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
        """Blocks of all documents numbered globally: per-doc base, and per block its first/end key row."""
        kstart, length = self._docs(self.kstart), self._docs(self.length)
        per_doc = (length + block_size - 1) // block_size
        first = cat_ranges(kstart, per_doc, block_size)
        end = torch.repeat_interleave(kstart + length, per_doc)
        base = torch.cumsum(per_doc, 0) - per_doc
        return tuple(base.tolist()), to_device(first.int(), self.device), to_device(end.int(), self.device)


def dense_until(lengths: list[int], dense_len: int, dense_len_mode: str) -> list[int]:
    """Per document of `lengths` keys: its queries at positions below the entry attend densely (see DenseRows)."""
    if dense_len_mode == "sequence":
        return [0 if n >= dense_len else dense_len for n in lengths]
    return [dense_len] * len(lengths)


@dataclass
class DenseRows:
    """Which query rows attend densely: a row at position t is dense iff t < `until` of its document.

    Position rule: until = dense_len for every document. Sequence rule (MiniCPM-SALA): 0 for a document holding
    dense_len keys or more (every query selects blocks), dense_len for a shorter one (no query reaches it). The
    kernels take one scalar `dense_len` when every document agrees (always under the position rule, and in
    padded batches); otherwise PER_ROW_DENSE with int32 tables by row (`row_dense_ptr`) and by document
    (`doc_dense_ptr`), which `kernel_args` supplies (placeholders when unused).
    """

    until: list[int]
    per_row: bool
    row_table: torch.Tensor
    doc_table: torch.Tensor

    @classmethod
    def build(cls, layout: DocLayout, dense_len: int, dense_len_mode: str = "position") -> "DenseRows":
        until = dense_until(layout.length, dense_len, dense_len_mode)
        if len(set(until)) <= 1:
            return cls(until, False, layout.row_pos, layout.row_pos)
        doc = layout.doc_tensor(until)
        counts = layout.doc_tensor(layout.qlen).long()
        return cls(until, True, torch.repeat_interleave(doc, counts, output_size=layout.num_rows), doc)

    @property
    def scalar(self) -> int:
        """The one threshold of every document (0 with per-row tables; the kernels then read those)."""
        return 0 if self.per_row or not self.until else self.until[0]

    def has_sparse(self, layout: DocLayout) -> bool:
        return any(p0 + n > u for p0, n, u in zip(layout.qpos0, layout.qlen, self.until))

    def kernel_args(self, doc: bool = False) -> dict:
        """dense_len, the table of rows (or of documents, for key-tile kernels) and PER_ROW_DENSE."""
        table = self.doc_table if doc else self.row_table
        return {"dense_len": self.scalar, ("doc_dense_ptr" if doc else "row_dense_ptr"): table,
                "PER_ROW_DENSE": self.per_row}


def cat_ranges(starts: torch.Tensor, counts: torch.Tensor, step: int = 1) -> torch.Tensor:
    """Concatenation of arange(start, start + count·step, step) over the entries (CPU int64)."""
    total = int(counts.sum())
    offsets = torch.arange(total) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return torch.repeat_interleave(starts, counts) + offsets * step


def compress_keys(k_rows: torch.Tensor, window_rows: torch.Tensor, kernel_size: int, dtype) -> torch.Tensor:
    """Mean of k_rows [NK, HKV, D] over kernel_size rows from each window start -> [max(NC, 1), HKV, D].

    Accumulates in fp32 and rounds once to `dtype`. An empty window set gives one zero row (never read),
    so kernels always get a valid pointer.
    """
    if window_rows.numel() == 0:
        return torch.zeros(1, *k_rows.shape[1:], dtype=dtype, device=k_rows.device)
    taps = torch.arange(kernel_size, device=window_rows.device)
    members = k_rows.index_select(0, (window_rows[:, None] + taps).flatten())  # kernel/stride x the keys
    return members.view(window_rows.numel(), kernel_size, *k_rows.shape[1:]).mean(1, dtype=torch.float32).to(dtype)
