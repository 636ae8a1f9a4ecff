"""Which layers stay attention: per-layer scores and the constrained top-n choice (DESIGN §1 step 2).

Both metrics are higher-is-better and measured with only layer i linearised:
    halo       s_i = min(50, (max_j R_j − R_i) / (max_j C_j − C_i + 1e-10))   — keep the highest
    retrieval  s_i = max_j R_j − R_i                                           — keep the largest drops
    stepwise   layers kept one at a time, each measured with the kept ones attention and the rest linear
               (salatrain.select.stepwise: the selection happens during its sweep; s_i = its gain in R)
    random     s_i ~ U[0, 1) from ``seed``
    uniform    n layers at round(linspace(0, L−1, n)) (``salatrain.models.plan.uniform_layers``); no scores
n = floor(ratio·L + ½) layers are kept in all. Forced layers (first, last, ``include``) count towards n; the rest
are the best-scored layers not ``exclude``d, ties broken by the larger retrieval drop, then the lower index.
``spread`` (halo, retrieval, random) spreads them over the depth: the L layers split into n contiguous segments
(boundaries round(i·L/n)); each segment without a forced layer keeps its best-scored layer (segments in the order
of those layers' ranks while fewer than n are kept), and any place left goes to the best-scored remaining layers.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from ..errors import UserError
from ..models.plan import num_kept, uniform_layers

log = logging.getLogger(__name__)
METHODS = ("halo", "stepwise", "retrieval", "uniform", "random")
SCORE_CLIP = 50.0
EPS = 1e-10


@dataclass
class Constraints:
    keep_first: bool = True
    keep_last: bool = True
    include: list[int] = field(default_factory=list)
    exclude: list[int] = field(default_factory=list)
    spread: bool = False  # at most one chosen layer per n-th of the depth (module docstring)


@dataclass
class Selection:
    kept: list[int]  # sorted layer indices that stay (sparse) attention
    scores: list[float | None]  # per layer; None for method=uniform
    forced: dict[int, str]  # layer -> why it was forced (keep_first, keep_last, include)
    num_kept: int

    def mixer_types(self, num_layers: int) -> list[str]:
        keep = set(self.kept)
        return ["sparse_attention" if i in keep else "linear_attention" for i in range(num_layers)]


def drops(values: list[float]) -> list[float]:
    """max_j v_j − v_i per layer (how much linearising layer i costs)."""
    top = max(values)
    return [top - v for v in values]


def layer_scores(method: str, retrieval: list[float] | None, commonsense: list[float] | None, num_layers: int,
                 seed: int = 0) -> list[float] | None:
    if method == "halo":
        r, c = drops(_need(retrieval, "retrieval", method)), drops(_need(commonsense, "commonsense", method))
        return [min(SCORE_CLIP, dr / (dc + EPS)) for dr, dc in zip(r, c)]
    if method == "retrieval":
        return drops(_need(retrieval, "retrieval", method))
    if method == "random":
        rng = random.Random(seed)
        return [rng.random() for _ in range(num_layers)]
    if method == "uniform":
        return None
    if method == "stepwise":
        raise UserError("method=stepwise chooses layers while it sweeps (salatrain.select.stepwise); it has no "
                        "scores to re-rank from a metrics file")
    raise UserError(f"method must be one of {', '.join(METHODS)} (got {method!r})")


def _need(values, name, method):
    if values is None:
        raise UserError(f"method={method} needs per-layer {name} scores: pass aligned=<align output> (sweep) or "
                        "metrics=<metrics.json>")
    return values


def forced_layers(num_layers: int, c: Constraints) -> dict[int, str]:
    """Layers that must stay attention, with the reason; checks the constraints against each other."""
    for name, idx in (("include", c.include), ("exclude", c.exclude)):
        bad = [i for i in idx if not 0 <= i < num_layers]
        if bad:
            raise UserError(f"{name} has layer indices {bad} out of range for a {num_layers}-layer model "
                            f"(0..{num_layers - 1})")
    forced: dict[int, str] = {}
    if c.keep_first:
        forced[0] = "keep_first"
    if c.keep_last:
        forced.setdefault(num_layers - 1, "keep_last")
    for i in c.include:
        forced.setdefault(i, "include")
    clash = sorted(set(forced) & set(c.exclude))
    if clash:
        why = ", ".join(f"{i} ({forced[i]})" for i in clash)
        raise UserError(f"layers {why} are both forced and in exclude")
    return forced


def check_constraints(num_layers: int, method: str, ratio: float, c: Constraints) -> tuple[int, dict[int, str]]:
    """(n, forced layers) after checking method, ratio and constraints; raises UserError."""
    if method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)} (got {method!r})")
    try:
        n = num_kept(num_layers, ratio)
    except ValueError as e:
        raise UserError(str(e)) from None
    if c.spread and method in ("uniform", "stepwise"):
        raise UserError(f"spread=true spreads the best-scored layers over the depth; method={method} "
                        + ("is already evenly spaced" if method == "uniform" else "chooses while it sweeps")
                        + " (use method=halo, retrieval or random with spread)")
    if method == "uniform":
        if c.include or c.exclude:
            raise UserError("method=uniform spaces layers evenly and takes no include/exclude "
                            "(use method=halo, retrieval or random with constraints)")
        return n, {}
    forced = forced_layers(num_layers, c)
    if len(forced) > n:
        raise UserError(f"ratio={ratio} keeps n={n} of {num_layers} layers but {len(forced)} are forced "
                        f"({sorted(forced)}); raise ratio or drop keep_first/keep_last/include")
    free = num_layers - len(forced) - len(set(c.exclude))
    if free < n - len(forced):
        raise UserError(f"only {free} layers are left to choose from after exclude, {n - len(forced)} needed")
    return n, forced


def select_layers(num_layers: int, method: str, ratio: float, constraints: Constraints,
                  retrieval: list[float] | None = None, commonsense: list[float] | None = None,
                  seed: int = 0) -> Selection:
    n, forced = check_constraints(num_layers, method, ratio, constraints)
    for name, values in (("retrieval", retrieval), ("commonsense", commonsense)):
        if values is not None and len(values) != num_layers:
            raise UserError(f"{name} has {len(values)} values for a {num_layers}-layer model")
    scores = layer_scores(method, retrieval, commonsense, num_layers, seed)
    if method == "uniform":
        return _uniform(num_layers, ratio, n, constraints)
    r_drop = drops(retrieval) if retrieval is not None else [0.0] * num_layers
    candidates = [i for i in range(num_layers) if i not in forced and i not in set(constraints.exclude)]
    candidates.sort(key=lambda i: (-scores[i], -r_drop[i], i))
    chosen = spread_choice(num_layers, n, forced, candidates) if constraints.spread else candidates[: n - len(forced)]
    return Selection(sorted([*forced, *chosen]), scores, dict(sorted(forced.items())), n)


def spread_choice(num_layers: int, n: int, forced, ranked: list[int]) -> list[int]:
    """The n − |forced| layers of ``ranked`` (best first) that ``spread`` keeps: the best of each of the n depth
    segments holding no forced layer, then the best of the rest while places are left."""
    bounds = [round(i * num_layers / n) for i in range(n + 1)]
    segment = {i: s for s in range(n) for i in range(bounds[s], bounds[s + 1])}
    taken = {segment[i] for i in forced}
    chosen: list[int] = []
    for i in ranked:  # best first: a segment's first appearance is its best layer
        if len(chosen) == n - len(forced):
            return chosen
        if segment[i] not in taken:
            taken.add(segment[i])
            chosen.append(i)
    rest = [i for i in ranked if i not in chosen]
    return chosen + rest[: n - len(forced) - len(chosen)]


def _uniform(num_layers: int, ratio: float, n: int, c: Constraints) -> Selection:
    kept = uniform_layers(num_layers, ratio)
    if not (c.keep_first and c.keep_last) and n >= 2:
        log.warning("method=uniform always keeps the first and the last layer; keep_first/keep_last=false ignored")
    return Selection(kept, [None] * num_layers, {}, n)
