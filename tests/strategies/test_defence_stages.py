"""The robust stages' own promises (strategies.robust.krum, strategies.robust.defences), checked
directly on a hand-made ``Deltas``: float64 distances without the Gram expansion, multi-Krum's
scoring rule against a plain reference, and the exact answers of MultiKrum.select,
CoordinateClamp.rewrite and CenteredClip.rewrite (docs/development.md, "Mutation testing")."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import strategies.robust  # noqa: F401  (registers the built-in defences)
from strategies.robust.centered_clip import DEFAULT_CENTER_RADIUS, center_scales
from strategies.robust.defences import CenteredClip, MultiKrum
from strategies.robust.krum import multikrum_select, pairwise_squared_distances
from strategies.robust.registry import RobustSettings
from strategies.robust.stage import Rewrite, Rewrites, get_defence, row_pieces

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


class Stacked:
    """A round's deltas as a stage reads them: one float32 stack (count x ...) per key."""

    def __init__(
        self,
        stacks: dict[str, torch.Tensor],
        count: int | None = None,
        piece_rows: int | None = None,
    ) -> None:
        self._stacks = {key: value.to(torch.float32) for key, value in stacks.items()}
        if count is None:
            count = int(next(iter(self._stacks.values())).shape[0])
        self._count = count
        self._piece_rows = piece_rows  # None: each key's stack in one piece

    @property
    def count(self) -> int:
        return self._count

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self._stacks)

    def stacks(self, key: str) -> Iterator[torch.Tensor]:
        stack = self._stacks[key]
        if self._piece_rows is None or stack.dim() < 2:
            yield stack
            return
        yield from stack.split(self._piece_rows, dim=1)


def rows(values: list[list[float]]) -> torch.Tensor:
    """A float32 stack from nested lists."""
    return torch.tensor(values, dtype=torch.float32)


def krum(malicious: int, select: int) -> RobustSettings:
    """Settings of the "krum" defence with f = ``malicious`` and m = ``select``."""
    return RobustSettings("krum", krum_malicious=malicious, krum_select=select)


# --- pairwise_squared_distances


def reference_distances(stack: torch.Tensor) -> torch.Tensor:
    """(a - b)^2 summed over the coordinates, in float64, pair by pair."""
    flat = stack.flatten(start_dim=1).to(torch.float64)
    return ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(dim=2)


def test_distances_are_float64_and_exact_next_to_a_large_common_offset() -> None:
    """30 rows sharing a coordinate of 1e8: float64, matching (a - b)^2 summed (no Gram form)."""
    generator = torch.Generator().manual_seed(3)
    stack = torch.randn(30, 2, 3, generator=generator)
    # more than 25 rows, where torch.cdist would switch to ||x||^2 + ||y||^2 - 2 x.y: with the
    # shared 1e8 the norms are about 1e16 (float64 spacing 2), so the O(1) distances cancel
    stack[:, 0, 0] = 1e8
    distances = pairwise_squared_distances(stack)
    assert distances.dtype == torch.float64
    assert distances.shape == (30, 30)
    torch.testing.assert_close(distances, reference_distances(stack), rtol=1e-12, atol=0.0)


def test_distances_of_a_float32_stack_keep_float64_precision() -> None:
    """The rows are read in float64 before differencing: a float32 distance would round."""
    stack = rows([[16777216.0, 0.0], [16777218.0, 1.0], [0.0, 1.0]])
    distances = pairwise_squared_distances(stack)
    assert distances.dtype == torch.float64
    assert distances[0, 2].item() == 16777216.0**2 + 1.0


@pytest.mark.parametrize("shape", [(0, 3, 4), (0, 5), (0,)])
def test_distances_of_no_rows_are_an_empty_square(shape: tuple[int, ...]) -> None:
    """A stack with no rows gives a 0 x 0 float64 matrix, whatever the rows' shape."""
    distances = pairwise_squared_distances(torch.zeros(shape))
    assert distances.shape == (0, 0)
    assert distances.dtype == torch.float64


def test_distances_of_one_dimensional_rows() -> None:
    """A T-vector is T rows of one coordinate each."""
    distances = pairwise_squared_distances(torch.tensor([1.0, 4.0, -2.0]))
    assert distances.tolist() == [[0.0, 9.0, 9.0], [9.0, 0.0, 36.0], [9.0, 36.0, 0.0]]


