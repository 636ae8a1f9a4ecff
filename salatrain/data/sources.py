"""Raw records from local files (jsonl/json, parquet, text) or hub datasets, via ``datasets``.

Each entry of ``data.files`` becomes one or more *parts*: a ``datasets.Dataset`` with a single column,
``text`` (str) or ``messages`` (chat turns). Mistakes are one-line ``UserError`` messages: a missing file, a
malformed jsonl line (``file:line``), a record whose text is not a string or whose messages are not
``[{"role": str, "content": str}, ...]`` (``file:line`` for json, the record's number otherwise), records
without a text or messages field, an unreadable file, an empty dataset.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .settings import DataSettings

log = logging.getLogger(__name__)

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")


@dataclass
class Part:
    """Records of one kind from one source: ``kind`` is "text" or "messages"; ``name`` names the source."""

    dataset: object
    kind: str
    name: str


def builder_for(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def expand(entry: str) -> list[Path] | None:
    """Local data files of a ``data.files`` entry (a file, a glob or a directory); None for a hub name."""
    path = Path(entry).expanduser()
    if any(ch in entry for ch in "*?["):
        found = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if builder_for(Path(p))]
        if not found:
            raise UserError(f"data.files: {entry!r} matches no data file (*.jsonl, *.json, *.parquet, *.txt)")
        return found
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and builder_for(p))
        if not found:
            raise UserError(f"data.files: directory {entry} holds no data file (*.jsonl, *.json, *.parquet, *.txt)")
        return found
    if path.is_file():
        if builder_for(path) is None:
            raise UserError(f"data.files: cannot tell the format of {entry} (use .jsonl, .json, .parquet or .txt)")
        return [path]
    if builder_for(path) is not None or entry.startswith((".", "/", "~")):
        raise UserError(f"data file {entry} does not exist")
    return None


def load_parts(settings: DataSettings) -> list[Part]:
    """Every entry of ``settings.files`` loaded; raises UserError when nothing holds a record."""
    parts: list[Part] = []
    for entry in settings.files:
        paths = expand(str(entry))
        if paths is None:
            parts.append(_hub_part(str(entry), settings))
            continue
        by_builder: dict[str, list[Path]] = {}
        for p in paths:
            by_builder.setdefault(builder_for(p), []).append(p)
        for builder, files in by_builder.items():
            parts.append(_local_part(builder, files, settings))
    parts = [p for p in parts if len(p.dataset) > 0]
    if not parts:
        raise UserError(f"data: {', '.join(map(str, settings.files))} hold no records (empty dataset)")
    return parts


def _local_part(builder: str, files: list[Path], settings: DataSettings) -> Part:
    from datasets import load_dataset

    kwargs = {"data_files": [str(f) for f in files], "split": "train", "cache_dir": settings.cache_dir}
    if builder == "text":
        kwargs["sample_by"] = settings.text_sample_by
    name = str(files[0]) + (f" (+{len(files) - 1} more)" if len(files) > 1 else "")
    if builder == "json":
        for f in files:
            if f.stat().st_size == 0:
                raise UserError(f"data file {f} is empty (empty dataset)")
    try:
        ds = load_dataset(builder, **kwargs)
    except Exception as e:
        if builder == "json":
            for f in files:
                find_bad_json_line(f, settings)
        cause = e.__cause__ or e
        if isinstance(cause, OSError) and cause.errno is not None:
            raise cause from None
        first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise UserError(f"cannot read {name}: {first}") from None
    return _select(ds, settings, name, files if builder == "json" else [])


def _hub_part(name: str, settings: DataSettings) -> Part:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, settings.hub_config, split=settings.hub_split, cache_dir=settings.cache_dir)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"data.files: {name!r} is neither a local file nor a loadable hub dataset ({first})") from None
    return _select(ds, settings, name)


def _select(ds, settings: DataSettings, name: str, json_files: list[Path] = ()) -> Part:
    """Keep the text or messages column (renamed ``text`` / ``messages``), every record of the right type;
    drop records where it is empty."""
    cols = ds.column_names
    if settings.messages_field in cols:
        field, kind = settings.messages_field, "messages"
    elif settings.text_field in cols:
        field, kind = settings.text_field, "text"
    else:
        raise UserError(f"{name}: records have neither a {settings.text_field!r} nor a {settings.messages_field!r} "
                        f"field (fields: {', '.join(cols)}); set data.text_field or data.messages_field")
    ds = ds.select_columns([field])
    if not _feature_ok(ds.features[field], kind):
        _check_records(ds, field, kind, name, json_files, settings)
    if field != kind:
        ds = ds.rename_column(field, kind)
    n = len(ds)
    ds = ds.filter(lambda batch: [bool(x) for x in batch[kind]], batched=True, desc=None)
    if len(ds) < n:
        log.warning("%s: dropped %d of %d records with an empty %r field", name, n - len(ds), n, field)
    return Part(ds, kind, name)


def _feature_ok(feature, kind: str) -> bool:
    """The column's type guarantees valid records: strings, or lists of {role: string, content: string}."""
    from datasets import Value

    def is_str(f) -> bool:
        return isinstance(f, Value) and f.dtype in ("string", "large_string")

    if kind == "text":
        return is_str(feature)
    inner = getattr(feature, "feature", None)
    return isinstance(inner, dict) and is_str(inner.get("role")) and is_str(inner.get("content"))


