"""Text for perplexity and held-out losses: local files, or corpora every Python install carries.

Built-in corpora (no download):
    pydoc    the language reference and library topics of ``pydoc_data.topics`` (English prose, ~0.5 MB)
    stdlib   the standard library's ``*.py`` sources (``sysconfig.get_paths()["stdlib"]``; tests, site-packages
             and pydoc_data left out), in sorted path order
    site     the ``*.py`` sources of the installed packages (purelib and platlib; tests left out)
A corpus source may also be a ``.jsonl`` / ``.jsonl.gz`` file of {"text", "id"} records (e.g. the prose that
bench/make_prose.py collects); ids default to ``<file name>:<line>``.
Files: ``.jsonl`` holds one document per line (``text_field``); any other file is one document.
"""

from __future__ import annotations

import json
import sysconfig
import zlib
from pathlib import Path
from typing import Iterator

from ..errors import UserError

BUILTIN = ("pydoc", "stdlib", "site")
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data", "__pycache__"}
_MAX_SOURCE_BYTES = 200_000


def builtin_documents(name: str) -> Iterator[tuple[str, str]]:
    """(document id, text) of a built-in corpus, in a fixed order."""
    if name == "pydoc":
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield f"pydoc:{key}", topics[key]
    elif name == "stdlib":
        yield from _sources("stdlib", Path(sysconfig.get_paths()["stdlib"]))
    elif name == "site":
        paths = sysconfig.get_paths()
        for root in dict.fromkeys([paths["purelib"], paths["platlib"]]):
            yield from _sources("site", Path(root), skip=_SKIP_DIRS - {"site-packages", "dist-packages"})
    elif is_corpus_file(name):
        yield from _jsonl_documents(Path(name).expanduser())
    else:
        raise UserError(f"unknown built-in corpus {name!r}; choose from {list(BUILTIN)} or give a .jsonl(.gz) file")


def is_corpus_file(name: str) -> bool:
    return name.endswith((".jsonl", ".jsonl.gz")) and Path(name).expanduser().is_file()


def _jsonl_documents(path: Path, field: str = "text") -> Iterator[tuple[str, str]]:
    """(id, text) per record of a .jsonl or .jsonl.gz file; ids default to ``<file name>:<line>``."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise UserError(f'{path}:{n}: expected an object with a string field "{field}"')
            yield str(rec.get("id") or f"{path.name}:{n}"), rec[field]


def _sources(prefix: str, root: Path, skip: set[str] = _SKIP_DIRS) -> Iterator[tuple[str, str]]:
    if not root.is_dir():
        return
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if skip.intersection(rel.parts[:-1]):
            continue
        try:
            if f.stat().st_size > _MAX_SOURCE_BYTES:
                continue
            yield f"{prefix}:{rel.as_posix()}", f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def is_heldout(doc_id: str, every: int) -> bool:
    """A fixed 1-in-``every`` split by document id (crc32), the same on every machine."""
    return zlib.crc32(doc_id.encode()) % every == 0


def read_documents(paths: list[str], text_field: str = "text") -> list[str]:
    docs: list[str] = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise UserError(f"text file {path} does not exist")
        if path.suffix == ".jsonl":
            docs.extend(text for _, text in _jsonl_documents(path, text_field))
        else:
            docs.append(path.read_text(encoding="utf-8", errors="replace"))
    if not any(d.strip() for d in docs):
        raise UserError(f"no text in {', '.join(paths)}")
    return docs


def token_windows(tokenizer, docs: list[str], seq_len: int, max_tokens: int) -> list[list[int]]:
    """Documents joined by EOS (BOS first when the tokenizer adds one), cut into non-overlapping windows of
    ``seq_len`` tokens until ``max_tokens``; at least one window when there is enough text for it."""
    if seq_len < 2:
        raise UserError(f"seq_len must be >= 2, got {seq_len}")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    need = max(seq_len, max_tokens)
    for d in docs:
        stream.extend(tokenizer(d, add_special_tokens=False).input_ids + eos)
        if len(stream) >= need:
            break
    count = max(1, min(len(stream), max_tokens) // seq_len)
    windows = [stream[i * seq_len : (i + 1) * seq_len] for i in range(count)]
    if len(windows[0]) < seq_len:
        raise UserError(f"not enough text for one window of {seq_len} tokens (have {len(stream)})")
    return windows
