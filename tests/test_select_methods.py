"""Scoring and choosing layers from given metrics: the HALO formula, its clip at 50, ties, forced layers,
exclusions and the rounding of n = floor(ratio·L + ½)."""

import pytest

from salatrain.errors import UserError
from salatrain.models.plan import uniform_layers
from salatrain.select.methods import Constraints, layer_scores, select_layers

FREE = Constraints(keep_first=False, keep_last=False)


def test_halo_formula():
    r = [0.9, 0.5, 0.8, 0.9]
    c = [0.3, 0.2, 0.1, 0.4]
    s = layer_scores("halo", r, c, 4)
    assert s == pytest.approx([0.0 / 0.1, 0.4 / 0.2, 0.1 / 0.3, 0.0 / (0.0 + 1e-10)])


def test_halo_clip_at_50_and_tie_by_retrieval_drop():
    # layers 1 and 2 lose no commonsense at all: both scores clip to 50; layer 2 loses more retrieval
    r = [1.0, 0.7, 0.4, 0.95, 0.9]
    c = [0.5, 0.6, 0.6, 0.1, 0.55]
    s = layer_scores("halo", r, c, 5)
    assert s[1] == s[2] == 50.0
    assert s[4] == pytest.approx(0.1 / 0.05)  # (1.0 − 0.9) / (0.6 − 0.55)
    sel = select_layers(5, "halo", 0.2, FREE, r, c)  # n = floor(1.0 + 0.5) = 1
    assert sel.kept == [2]
    sel = select_layers(5, "halo", 0.4, FREE, r, c)
    assert sel.kept == [1, 2]


def test_full_ties_go_to_the_lower_index():
    r = [0.5, 0.2, 0.2, 0.2, 0.5]
    c = [0.4, 0.3, 0.3, 0.3, 0.4]
    for method in ("halo", "retrieval"):
        assert select_layers(5, method, 0.4, FREE, r, c).kept == [1, 2]


def test_retrieval_method_ignores_commonsense():
    r = [0.9, 0.1, 0.5, 0.8]
    c = [1.0, 0.0, 1.0, 1.0]  # linearising layer 1 also costs the most commonsense: halo would not keep it first
    assert select_layers(4, "retrieval", 0.25, FREE, r, c).kept == [1]
    assert select_layers(4, "halo", 0.25, FREE, r, c).kept != [1]  # c matters to halo, not to retrieval
    assert layer_scores("retrieval", r, c, 4) == layer_scores("retrieval", r, None, 4)
    assert layer_scores("retrieval", r, c, 4) == pytest.approx([0.0, 0.8, 0.4, 0.1])


@pytest.mark.parametrize("num_layers, ratio, n", [
    (30, 0.25, 8), (32, 0.25, 8), (10, 0.25, 3), (6, 0.25, 2), (4, 0.25, 1), (2, 0.25, 1), (7, 0.5, 4),
    (12, 0.125, 2), (3, 1.0, 3),
])
def test_rounding_of_n(num_layers, ratio, n):
    r = [float(i) for i in range(num_layers)]
    sel = select_layers(num_layers, "retrieval", ratio, FREE, r, None)
    assert sel.num_kept == n and len(sel.kept) == n
    assert sel.kept == list(range(n))  # lowest R = largest drops


def test_forced_layers_count_towards_n():
    r = [0.1, 0.9, 0.2, 0.3, 0.9, 0.9, 0.9, 0.0]
    c = [0.5] * 8
    sel = select_layers(8, "halo", 0.5, Constraints(keep_first=True, keep_last=True), r, c)
    assert sel.num_kept == 4
    assert sel.kept == [0, 2, 3, 7]
    assert sel.forced == {0: "keep_first", 7: "keep_last"}
    sel = select_layers(8, "halo", 0.5, Constraints(keep_first=False, keep_last=True, include=[5]), r, c)
    assert sel.kept == [0, 2, 5, 7]
    assert sel.forced == {5: "include", 7: "keep_last"}
    sel = select_layers(8, "halo", 0.5, Constraints(keep_first=False, keep_last=False, exclude=[0, 2]), r, c)
    assert sel.kept == [1, 3, 4, 7]  # 7 and 3 clip at 50; the rest tie at 0 → the lower indices 1 and 4


