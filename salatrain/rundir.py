"""Output directories, the same rules for every command: never an input, salatrain's own, one run at a time.

    check    output_dir is not equal to, inside, or around any input (with or without overwrite). A non-empty
             directory must carry salatrain's marker ``.salatrain.json`` naming this command (train resumes
             there, eval and pipeline add to it; convert, select and export replace it only with
             overwrite=true), or be taken over with overwrite=true.
    lock     an flock on the sibling file ``.<name>.lock`` (next to output_dir, so nothing is created inside
             output_dir before the inputs are opened), held for the whole run; a second run fails at once
             with an error naming the holder's PID. A multi-rank run takes it on rank 0 only.
    create   output_dir and its marker, once every setting is validated and every input opened.
    atomic   the whole output built in a temporary sibling, marked, then swapped in when complete.

The marker records the command that made the directory: ``{"format": "salatrain.output/1", "command": ...}``.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob as globmod
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

from . import interrupt
from .errors import UserError

MARKER = ".salatrain.json"
FORMAT = "salatrain.output/1"
Inputs = dict  # input key (e.g. "model.path") -> a path, a list of paths, or None


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _input_paths(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None]
    return [str(value)]


def _where(entry: str) -> list[Path]:
    """The local files or folders an input names: a glob's matches, or the folder it searches when it descends
    (``**``: an output inside it could be matched later); nothing for what is not on disk."""
    if entry.startswith("builtin:"):
        return []
    if any(ch in entry for ch in "*?["):
        if "**" in entry:
            fixed = entry[: min(entry.index(ch) for ch in "*?[" if ch in entry)]
            entry = os.path.dirname(fixed) or "."
        else:
            return [_real(m) for m in globmod.glob(os.path.expanduser(entry))]
    path = _real(entry)
    return [path] if path.exists() else []


def check_not_input(out: str | os.PathLike, inputs: Inputs) -> None:
    """output_dir may not be an input, lie inside one, or contain one (the input would be overwritten)."""
    o = _real(out)
    for key, value in inputs.items():
        for entry, p in ((e, p) for e in _input_paths(value) for p in _where(e)):
            if p == o:
                how = "is"
            elif p in o.parents:
                how = "is inside"
            elif o in p.parents:
                how = "contains"
            else:
                continue
            raise UserError(f"output_dir {out} {how} the input {key}={entry}; salatrain never writes into its "
                            "inputs: choose another output_dir")


def _check_writable(path: Path, given: str) -> None:
    """Fail before any work when output_dir (or the nearest folder that exists above it) cannot be written: a
    file that deletes itself is created there and gone at once."""
    where = path if path.is_dir() else next((q for q in path.parents if q.is_dir()), None)
    if where is None:
        return
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise UserError(f"output_dir {given} cannot be written ({e.strerror} in {where}); choose another "
                        "output_dir or fix its permissions") from None


def read_marker(directory: Path) -> dict | None:
    """The marker of a salatrain output directory, or None when there is none."""
    f = Path(directory) / MARKER
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("command"), str):
        raise UserError(f"{f} is not a salatrain marker (corrupt); delete it if {directory} is yours to reuse")
    return data


def write_marker(directory: Path, command: str) -> None:
    import salatrain

    data = {"format": FORMAT, "command": command, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "salatrain": salatrain.__version__}
    write_text_atomic(Path(directory) / MARKER, json.dumps(data, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder, renamed into place (a reader never sees half)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        interrupt.check()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputDir:
    """The output directory of one command run (see the module docstring for the rules)."""

    def __init__(self, path: str | os.PathLike | None, command: str, *, overwrite: bool = False,
                 reuse: bool = False):
        if not path:
            raise UserError("missing output_dir=<dir>")
        self.given = str(path)
        self.path = Path(path).expanduser().absolute()
        self.command, self.overwrite, self.reuse = command, overwrite, reuse
        self._fd: int | None = None
        self._made: list[Path] = []

    # ------------------------------------------------------------------------------------------------ checks

    def check(self, inputs: Inputs) -> None:
        """Refuse an output_dir that overlaps an input, or holds something this command may not replace."""
        check_not_input(self.path, inputs)
        p = self.path
        if p.exists() and not p.is_dir():
            raise UserError(f"output_dir {self.given} exists and is not a directory")
        _check_writable(p, self.given)
        if not p.is_dir() or not any(n != MARKER for n in os.listdir(p)):
            return
        marker = read_marker(p)
        if self.reuse and marker is not None and marker["command"] == self.command:
            return
        if self.overwrite:
            return
        if marker is None:
            raise UserError(f"output_dir {self.given} already exists, is not empty and was not written by salatrain; "
                            "choose another or pass overwrite=true")
        raise UserError(f"output_dir {self.given} already exists and is not empty (it holds the output of "
                        f"`salatrain {marker['command']}`); choose another or pass overwrite=true")

    # ------------------------------------------------------------------------------------------------ lock

    @property
    def lock_path(self) -> Path:
        return self.path.parent / f".{self.path.name}.lock"

    def lock(self) -> None:
        """Hold the run's lock, or fail at once naming the process that holds it."""
        self._made = _make_parents(self.path.parent)
        path = self.lock_path
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot create the lock file {path} ({e.strerror}); the folder that holds "
                                "output_dir must be writable") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise UserError(f"output_dir {self.given} is in use by another salatrain run ({holder}); wait for "
                                "it to finish or choose another output_dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and removed it meanwhile: lock the file now at that path
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd

    def holder(self) -> str:
        """Who holds the lock, as text (for ranks that did not try to take it)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            return "unknown process"
        try:
            return _holder(fd)
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.lock_path)
        os.close(self._fd)
        self._fd = None
        for d in reversed(self._made):  # folders made only to hold the lock, if nothing else went there
            with contextlib.suppress(OSError):
                d.rmdir()
        self._made = []

    def __enter__(self) -> "OutputDir":
        self.lock()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------------------------------------ writing

    def create(self) -> Path:
        """Make output_dir (and parents) with this command's marker; returns the path. With overwrite=true a
        folder holding anything but this command's own resumable run is emptied first (overwrite replaces)."""
        if self.overwrite and self.path.is_dir() and any(n != MARKER for n in os.listdir(self.path)):
            marker = read_marker(self.path) if (self.path / MARKER).is_file() else None
            if not (self.reuse and marker is not None and marker["command"] == self.command):
                with interrupt.deferred():
                    empty = tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent)
                    os.chmod(empty, 0o777 & ~_umask())
                    _swap_in(empty, self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._made = [d for d in self._made if d != self.path and d not in self.path.parents]
        marker = read_marker(self.path) if (self.path / MARKER).is_file() else None
        if marker is None or marker["command"] != self.command:
            write_marker(self.path, self.command)
        return self.path

    @contextlib.contextmanager
    def atomic(self) -> Iterator[Path]:
        """Yields a temporary sibling directory that replaces output_dir only when the block completes: on
        any error or interrupt nothing is left behind and an existing output_dir is untouched."""
        out = self.path
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())
            yield tmp
            write_marker(tmp, self.command)
            interrupt.check()
            with interrupt.deferred():
                _swap_in(tmp, out)
                interrupt.committed(out)
        finally:
            with interrupt.deferred():
                shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: str | Path, out: Path) -> None:
    """Put folder ``new`` at ``out``, replacing what is there (renamed aside, then deleted)."""
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, backup)
        os.replace(new, out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(new, out)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "unknown process"
    return f"PID {info['pid']} on {info.get('host', '?')}, salatrain {info.get('command', '?')}"


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first)."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        p = p.parent
    missing.reverse()
    for d in missing:
        try:
            d.mkdir()
        except FileExistsError:
            pass
        except OSError as e:
            raise UserError(f"cannot create {d} ({e.strerror})") from None
    return missing
