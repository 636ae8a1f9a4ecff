"""Packing tokenized documents into rows of ``seq_len`` tokens, with random access by global row index.

Epoch e orders the documents by a permutation seeded with (seed, e), concatenates them and cuts the stream
into ``rows_per_epoch = tokens // seq_len`` rows (the remainder is dropped). Row g is row g % rows_per_epoch
of epoch g // rows_per_epoch, so the data position of a run is one integer (rows consumed) and a resumed
run reads exactly what an uninterrupted one would. Ranks read disjoint rows of the same stream.

A row carries its document boundaries as ``position_ids`` that restart at 0 where a document (or the piece
of a document that continues from the previous row) starts; the model turns restarts into ``cu_seqlens`` so
no mixer crosses a boundary. ``labels`` are the token ids where the token is a target, else -100; the first
token of every document is never a target, so the last token of one document does not predict the next.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError

IGNORE = -100


class PackedSequences:
    """Rows of ``seq_len`` tokens over a tokenized ``datasets.Dataset`` (input_ids, loss_mask, length)."""

    def __init__(self, docs, seq_len: int, seed: int = 0, shuffle: bool = True):
        self.docs = docs.with_format("numpy", columns=["input_ids", "loss_mask"])
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = np.asarray(docs["length"], dtype=np.int64)
        self.num_documents = len(self.lengths)
        self.num_tokens = int(self.lengths.sum())
        self.rows_per_epoch = self.num_tokens // seq_len
        if self.rows_per_epoch == 0:
            raise UserError(f"data: {self.num_tokens} tokens in {self.num_documents} documents, fewer than one "
                            f"sequence of trainer.seq_len={seq_len}")
        self._epoch: int | None = None
        self._order = self._ends = None
        self._columns = _arrow_columns(docs, ("input_ids", "loss_mask"))

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_documents)
            else:
                order = np.arange(self.num_documents)
            self._order, self._ends = order, np.cumsum(self.lengths[order])
            self._epoch = epoch
        return self._order, self._ends

    def row(self, index: int) -> dict[str, np.ndarray]:
        """Row ``index`` (global, over epochs): input_ids, position_ids, labels, each [seq_len] int64."""
        epoch, k = divmod(int(index), self.rows_per_epoch)
        order, ends = self._epoch_layout(epoch)
        start, stop = k * self.seq_len, (k + 1) * self.seq_len
        i = int(np.searchsorted(ends, start, side="right"))
        ids, mask, pos = [], [], []
        while start < stop:
            doc_start = ends[i] - self.lengths[order[i]]
            doc_ids, doc_mask = self._document(int(order[i]))
            lo, hi = start - doc_start, min(stop, ends[i]) - doc_start
            ids.append(doc_ids[lo:hi])
            mask.append(doc_mask[lo:hi])
            pos.append(np.arange(hi - lo))
            start += hi - lo
            i += 1
        ids, mask, pos = (np.concatenate(x).astype(np.int64) for x in (ids, mask, pos))
        labels = np.where((mask > 0) & (pos > 0), ids, IGNORE)
        return {"input_ids": ids, "position_ids": pos, "labels": labels}

    def _document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Document ``i``'s input_ids and loss_mask: views into the memory-mapped Arrow buffers where the dataset
        allows it (a row lookup through ``datasets`` converts the whole document and costs ~0.3 ms, ~20 ms of
        a 32-row step of 4K tokens while the GPU waits), else through ``datasets``."""
        if self._columns is None:
            doc = self.docs[i]
            return doc["input_ids"], doc["loss_mask"]
        rows, columns = self._columns
        physical = i if rows is None else int(rows[i])
        return tuple(_slice(col, physical) for col in columns)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Rows stacked into [len(indices), seq_len] int64 tensors."""
        rows = [self.row(i) for i in indices]
        return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}


def packed_layout(batch: dict[str, torch.Tensor]) -> dict:
    """What the model and the loss would otherwise work out on the device, each with host reads, for a batch of
    whole rows (built on the host, where it costs nothing, before the batch moves to the device):

    - ``cu_seqlens`` (int32 [N+1], the documents over the rows laid end to end) and ``max_seqlen`` (the longest),
      only when some row holds more than one document (otherwise rows stay rows);
    - ``target_index`` (int64 [M], positions in the flattened [B·T] rows whose next token is a target) and
      ``target`` (int64 [M], those targets), when the batch has ``labels``."""
    from ..models.modeling_sala_hybrid import packed_cu_seqlens

    pos, labels = batch["position_ids"], batch.get("labels")
    out: dict = {}
    if pos.shape[1] > 1 and bool((pos[:, 1:] == 0).any()):
        cu = packed_cu_seqlens(pos)
        out.update(cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()))
    if labels is not None:
        nxt = labels[:, 1:]
        row, col = torch.nonzero(nxt != IGNORE, as_tuple=True)
        out.update(target_index=row * labels.shape[1] + col, target=nxt[row, col])
    return out


def num_targets(labels: torch.Tensor) -> int:
    """Positions that are predicted (labels[:, 1:] not ignored)."""
    return int((labels[:, 1:] != IGNORE).sum())


def _arrow_columns(docs, names: tuple[str, ...]):
    """Where document i lies in the dataset's memory-mapped Arrow buffers: (physical row of each document, or
    None without an indices mapping — ``filter``/``shuffle`` leave one —, and per column the first row of each
    chunk, each chunk's flat values and its offsets), numpy arrays sharing the dataset's buffers; None when
    pyarrow cannot expose a column without copying."""
    try:
        indices = getattr(docs, "_indices", None)
        rows = None if indices is None else indices.column(0).to_numpy()
        table = docs.data.table
        out = []
        for name in names:
            chunks = [c for c in table.column(name).chunks if len(c)]
            starts = np.cumsum([0] + [len(c) for c in chunks[:-1]]).astype(np.int64)
            values = [c.values.to_numpy(zero_copy_only=True) for c in chunks]
            offsets = [c.offsets.to_numpy(zero_copy_only=True) for c in chunks]
            out.append((starts, values, offsets))
        return rows, out
    except Exception:  # nested nulls, a layout pyarrow cannot expose without copying: the datasets path
        return None


def _slice(column, i: int) -> np.ndarray:
    starts, values, offsets = column
    c = int(np.searchsorted(starts, i, side="right")) - 1
    j = i - int(starts[c])
    return values[c][offsets[c][j] : offsets[c][j + 1]]