# --- multikrum_select


def reference_select(distances: list[list[float]], malicious: int, select: int) -> list[int]:
    """Krum's rule read plainly: score = sum of the max(1, T - f - 2) smallest distances to the
    others; the m lowest (m clamped to [1, T]) kept, ties by position; ascending."""
    count = len(distances)
    if count == 0:
        return []
    closest = max(1, count - malicious - 2)
    scores = []
    for row in range(count):
        others = sorted(distances[row][col] for col in range(count) if col != row)
        scores.append(math.fsum(others[:closest]))
    order = sorted(range(count), key=lambda position: (scores[position], position))
    return sorted(order[: min(max(select, 1), count)])


@SETTINGS
@given(
    points=st.lists(st.lists(st.integers(-6, 6), min_size=2, max_size=2), min_size=0, max_size=8),
    malicious=st.integers(0, 9),
    select=st.integers(0, 10),
)
def test_multikrum_select_matches_the_plain_reference(
    points: list[list[int]], malicious: int, select: int
) -> None:
    """multikrum_select keeps exactly the positions the plain reading of the rule keeps."""
    stack = torch.tensor(points, dtype=torch.float32).reshape(len(points), 2)
    distances = reference_distances(stack)
    expected = reference_select(distances.tolist(), malicious, select)
    assert multikrum_select(distances, malicious, select) == expected


def line_distances(values: list[float]) -> torch.Tensor:
    """Squared distances of points on a line."""
    return reference_distances(torch.tensor(values, dtype=torch.float32).reshape(-1, 1))


def test_krum_scores_one_nearest_when_t_minus_f_minus_2_is_at_most_one() -> None:
    """T = 3, f = 0: each row scores its single nearest distance (1, 1, 4): the tie goes to 0."""
    assert multikrum_select(line_distances([0.0, 1.0, 3.0]), 0, 1) == [0]
    # T = 4, f = 1: one nearest each (4, 1, 1, 1): reply 1; two nearest would pick reply 2
    assert multikrum_select(line_distances([0.0, 2.0, 3.0, 4.0]), 1, 1) == [1]


def test_krum_scores_t_minus_f_minus_2_nearest() -> None:
    """T = 5, f = 0: three nearest distances each (21, 11, 9, 14, 26), not two (5, 2, 5, 5)."""
    assert multikrum_select(line_distances([0.0, 1.0, 2.0, 4.0, 5.0]), 0, 1) == [2]
    assert multikrum_select(line_distances([0.0, 1.0, 2.0, 4.0, 5.0]), 0, 2) == [1, 2]


def test_krum_single_row_and_empty() -> None:
    """T = 1 keeps its row whatever m and f; T = 0 keeps nothing."""
    one = torch.zeros(1, 1, dtype=torch.float64)
    assert multikrum_select(one, 0, 0) == [0]
    assert multikrum_select(one, 5, 3) == [0]
    assert multikrum_select(torch.zeros(0, 0, dtype=torch.float64), 0, 1) == []


def test_krum_refusals_are_exact() -> None:
    """Non-square (also 1-D) distances and a negative f are refused with the exact messages."""
    with pytest.raises(ValueError, match=r"^distances must be square, got \(2, 3\)$"):
        multikrum_select(torch.zeros(2, 3), 0, 1)
    with pytest.raises(ValueError, match=r"^distances must be square, got \(3,\)$"):
        multikrum_select(torch.zeros(3), 0, 1)
    with pytest.raises(ValueError, match=r"^num_malicious must be >= 0, got -1$"):
        multikrum_select(torch.zeros(2, 2), -1, 1)


# --- MultiKrum.select


def test_multikrum_stage_with_no_or_one_reply() -> None:
    """No reply: nothing kept; one reply: it is kept."""
    stage = get_defence("krum")
    assert stage.select(Stacked({"w": torch.zeros(0, 2)}), krum(1, 0)) == []
    assert stage.select(Stacked({"w": rows([[7.0, -1.0]])}), krum(1, 0)) == [0]
    assert stage.select(Stacked({"w": rows([[7.0, -1.0]])}), krum(0, 3)) == [0]


