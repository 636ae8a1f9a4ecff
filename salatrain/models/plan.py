"""Layer plans: which mixer each layer gets. A plan is a list of mixer types, one per layer."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .configuration_sala_hybrid import MIXER_TYPES


def num_kept(num_layers: int, ratio: float) -> int:
    """n = floor(ratio·L + ½) layers stay attention (at least one)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return max(1, math.floor(ratio * num_layers + 0.5))


def uniform_layers(num_layers: int, ratio: float) -> list[int]:
    """n layers evenly spaced: round(linspace(0, L-1, n)), so the first and last are included."""
    n = num_kept(num_layers, ratio)
    if n == 1:
        return [0]
    return sorted({int(math.floor(i * (num_layers - 1) / (n - 1) + 0.5)) for i in range(n)})


def plan_from_sparse_layers(num_layers: int, sparse_layers: list[int], rest: str = "linear_attention") -> list[str]:
    bad = [i for i in sparse_layers if not 0 <= int(i) < num_layers]
    if bad:
        raise ValueError(f"sparse layer indices {bad} out of range for a {num_layers}-layer model (0..{num_layers - 1})")
    if len(set(sparse_layers)) != len(sparse_layers):
        raise ValueError(f"sparse layer indices repeat: {sorted(sparse_layers)}")
    keep = set(int(i) for i in sparse_layers)
    return ["sparse_attention" if i in keep else rest for i in range(num_layers)]


def validate_plan(mixer_types: list[str], num_layers: int, source: str = "plan") -> list[str]:
    if not isinstance(mixer_types, list) or not all(isinstance(m, str) for m in mixer_types):
        raise ValueError(f"{source}: mixer_types must be a list of strings")
    if len(mixer_types) != num_layers:
        raise ValueError(f"{source} has {len(mixer_types)} mixer types for a {num_layers}-layer model")
    bad = sorted({m for m in mixer_types if m not in MIXER_TYPES})
    if bad:
        raise ValueError(f"{source}: unknown mixer type(s) {bad}; expected {list(MIXER_TYPES)}")
    return list(mixer_types)


def plan_from_file(path: str | Path, num_layers: int) -> list[str]:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"plan file {path} is a directory; give the layer_plan.json inside it")
    if not path.is_file():
        raise ValueError(f"plan file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"plan file {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or "mixer_types" not in data:
        raise ValueError(f'plan file {path} must hold {{"mixer_types": [...]}}')
    mixers = validate_plan(data["mixer_types"], num_layers, source=f"plan file {path}")
    listed = data.get("sparse_layers")
    if listed is not None and (not isinstance(listed, list) or not all(isinstance(i, int) for i in listed)
                               or sorted(listed) != [i for i, m in enumerate(mixers) if m == "sparse_attention"]):
        raise ValueError(f"plan file {path}: sparse_layers {listed} disagrees with the sparse layers of its "
                         "mixer_types; fix one of them")
    return mixers