def test_spread_keeps_the_best_layer_of_each_segment():
    """12 layers, n = 4: segments [0-2] [3-5] [6-8] [9-11]. The retrieval drops are large in 3-8 only: without
    spread the four largest win (all in 3-8); with it each segment keeps its best, the drop-less ones by index."""
    r = [0.9, 0.9, 0.9, 0.2, 0.1, 0.3, 0.05, 0.15, 0.25, 0.9, 0.9, 0.9]  # drops .7 .8 .6 / .85 .75 .65 in 3-8
    c = [0.5] * 12
    assert select_layers(12, "retrieval", 1 / 3, Constraints(False, False), r, c).kept == [3, 4, 6, 7]
    assert select_layers(12, "retrieval", 1 / 3, Constraints(False, False, spread=True), r, c).kept == [0, 4, 6, 9]
    forced = select_layers(12, "halo", 1 / 3, Constraints(spread=True), r, c)
    assert forced.kept == [0, 4, 6, 11] and forced.forced == {0: "keep_first", 11: "keep_last"}


def test_spread_fills_places_when_forced_layers_share_a_segment_or_exclude_empties_one():
    r = [float(i % 5) for i in range(12)]  # retrieval drops 4 3 2 1 0 4 3 2 1 0 4 3
    c = [0.5] * 12
    # include 1 shares segment [0-2] with layer 0, so two segments are free for one place: the better one's best, 5
    sel = select_layers(12, "retrieval", 1 / 3, Constraints(include=[1], spread=True), r, c)
    assert sel.kept == [0, 1, 5, 11]
    # exclude empties segment [3-5]: segment [6-8] keeps 6, and the last place goes to the best layer left, 10
    assert select_layers(12, "retrieval", 1 / 3, Constraints(exclude=[3, 4, 5]), r, c).kept == [0, 1, 10, 11]
    spread = Constraints(exclude=[3, 4, 5], spread=True)
    assert select_layers(12, "retrieval", 1 / 3, spread, r, c).kept == [0, 6, 10, 11]


@pytest.mark.parametrize("method", ["uniform", "stepwise"])
def test_spread_is_refused_where_it_means_nothing(method):
    with pytest.raises(UserError, match="spread"):
        select_layers(8, method, 0.5, Constraints(spread=True), [0.1] * 8, [0.1] * 8)


def test_mixer_types_follow_the_kept_layers():
    sel = select_layers(4, "retrieval", 0.5, FREE, [0.0, 1.0, 0.0, 1.0], None)
    assert sel.mixer_types(4) == ["sparse_attention", "linear_attention", "sparse_attention", "linear_attention"]


def test_uniform_and_random():
    sel = select_layers(30, "uniform", 0.25, Constraints())
    assert sel.kept == uniform_layers(30, 0.25) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert sel.scores == [None] * 30
    a = select_layers(30, "random", 0.25, Constraints(), seed=1)
    b = select_layers(30, "random", 0.25, Constraints(), seed=1)
    c = select_layers(30, "random", 0.25, Constraints(), seed=2)
    assert a.kept == b.kept and a.kept != c.kept
    assert 0 in a.kept and 29 in a.kept and len(a.kept) == 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="halo", ratio=0.25, constraints=Constraints()), "forced"),  # n = 1, two forced
    (dict(method="halo", ratio=0.0, constraints=FREE), "ratio"),
    (dict(method="halo", ratio=1.5, constraints=FREE), "ratio"),
    (dict(method="best", ratio=0.5, constraints=FREE), "method"),
    (dict(method="halo", ratio=0.5, constraints=Constraints(include=[4])), "out of range"),
    (dict(method="halo", ratio=0.5, constraints=Constraints(exclude=[0])), "exclude"),
    (dict(method="halo", ratio=0.5, constraints=Constraints(False, False, exclude=[0, 1, 2])), "left to choose"),
    (dict(method="uniform", ratio=0.5, constraints=Constraints(include=[1])), "uniform"),
])
def test_bad_constraints(kwargs, message):
    with pytest.raises(UserError, match=message):
        select_layers(4, retrieval=[0.1, 0.2, 0.3, 0.4], commonsense=[0.1] * 4, **kwargs)


def test_metric_methods_need_metrics():
    with pytest.raises(UserError, match="metrics"):
        select_layers(4, "halo", 0.5, FREE)