def test_multikrum_stage_with_two_replies_keeps_t_minus_f() -> None:
    """T = 2 with f = 1 keeps exactly one reply (the first: equal scores); f = 0 keeps both."""
    deltas = Stacked({"w": rows([[0.0], [10.0]])})
    assert MultiKrum().select(deltas, krum(1, 0)) == [0]
    assert MultiKrum().select(deltas, krum(0, 0)) == [0, 1]


def test_multikrum_stage_krum_select_zero_one_and_two() -> None:
    """krum_select 0 keeps T - f, 1 keeps one, 2 keeps two (the closest to the others)."""
    deltas = Stacked({"w": rows([[0.0], [1.0], [2.0], [4.0], [5.0], [40.0]])})
    stage = MultiKrum()
    assert stage.select(deltas, krum(1, 0)) == [0, 1, 2, 3, 4]
    assert stage.select(deltas, krum(2, 0)) == [0, 1, 2, 3]
    assert stage.select(deltas, krum(0, 0)) == [0, 1, 2, 3, 4, 5]
    assert stage.select(deltas, krum(1, 1)) == [2]
    assert stage.select(deltas, krum(0, 1)) == [2]
    assert stage.select(deltas, krum(1, 2)) == [1, 2]


def test_multikrum_stage_sums_the_distances_over_every_key() -> None:
    """The first key decides when the second is equal for everyone; both keys add up."""
    first = rows([[0.0], [30.0], [1.0], [2.0]])
    same = torch.zeros(4, 3)
    stage = MultiKrum()
    # first key alone: scores over 4 - 0 - 2 = 2 nearest: row 2 (1 + 1) is the closest
    assert stage.select(Stacked({"a": first, "b": same}), krum(0, 1)) == [2]
    assert stage.select(Stacked({"b": same, "a": first}), krum(0, 1)) == [2]
    # two keys that each alone pick another row: their sum picks row 3
    one = rows([[0.0], [0.0], [10.0], [10.0]])
    two = rows([[0.0], [10.0], [0.0], [0.0]])
    assert stage.select(Stacked({"one": one}), krum(0, 2)) == [0, 1]
    assert stage.select(Stacked({"two": two}), krum(0, 2)) == [0, 2]
    assert stage.select(Stacked({"one": one, "two": two}), krum(0, 2)) == [2, 3]


def test_multikrum_stage_accumulates_in_float64() -> None:
    """A large distance every pair shares (key "big": 2e8) does not drown the small ones.

    "big" puts each reply on its own axis at 1e4: every pair is 2e8 apart. "small" scores
    (two nearest) 0.05, 0.02, 0.05, 49.01: reply 1 is the pick. In float32 (spacing 16 at 2e8)
    2e8 + 0.01 and 2e8 + 0.04 round to 2e8: replies 0-2 tie and position would pick reply 0.
    """
    big = 1e4 * torch.eye(4)
    small = rows([[0.0], [0.1], [0.2], [5.0]])
    deltas = Stacked({"big": big, "small": small})
    assert MultiKrum().select(deltas, krum(0, 1)) == [1]


# --- CoordinateClamp (trimmed-mean, median)


