"""Step-size tuning for the quality benchmark: a grid search whose choice must be interior.

What and why
------------
Issue 17: every method in rounds gets its own tuning of server-lr (and fuse-weight where it has
one), scored on the seen tasks' dev splits only, with the same budget per method, and the chosen
value must be interior to its grid. v1's sweeps chose values on the edge of their grids, so a
method's score there said more about the grid than about the method.

``tune`` evaluates every point of the product of the axes' grids (the caller's ``score``: one
short federated run scored on dev, higher is better). When the best point sits on the first or
last value of an axis, that axis grows by one geometric step in that direction (``value / ratio``
or ``value * ratio``) and the new points are scored; this repeats until the best point is
interior on every axis, or an axis has used its ``max_extensions`` (or would pass its bound), in
which case the record says which side hit the cap. Every method gets the same base grids, the
same extension rule and cap, and each evaluation the same rounds, seed and dev data (the caller's
``score``); the record keeps the number of evaluations, so the budgets can be compared.

Ties (common on small dev sets) go to the point nearest the base grid's centre in log scale, so
a flat score surface is not read as a slope toward an edge.

``tune_by_axis`` searches one axis at a time (the others held at their current choice), for
axes that act as one: in RobustMerge, TIES and DARE rounds the fuse weight and the server lr
multiply the same update (measured on this benchmark: equal dev scores, to the last example, at
equal products), so the full product grid spends most of its points on the same step sizes and
pushes both axes to their corners together.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Point = tuple[float, ...]


@dataclass(frozen=True)
class Axis:
    """One tuned hyperparameter: its base grid (ascending, > 0), step ratio and bounds."""

    name: str
    values: tuple[float, ...]
    ratio: float = 2.0
    minimum: float = 0.0
    maximum: float = math.inf

    def __post_init__(self) -> None:
        if len(self.values) < 2:
            raise ValueError(f"axis {self.name!r}: a grid needs at least 2 values")
        if any(v <= 0 for v in self.values) or list(self.values) != sorted(set(self.values)):
            raise ValueError(f"axis {self.name!r}: values must be positive and ascending")
        if not self.ratio > 1:
            raise ValueError(f"axis {self.name!r}: ratio must be > 1; got {self.ratio}")

    @property
    def centre(self) -> float:
        """The geometric centre of the base grid (the tie-break target)."""
        return math.exp(sum(math.log(v) for v in self.values) / len(self.values))


def edge(values: Sequence[float], chosen: float) -> str | None:
    """``"low"`` / ``"high"`` when ``chosen`` is the first / last of ``values``, else None."""
    if chosen == values[0]:
        return "low"
    if chosen == values[-1]:
        return "high"
    return None


def extended(axis: Axis, values: Sequence[float], side: str) -> list[float] | None:
    """``values`` with one more geometric step on ``side``; None if that passes a bound."""
    if side == "low":
        new = values[0] / axis.ratio
        return None if new < axis.minimum else [new, *values]
    new = values[-1] * axis.ratio
    return None if new > axis.maximum else [*values, new]


@dataclass
class TuningRecord:
    """What a tuning did: the final grids, every scored point, the choice and the caps hit."""

    axes: list[str]
    grids: dict[str, list[float]]
    scores: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, float] = field(default_factory=dict)
    best_score: float = math.nan
    extensions: dict[str, int] = field(default_factory=dict)
    cap_hit: dict[str, str] = field(default_factory=dict)

    @property
    def evaluations(self) -> int:
        """How many points were scored (the tuning's budget)."""
        return len(self.scores)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "axes": list(self.axes),
            "grids": {k: list(v) for k, v in self.grids.items()},
            "scores": list(self.scores),
            "chosen": dict(self.chosen),
            "best_score": self.best_score,
            "extensions": dict(self.extensions),
            "cap_hit": dict(self.cap_hit),
            "evaluations": self.evaluations,
        }


def _best(scored: Mapping[Point, float], axes: Sequence[Axis]) -> Point:
    """The highest-scoring point; ties go to the one nearest the base grids' centre (log)."""

    def distance(point: Point) -> float:
        return sum(abs(math.log(v / a.centre)) for v, a in zip(point, axes, strict=True))

    top = max(scored.values())
    return min((p for p, s in scored.items() if s == top), key=lambda p: (distance(p), p))


