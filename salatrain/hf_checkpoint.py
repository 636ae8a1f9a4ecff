"""Reading and writing HF checkpoint directories: validation, tensor streaming, sharded safetensors.

Opening a directory reads every safetensors header and checks it against the file's size, so a truncated or
corrupt weight file is a one-line error before any work. Pickle checkpoints (``*.bin``, ``*.pt``) can run
arbitrary code when loaded, so they are refused unless the caller opts in with ``allow_pickle=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


# config.json keys every supported family reads as sizes (positive integers) or as real numbers
_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings")
_REAL_KEYS = ("rms_norm_eps", "rope_theta", "initializer_range")


def _check_config_types(path: Path, config: dict) -> None:
    """Sizes that are not positive integers and numbers that are not numbers, named before any library reads them
    (transformers would fail deep inside a model's constructor)."""
    for key in _INT_KEYS:
        v = config.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise UserError(f"{path}: {key} must be a positive integer, got {json.dumps(v)}; fix config.json")
    for key in _REAL_KEYS:
        v = config.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise UserError(f"{path}: {key} must be a number, got {json.dumps(v)}; fix config.json")


class CheckpointDir:
    """A validated HF checkpoint directory: its config.json and weight files."""

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False, what: str = "model"):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise UserError(f"{what} directory {self.path} does not exist")
        if not self.path.is_dir():
            raise UserError(f"{what} path {self.path} is not a directory (expected an HF checkpoint directory)")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise UserError(f"{self.path} is not an HF checkpoint: config.json is missing")
        try:
            self.config = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{cfg} is not valid JSON ({e.msg} at line {e.lineno})") from None
        except UnicodeDecodeError:
            raise UserError(f"{cfg} is not a text file (corrupt?)") from None
        if not isinstance(self.config, dict):
            raise UserError(f"{cfg} must hold a JSON object")
        _check_config_types(cfg, self.config)
        self.weight_files = sorted(self.path.glob("*.safetensors"))
        self._headers = {f: read_safetensors_header(f) for f in self.weight_files}
        self.pickle_files = sorted(p for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not self.weight_files:
            if not self.pickle_files:
                raise UserError(f"{self.path} is not an HF checkpoint: no *.safetensors weight files")
            if not allow_pickle:
                raise UserError(
                    f"{self.path} holds only pickle weights ({self.pickle_files[0].name}), which can run code when "
                    "loaded; convert them to safetensors or pass allow_pickle=true if you trust the source"
                )
        self._key_file: dict[str, Path] | None = None

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    def key_files(self) -> dict[str, Path]:
        """Every tensor name mapped to the file that holds it (reads only the safetensors headers)."""
        if self._key_file is None:
            self._key_file = {}
            for f in self.weight_files:
                for k in self._headers[f]:
                    self._key_file[k] = f
            if not self.weight_files:
                for f in self.pickle_files:
                    for k in _load_pickle(f):
                        self._key_file[k] = f
        return self._key_file

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for f in self.weight_files:
            for k, meta in self._headers[f].items():
                out[k] = tuple(meta["shape"])
        if not self.weight_files:
            out = {k: tuple(v.shape) for f in self.pickle_files for k, v in _load_pickle(f).items()}
        return out

    @contextlib.contextmanager
    def reader(self) -> Iterator["TensorReader"]:
        r = TensorReader(self)
        try:
            yield r
        finally:
            r.close()

    def fingerprint(self) -> str:
        """sha256 over config.json, every weight file's header, size and first/last MiB: cheap, and changes
        whenever the weights do in practice."""
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        for f in self.weight_files or self.pickle_files:
            size = f.stat().st_size
            h.update(f.name.encode() + str(size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
        return h.hexdigest()[:16]


class TensorReader:
    """Loads one tensor at a time from a checkpoint, keeping each safetensors file open once."""

    def __init__(self, ckpt: CheckpointDir):
        self.ckpt = ckpt
        self._open: dict[Path, object] = {}
        self._stack = contextlib.ExitStack()

    def get(self, key: str) -> torch.Tensor:
        f = self.ckpt.key_files()[key]
        if f.suffix != ".safetensors":
            return _load_pickle(f)[key]
        try:
            if f not in self._open:
                self._open[f] = self._stack.enter_context(safe_open(str(f), framework="pt"))
            return self._open[f].get_tensor(key)
        except Exception as e:  # safetensors' own error type: the file changed or is corrupt
            if isinstance(e, OSError):
                raise
            raise UserError(f"cannot read {key} from {f} ({str(e).splitlines()[0]}); the file is corrupt: "
                            "re-download or re-export it") from None

    def close(self) -> None:
        self._stack.close()


_PICKLE_CACHE: dict[Path, dict] = {}


def _load_pickle(f: Path) -> dict:
    if f not in _PICKLE_CACHE:
        _PICKLE_CACHE.clear()
        try:
            _PICKLE_CACHE[f] = torch.load(f, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as e:
            raise UserError(f"cannot read {f} ({str(e).splitlines()[0][:200]}); the file is truncated or corrupt: "
                            "re-download or re-export it") from None
    return _PICKLE_CACHE[f]


MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


def read_safetensors_header(f: Path) -> dict:
    """The tensor entries of a safetensors file's header, checked against the file's size: a truncated or
    corrupt file is a UserError."""
    size = f.stat().st_size

    def bad(why: str) -> UserError:
        return UserError(f"{f} is truncated or corrupt ({why}); re-download or re-export it")

    with open(f, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        n = struct.unpack("<Q", raw)[0]
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise bad(f"its header claims {n} bytes, the file has {size}")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    header.pop("__metadata__", None)
    need = 0
    for key, meta in header.items():
        offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] or not isinstance(meta.get("shape"), list)):
            raise bad(f"bad header entry for {key!r}")
        need = max(need, offsets[1])
    if 8 + n + need > size:
        raise bad(f"its tensors need {8 + n + need} bytes, the file has {size}")
    return header


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


class ShardWriter:
    """Writes tensors into ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes`` and the
    index file; a single shard is written as ``model.safetensors``. Holds at most one shard in memory."""

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir = out_dir
        self.max = max_shard_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + nbytes > self.max:
            self._flush()
        self.current[key] = tensor.contiguous()
        self.current_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        idx = len(self.shards)
        save_file(self.current, str(self.out_dir / f".shard-{idx:05d}.safetensors"), metadata={"format": "pt"})
        self.shards.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> list[str]:
        if self.current or not self.shards:
            self._flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.replace(self.out_dir / f".shard-{i:05d}.safetensors", self.out_dir / name)
        if n > 1:
            weight_map = {k: names[i] for i, keys in enumerate(self.shards) for k in keys}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a checkpoint directory, or a one-line error when its files are missing or corrupt."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot load the tokenizer of {path} ({first}); its tokenizer files are missing or "
                        "corrupt") from None


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer files and generation_config.json, as present."""
    copied = []
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
