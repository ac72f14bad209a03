"""The default defence's math at its edges (strategies.robust.norm_screen, centered_clip): the
cases mutation testing found unpinned (docs/development.md, "Mutation testing") -- a factor of
exactly 1, a zero bound met by a zero norm, the exact refusal messages."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from strategies.robust import NormBound, center_scales, clip_scale, lower_median, norm_bound
from strategies.robust.defences import CenteredClip
from strategies.robust.registry import RobustSettings

# --- norm screen: the factor's lower limit is 1 itself


@pytest.mark.parametrize("factor", [1.0, 1.5])
def test_a_factor_of_one_or_just_above_is_accepted(factor: float) -> None:
    # factor 1: the bound is the reference itself (the strictest screen allowed)
    bound = norm_bound([2.0, 3.0, 4.0], [], factor)
    assert bound == NormBound(reference=3.0, bound=factor * 3.0, pool=3)


@pytest.mark.parametrize("factor", [0.999, 0.0, -1.0, math.inf, math.nan])
def test_a_factor_below_one_or_not_finite_is_refused(factor: float) -> None:
    with pytest.raises(ValueError, match=r"^factor must be a finite number >= 1, got "):
        norm_bound([2.0, 3.0], [], factor)


def test_refusal_messages_are_exact() -> None:
    with pytest.raises(ValueError, match=r"^lower_median of no values$"):
        lower_median([])
    for bad in ([1.0, math.inf], [1.0, -0.5], [math.nan, 1.0]):
        with pytest.raises(ValueError, match=r"^norms must be finite and >= 0$"):
            norm_bound(bad, [], 10.0)
    with pytest.raises(ValueError, match=r"^norms must be finite and >= 0$"):
        norm_bound([1.0], [2.0, -1.0], 10.0)  # the history is checked too


# --- clip_scale at the bound: a norm equal to the bound is left alone, a zero bound included


def test_a_norm_at_the_bound_keeps_scale_one() -> None:
    assert clip_scale(10.0, 10.0) == 1.0
    # a zero norm against a zero bound: already within it, so 1 (no 0 / 0)
    assert clip_scale(0.0, 0.0) == 1.0
    assert clip_scale(1e-300, 0.0) == 0.0


def test_centered_clip_when_most_deltas_agree_exactly() -> None:
    # two of three distances are 0, so tau = 2 x 0 = 0: the agreeing ones stay (scale 1), the
    # third is pulled onto the center (scale 0)
    assert center_scales([0.0, 0.0, 5.0], 2.0) == [1.0, 1.0, 0.0]
    assert center_scales([0.0, 0.0], 2.0) == [1.0, 1.0]


class _Stacked:
    """A round's deltas for a stage, one key."""

    def __init__(self, rows: list[list[float]]) -> None:
        self._stack = torch.tensor(rows, dtype=torch.float32)

    @property
    def count(self) -> int:
        return int(self._stack.shape[0])

    @property
    def keys(self) -> tuple[str, ...]:
        return ("w",)

    def stacks(self, key: str) -> Iterator[torch.Tensor]:
        assert key == "w"
        yield self._stack


def test_centered_clip_stage_pulls_the_lone_outlier_onto_the_agreeing_majority() -> None:
    # three replies, two identical: the center is their delta, their distances are 0, tau is 0;
    # the outlier gets scale 0 toward that center and the two are left as they are
    stage = CenteredClip()
    agreed = [1.0, -2.0]
    rewrites = stage.rewrite(
        _Stacked([agreed, [50.0, 40.0], agreed]), RobustSettings("centered-clip")
    )
    first, outlier, third = rewrites.per_reply
    assert first is None and third is None
    assert outlier is not None and outlier.scale == 0.0 and outlier.center is not None
    torch.testing.assert_close(outlier.center["w"], torch.tensor(agreed))
    assert rewrites.clamped_fraction == pytest.approx(1 / 3)
