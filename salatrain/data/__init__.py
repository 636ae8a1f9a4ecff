"""Training data: load records with ``datasets``, tokenize (text or chat), pack into rows with document
boundaries, random access by global row index (deterministic, resumable, sharded by the caller)."""

from __future__ import annotations

from .packing import IGNORE, PackedSequences, num_targets, packed_layout
from .settings import DataSettings


def build_packed(settings: DataSettings, tokenizer, seq_len: int) -> PackedSequences:
    """Load, tokenize and pack ``settings.files`` for ``tokenizer`` into rows of ``seq_len`` tokens."""
    from datasets import concatenate_datasets
    from datasets.utils import logging as ds_logging

    from .sources import load_parts
    from .tokenize import tokenize_part

    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        parts = load_parts(settings)
        docs = [tokenize_part(p, tokenizer, settings.append_eos, settings.num_proc) for p in parts]
    finally:
        if bars:
            ds_logging.enable_progress_bar()
    docs = docs[0] if len(docs) == 1 else concatenate_datasets(docs)
    return PackedSequences(docs, seq_len, seed=settings.seed, shuffle=settings.shuffle)


__all__ = ["DataSettings", "IGNORE", "PackedSequences", "build_packed", "num_targets", "packed_layout"]