def record_problem(value, kind: str) -> str | None:
    """Why one record's text or messages value cannot be trained on, or None (an empty value is dropped)."""
    if value is None:
        return None
    if kind == "text":
        return None if isinstance(value, str) else f"is {_type(value)}, expected a string"
    if not isinstance(value, list):
        return f'is {_type(value)}, expected a list of {{"role": ..., "content": ...}} turns'
    for j, turn in enumerate(value, 1):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            return f'turn {j} is not {{"role": <string>, "content": <string>}} (got {json.dumps(turn)[:60]})'
    return None


def _type(value) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number",
            str: "a string"}.get(type(value), type(value).__name__)


def _check_records(ds, field: str, kind: str, name: str, json_files: list[Path], settings: DataSettings) -> None:
    """Name the first record of a column whose type allows bad values (``file:line`` for json files)."""
    for f in json_files:
        find_bad_json_line(f, settings)
    for i, value in enumerate(ds[field], 1):
        problem = record_problem(value, kind)
        if problem:
            raise UserError(f"{name}: record {i}: {field!r} {problem}")


def find_bad_json_line(path: Path, settings: DataSettings | None = None) -> None:
    """Raise UserError naming ``file:line`` of the first line of a jsonl file that is not a JSON object, or
    (with ``settings``) whose text or messages field has the wrong type."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        if builder_for(path) == "json" and path.suffixes[-1 if path.suffix != ".gz" else -2] == ".json":
            text = fh.read()
            try:
                whole = json.loads(text)
            except json.JSONDecodeError:
                fh = text.splitlines()
            else:
                for i, record in enumerate(whole if isinstance(whole, list) else [], 1):
                    if not isinstance(record, dict):
                        raise UserError(f"{path}: record {i}: expected a JSON object, got {type(record).__name__}")
                    if settings is not None:
                        _check_json_record(record, f"{path}: record {i}", settings)
                return
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(record).__name__}")
            if settings is not None:
                _check_json_record(record, f"{path}:{lineno}", settings)


def _check_json_record(record: dict, where: str, settings: DataSettings) -> None:
    if settings.messages_field in record:
        field, kind = settings.messages_field, "messages"
    elif settings.text_field in record:
        field, kind = settings.text_field, "text"
    else:
        return
    problem = record_problem(record[field], kind)
    if problem:
        raise UserError(f"{where}: {field!r} {problem}")