def tune(
    score: Callable[[Mapping[str, float]], float],
    axes: Sequence[Axis],
    *,
    max_extensions: int = 3,
    log: Callable[[str], None] = lambda _: None,
) -> TuningRecord:
    """Grid search over ``axes`` with edge extension (see the module docstring).

    ``score(point)`` gets ``{axis name: value}`` and returns the dev score (higher is better);
    each point is scored once. Stops when the best point is interior on every axis, or every
    axis it sits on the edge of can no longer grow (``max_extensions`` per axis, or a bound).
    """
    if not axes:
        raise ValueError("tune needs at least one axis")
    if max_extensions < 0:
        raise ValueError(f"max_extensions must be >= 0; got {max_extensions}")
    names = [a.name for a in axes]
    grids = {a.name: list(a.values) for a in axes}
    record = TuningRecord(axes=names, grids=grids, extensions=dict.fromkeys(names, 0))
    scored: dict[Point, float] = {}
    while True:
        for point in itertools.product(*(grids[n] for n in names)):
            if point not in scored:
                values = dict(zip(names, point, strict=True))
                scored[point] = float(score(values))
                record.scores.append({"point": values, "score": scored[point]})
                log(f"  tune {values}: {scored[point]:.4f}")
        best = _best(scored, axes)
        grown = False
        record.cap_hit = {}
        for axis, value in zip(axes, best, strict=True):
            side = edge(grids[axis.name], value)
            if side is None:
                continue
            wider = (
                extended(axis, grids[axis.name], side)
                if record.extensions[axis.name] < max_extensions
                else None
            )
            if wider is None:
                record.cap_hit[axis.name] = side
                continue
            grids[axis.name] = wider
            record.extensions[axis.name] += 1
            grown = True
        if not grown:
            break
    record.chosen = dict(zip(names, best, strict=True))
    record.best_score = scored[best]
    return record


def tune_by_axis(
    score: Callable[[Mapping[str, float]], float],
    axes: Sequence[Axis],
    start: Mapping[str, float],
    *,
    max_extensions: int = 3,
    passes: int = 2,
    log: Callable[[str], None] = lambda _: None,
) -> TuningRecord:
    """Coordinate search: ``tune`` each axis in turn with the others held at their current
    choice (``start`` first), for up to ``passes`` sweeps or until a sweep changes nothing.

    Each distinct point is scored once (later sweeps reuse earlier scores). The record's grid
    of an axis is every value it was scored at; its extensions and caps are those of the last
    sweep, whose choice is interior to the axis's grid unless a cap is recorded.
    """
    if not axes:
        raise ValueError("tune_by_axis needs at least one axis")
    names = [a.name for a in axes]
    missing = set(names) - set(start)
    if missing:
        raise ValueError(f"start has no value for {sorted(missing)}")
    if passes < 1:
        raise ValueError(f"passes must be >= 1; got {passes}")
    current = {n: float(start[n]) for n in names}
    record = TuningRecord(axes=names, grids={n: [] for n in names})
    memo: dict[Point, float] = {}

    def scored(point: Mapping[str, float]) -> float:
        full = {**current, **point}
        key = tuple(full[n] for n in names)
        if key not in memo:
            memo[key] = float(score(full))
            record.scores.append({"point": full, "score": memo[key]})
            log(f"  tune {full}: {memo[key]:.4f}")
        return memo[key]

    for _ in range(passes):
        changed = False
        for axis in axes:
            one = tune(scored, [axis], max_extensions=max_extensions)
            grid = record.grids[axis.name]
            grid[:] = sorted(set(grid) | set(one.grids[axis.name]))
            record.extensions[axis.name] = one.extensions[axis.name]
            record.cap_hit.pop(axis.name, None)
            record.cap_hit.update(one.cap_hit)
            if one.chosen[axis.name] != current[axis.name]:
                changed = True
                current[axis.name] = one.chosen[axis.name]
        if not changed:
            break
    record.chosen = dict(current)
    record.best_score = memo[tuple(current[n] for n in names)]
    return record