def kth_range(stack: torch.Tensor, trim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (trim + 1)-th smallest and largest of every coordinate, by kthvalue."""
    count = stack.shape[0]
    low = torch.kthvalue(stack, trim + 1, dim=0).values
    high = torch.kthvalue(stack, count - trim, dim=0).values
    return low, high


@pytest.mark.parametrize("name", ["trimmed-mean", "median"])
def test_clamp_with_no_reply(name: str) -> None:
    """No reply (the key still there, empty): no rewrite, fraction 0.0."""
    stage = get_defence(name)
    answer = stage.rewrite(Stacked({"w": torch.zeros(0, 3)}, count=0), RobustSettings(name))
    assert answer == Rewrites((), 0.0)
    assert stage.rewrite(Stacked({}, count=0), RobustSettings(name)) == Rewrites((), 0.0)


@pytest.mark.parametrize(
    ("name", "count"), [("median", 1), ("median", 2), ("trimmed-mean", 1), ("trimmed-mean", 3)]
)
def test_clamp_leaves_everyone_when_nothing_is_trimmed(name: str, count: int) -> None:
    """Trim 0 (median at T <= 2, trim 0.25 at T <= 3): every reply None, fraction exactly 0.0."""
    stack = torch.arange(count * 2, dtype=torch.float32).reshape(count, 2) * 3.0
    answer = get_defence(name).rewrite(Stacked({"w": stack}), RobustSettings(name))
    assert answer == Rewrites((None,) * count, 0.0)
    assert answer.per_reply == (None,) * count
    assert type(answer.clamped_fraction) is float and answer.clamped_fraction == 0.0


def test_trimmed_mean_trims_its_fraction_not_the_median() -> None:
    """T = 5, trim 0.25: one value trimmed per side (the median would trim two)."""
    stack = rows([[1.0, 50.0], [2.0, 40.0], [3.0, 30.0], [4.0, 20.0], [5.0, 10.0]])
    settings_ = RobustSettings("trimmed-mean", trim_fraction=0.25)
    answer = get_defence("trimmed-mean").rewrite(Stacked({"w": stack}), settings_)
    clamp = answer.per_reply[0]
    assert clamp is not None and clamp.low is not None and clamp.high is not None
    assert torch.equal(clamp.low["w"], torch.tensor([2.0, 20.0]))
    assert torch.equal(clamp.high["w"], torch.tensor([4.0, 40.0]))
    assert answer.clamped_fraction == 4 / 10
    # a fraction of 0.4 trims two per side: the median's range
    wider = RobustSettings("trimmed-mean", trim_fraction=0.4)
    clamp = get_defence("trimmed-mean").rewrite(Stacked({"w": stack}), wider).per_reply[0]
    assert clamp is not None and clamp.low is not None
    assert torch.equal(clamp.low["w"], torch.tensor([3.0, 30.0]))


@pytest.mark.parametrize(("name", "trim"), [("trimmed-mean", 1), ("median", 3)])
def test_clamp_bounds_match_an_independent_reading(name: str, trim: int) -> None:
    """low and high: the (trim + 1)-th smallest and largest by kthvalue, the same for all."""
    generator = torch.Generator().manual_seed(11)
    stacks = {
        "a": torch.randn(7, 3, 2, generator=generator),
        "b": torch.randn(7, 5, generator=generator),
    }
    answer = get_defence(name).rewrite(Stacked(stacks), RobustSettings(name))
    assert len(answer.per_reply) == 7
    clamp = answer.per_reply[0]
    assert clamp is not None and clamp.low is not None and clamp.high is not None
    assert all(other is clamp for other in answer.per_reply)
    assert clamp == Rewrite(low=clamp.low, high=clamp.high)
    for key, stack in stacks.items():
        low, high = kth_range(stack, trim)
        assert torch.equal(clamp.low[key], low)
        assert torch.equal(clamp.high[key], high)


def test_clamped_fraction_counts_moved_coordinates_over_every_key() -> None:
    """Key "a" moves 4 of 10 values, key "b" 1 of 5 (ties at the bounds stay): 5 / 15."""
    stacks = {
        "a": rows([[1.0, 50.0], [2.0, 40.0], [3.0, 30.0], [4.0, 20.0], [5.0, 10.0]]),
        "b": rows([[0.0], [1.0], [2.0], [3.0], [3.0]]),
    }
    settings_ = RobustSettings("trimmed-mean", trim_fraction=0.25)
    answer = get_defence("trimmed-mean").rewrite(Stacked(stacks), settings_)
    assert answer.clamped_fraction == 5 / 15
    only_b = get_defence("trimmed-mean").rewrite(Stacked({"b": stacks["b"]}), settings_)
    assert only_b.clamped_fraction == 1 / 5
    median = get_defence("median").rewrite(Stacked({"b": stacks["b"]}), RobustSettings("median"))
    assert median.clamped_fraction == 4 / 5


def test_clamp_with_no_keys_moves_nothing() -> None:
    """Five replies and no keys: a clamp of nothing for each, fraction exactly 0.0."""
    answer = get_defence("median").rewrite(Stacked({}, count=5), RobustSettings("median"))
    assert answer == Rewrites((Rewrite(low={}, high={}),) * 5, 0.0)
    assert answer.clamped_fraction == 0.0


# --- CenteredClip


@pytest.mark.parametrize("count", [0, 1, 2])
def test_centered_clip_leaves_two_or_fewer(count: int) -> None:
    """T <= 2: every reply None, fraction exactly 0.0."""
    stack = torch.arange(count * 3, dtype=torch.float32).reshape(count, 3) ** 2
    answer = CenteredClip().rewrite(Stacked({"w": stack}, count=count), RobustSettings())
    assert answer == Rewrites((None,) * count, 0.0)
    assert answer.per_reply == (None,) * count
    assert type(answer.clamped_fraction) is float and answer.clamped_fraction == 0.0


def test_centered_clip_leaves_two_even_when_the_midpoint_rounds_onto_one() -> None:
    """T = 2 with adjacent float32 values: the midpoint rounds to the first (distances 0 and
    2^-23, tau 0), which would clip the second; T <= 2 is left alone regardless."""
    first = 1.0
    second = 1.0 + 2.0**-23  # the next float32 after 1.0
    stack = rows([[first], [second]])
    assert stack[1, 0].item() != first
    assert ((stack[0] + stack[1]) / 2).item() == first  # 2 + 2^-23 rounds to even: 2.0
    answer = CenteredClip().rewrite(Stacked({"w": stack}), RobustSettings())
    assert answer == Rewrites((None, None), 0.0)


def reference_scales(stacks: dict[str, torch.Tensor]) -> list[float]:
    """Per reply: the float64 distance to the coordinate-wise median (odd T: the middle
    value) over every key, then ``center_scales``."""
    squared = [0.0] * next(iter(stacks.values())).shape[0]
    for stack in stacks.values():
        center = torch.sort(stack, dim=0).values[stack.shape[0] // 2]
        offsets = (stack - center).to(torch.float64).reshape(stack.shape[0], -1)
        for row in range(offsets.shape[0]):
            squared[row] += float((offsets[row] * offsets[row]).sum())
    return center_scales([math.sqrt(value) for value in squared], DEFAULT_CENTER_RADIUS)


def scales_of(answer: Rewrites) -> list[float]:
    """The scale of every reply (1.0 for one left alone)."""
    return [1.0 if rewrite is None else rewrite.scale for rewrite in answer.per_reply]


def test_centered_clip_scales_equal_a_float64_reference_exactly() -> None:
    """Scales from distances accumulated in float64 over both keys, offsets squared in
    float64: equal to the reference to the last bit; the outliers pulled in."""
    generator = torch.Generator().manual_seed(5)
    stacks = {
        "a": torch.randn(5, 4, 3, generator=generator) / 3,
        "b": torch.randn(5, 7, generator=generator) / 7,
    }
    stacks["a"][4] += 3.3
    stacks["b"][1] -= 1.7
    answer = CenteredClip().rewrite(Stacked(stacks), RobustSettings("centered-clip"))
    expected = reference_scales(stacks)
    assert sum(scale < 1.0 for scale in expected) == 2
    assert scales_of(answer) == expected
    assert answer.clamped_fraction == 2 / 5
    for rewrite in answer.per_reply:
        assert rewrite is None or rewrite.center is not None
    pulled = answer.per_reply[4]
    assert pulled is not None and pulled.center is not None
    for key, stack in stacks.items():
        assert torch.equal(pulled.center[key], torch.sort(stack, dim=0).values[2])


def test_centered_clip_counts_every_key() -> None:
    """The first key's outlier is pulled in though the second key is the same for everyone."""
    stacks = {
        "a": rows([[0.0], [1.0], [2.0], [100.0]]),
        "b": torch.full((4, 2), 0.5),
    }
    answer = CenteredClip().rewrite(Stacked(stacks), RobustSettings("centered-clip"))
    # center 1.5; distances 1.5, 0.5, 0.5, 98.5; tau = 2 x 0.5 = 1
    assert scales_of(answer) == [1 / 1.5, 1.0, 1.0, 1 / 98.5]
    assert answer.clamped_fraction == 2 / 4
    assert scales_of(answer) == reference_scales_even(stacks)


def reference_scales_even(stacks: dict[str, torch.Tensor]) -> list[float]:
    """As ``reference_scales`` for an even T: the center is the midpoint of the middle two."""
    count = next(iter(stacks.values())).shape[0]
    squared = [0.0] * count
    for stack in stacks.values():
        ordered = torch.sort(stack, dim=0).values
        center = (ordered[count // 2 - 1] + ordered[count // 2]) / 2
        offsets = (stack - center).to(torch.float64).reshape(count, -1)
        for row in range(count):
            squared[row] += float((offsets[row] * offsets[row]).sum())
    return center_scales([math.sqrt(value) for value in squared], DEFAULT_CENTER_RADIUS)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    count=st.integers(min_value=3, max_value=7),
    rows=st.integers(min_value=1, max_value=6),
    piece_rows=st.integers(min_value=1, max_value=4),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_every_stage_answers_alike_whether_a_key_comes_whole_or_in_pieces(
    count: int, rows: int, piece_rows: int, seed: int
) -> None:
    """The round reads each key in pieces of rows (bounded memory at any T); every defence's
    answer is the whole key's: clamp bounds and the moved share bit for bit, the center bit for
    bit, the picks and the clipping scales (float64 sums regrouped by piece) to rounding."""
    generator = torch.Generator().manual_seed(seed)
    stacks = {
        "m": torch.randn(count, rows, 3, generator=generator),
        "v": torch.randn(count, rows, generator=generator) * 4,
        "s": torch.randn(count, generator=generator),  # a 0-dim key: one piece
    }
    settings_ = RobustSettings("median")
    whole, pieces = Stacked(stacks), Stacked(stacks, piece_rows=piece_rows)
    for name in ("median", "trimmed-mean"):
        stage = get_defence(name)
        left, right = stage.rewrite(whole, settings_), stage.rewrite(pieces, settings_)
        assert left.clamped_fraction == right.clamped_fraction
        for one, other in zip(left.per_reply, right.per_reply, strict=True):
            assert (one is None) == (other is None)
            if one is not None and other is not None:
                assert one.low is not None and other.low is not None
                assert one.high is not None and other.high is not None
                for key in stacks:
                    assert torch.equal(one.low[key], other.low[key])
                    assert torch.equal(one.high[key], other.high[key])
    clip_whole = CenteredClip().rewrite(whole, settings_)
    clip_pieces = CenteredClip().rewrite(pieces, settings_)
    for one, other in zip(clip_whole.per_reply, clip_pieces.per_reply, strict=True):
        assert (one is None) == (other is None) or math.isclose(
            (one or other).scale,
            1.0,
            rel_tol=1e-12,  # type: ignore[union-attr]
        )
        if one is not None and other is not None:
            assert one.scale == pytest.approx(other.scale, rel=1e-12)
            assert one.center is not None and other.center is not None
            for key in stacks:
                assert torch.equal(one.center[key], other.center[key])
    krum = RobustSettings("krum", krum_malicious=1)
    assert MultiKrum().select(whole, krum) == MultiKrum().select(pieces, krum)


def test_row_pieces_bound_a_stack_and_cover_every_row_once() -> None:
    # 10 rows of 4 float32 per reply = 16 bytes a reply a row; 8 replies: 128 bytes a row
    assert row_pieces((10, 4), 8, budget=10 * 128) == [...]
    assert row_pieces((10, 4), 8, budget=3 * 128) == [
        slice(0, 3),
        slice(3, 6),
        slice(6, 9),
        slice(9, 10),
    ]
    assert row_pieces((10, 4), 8, budget=3 * 128 - 1) == [
        slice(0, 2),
        slice(2, 4),
        slice(4, 6),
        slice(6, 8),
        slice(8, 10),
    ]
    assert row_pieces((10, 4), 8, budget=1) == [slice(r, r + 1) for r in range(10)]  # >= one row
    assert row_pieces((), 8, budget=1) == [...]  # a 0-dim key
    assert row_pieces((0, 4), 8, budget=1) == [...]
    assert row_pieces((5,), 1000, budget=4000) == [slice(r, r + 1) for r in range(5)]
