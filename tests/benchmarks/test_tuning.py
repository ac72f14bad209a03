"""Grid tuning with edge extension (benchmarks.tuning) on score functions with known optima."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest

from benchmarks.tuning import Axis, edge, extended, tune, tune_by_axis


def peaked(**optimum: float) -> tuple[list[dict[str, float]], object]:
    """A score with its maximum at ``optimum`` (log distance), and a log of the points asked."""
    asked: list[dict[str, float]] = []

    def score(point: Mapping[str, float]) -> float:
        asked.append(dict(point))
        return -sum(abs(math.log(point[k] / v)) for k, v in optimum.items())

    return asked, score


def test_edge_and_extension() -> None:
    axis = Axis("server_lr", (1.0, 2.0, 4.0))
    assert edge([1.0, 2.0, 4.0], 1.0) == "low"
    assert edge([1.0, 2.0, 4.0], 4.0) == "high"
    assert edge([1.0, 2.0, 4.0], 2.0) is None
    assert extended(axis, [1.0, 2.0, 4.0], "high") == [1.0, 2.0, 4.0, 8.0]
    assert extended(axis, [1.0, 2.0, 4.0], "low") == [0.5, 1.0, 2.0, 4.0]
    capped = Axis("server_lr", (1.0, 2.0), maximum=3.0)
    assert extended(capped, [1.0, 2.0], "high") is None


def test_interior_optimum_needs_no_extension() -> None:
    asked, score = peaked(server_lr=2.0)
    record = tune(score, [Axis("server_lr", (1.0, 2.0, 4.0))])  # type: ignore[arg-type]
    assert record.chosen == {"server_lr": 2.0}
    assert record.evaluations == 3 == len(asked)
    assert record.cap_hit == {} and record.extensions == {"server_lr": 0}


def test_edge_optimum_grows_the_grid_until_interior() -> None:
    asked, score = peaked(server_lr=16.0)
    record = tune(score, [Axis("server_lr", (1.0, 2.0, 4.0))], max_extensions=5)  # type: ignore[arg-type]
    assert record.chosen == {"server_lr": 16.0}
    assert record.grids["server_lr"] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert record.extensions == {"server_lr": 3}
    assert record.cap_hit == {}
    assert len(asked) == len({tuple(p.values()) for p in asked})  # no point scored twice


def test_cap_is_recorded_when_the_optimum_stays_on_the_edge() -> None:
    _, score = peaked(server_lr=0.01)
    record = tune(score, [Axis("server_lr", (1.0, 2.0, 4.0))], max_extensions=2)  # type: ignore[arg-type]
    assert record.chosen == {"server_lr": 0.25}
    assert record.cap_hit == {"server_lr": "low"}
    assert record.to_json()["evaluations"] == 5


def test_two_axes_extend_independently() -> None:
    _, score = peaked(server_lr=8.0, fuse_weight=1.0)
    record = tune(
        score,  # type: ignore[arg-type]
        [Axis("server_lr", (1.0, 2.0, 4.0)), Axis("fuse_weight", (1.0, 2.0, 4.0))],
    )
    assert record.chosen == {"server_lr": 8.0, "fuse_weight": 1.0}
    assert record.grids == {
        "server_lr": [1.0, 2.0, 4.0, 8.0, 16.0],
        "fuse_weight": [0.5, 1.0, 2.0, 4.0],
    }
    # every point of the final product grid was scored
    assert record.evaluations == 5 * 4


def test_flat_scores_choose_the_centre() -> None:
    record = tune(lambda _: 0.5, [Axis("server_lr", (1.0, 2.0, 4.0))])
    assert record.chosen == {"server_lr": 2.0}
    assert record.evaluations == 3


def test_bad_axes_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        Axis("x", (1.0,))
    with pytest.raises(ValueError, match="ascending"):
        Axis("x", (2.0, 1.0))
    with pytest.raises(ValueError, match="ratio"):
        Axis("x", (1.0, 2.0), ratio=1.0)
    with pytest.raises(ValueError):
        tune(lambda _: 0.0, [])


def test_tune_by_axis_on_a_product_surface_by_hand() -> None:
    """Server lr and fuse weight multiply one update: the best product is 16."""
    calls: list[dict[str, float]] = []

    def score(point: Mapping[str, float]) -> float:
        calls.append(dict(point))
        return -((math.log2(point["lr"] * point["fuse"]) - 4.0) ** 2)

    axes = [Axis("lr", (1.0, 2.0, 4.0)), Axis("fuse", (1.0, 2.0, 4.0))]
    record = tune_by_axis(score, axes, {"lr": 1.0, "fuse": 2.0}, max_extensions=3)
    # lr at fuse 2: 1, 2, 4 (edge) -> 8 (edge) -> 16 (worse): 8; fuse at lr 8: 1, 2, 4 -> 2.
    assert record.chosen == {"lr": 8.0, "fuse": 2.0}
    assert record.grids == {"lr": [1.0, 2.0, 4.0, 8.0, 16.0], "fuse": [1.0, 2.0, 4.0]}
    assert record.extensions == {"lr": 2, "fuse": 0} and record.cap_hit == {}
    assert record.best_score == 0.0
    # each point scored once; the second sweep found nothing new to score
    assert record.evaluations == len(calls) == 7
    assert len({tuple(sorted(c.items())) for c in calls}) == 7


def test_tune_by_axis_agrees_with_the_full_grid_on_a_separable_surface() -> None:
    def score(point: Mapping[str, float]) -> float:
        return -abs(math.log2(point["a"]) - 1.0) - abs(math.log2(point["b"]) + 2.0)

    axes = [Axis("a", (1.0, 2.0, 4.0)), Axis("b", (0.5, 1.0, 2.0))]
    by_axis = tune_by_axis(score, axes, {"a": 1.0, "b": 1.0})
    full = tune(score, axes)
    assert by_axis.chosen == full.chosen == {"a": 2.0, "b": 0.25}
    assert by_axis.evaluations < full.evaluations


def test_tune_by_axis_records_a_cap_and_refuses_bad_input() -> None:
    axes = [Axis("lr", (1.0, 2.0))]
    record = tune_by_axis(lambda p: p["lr"], axes, {"lr": 1.0}, max_extensions=1)
    assert record.chosen == {"lr": 4.0} and record.cap_hit == {"lr": "high"}
    with pytest.raises(ValueError, match="no value for"):
        tune_by_axis(lambda p: 0.0, axes, {})
    with pytest.raises(ValueError, match="passes"):
        tune_by_axis(lambda p: 0.0, axes, {"lr": 1.0}, passes=0)
