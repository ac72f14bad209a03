"""Paired comparisons of benchmark rows: a difference to a reference row, with a bootstrap interval.

What and why
------------
Issue 17 asks that a row be called better than tuned FedAvg only when the evidence says so.
Each (row, seed, task) run leaves a vector of per-example correct flags on a fixed test set
(the same examples, in the same order, for every row and seed). For a row X and the reference
R, with seeds s = 1..S and tasks t = 1..T (n_t test examples each):

    D_t[s, i] = x_{s,t,i} - r_{s,t,i}                              in {-1, 0, 1}
    diff      = mean_t mean_s mean_i D_t[s, i]                     (mean accuracy difference)

The interval is a paired percentile bootstrap over both sources of noise: one resample draws
S seeds with replacement and, for every task, n_t example indices with replacement; the same
indices go to both rows (paired: the rows are compared on the same examples) and to every
drawn seed (the test set is shared across seeds). The statistic above is recomputed on each
resample; the 2.5 % and 97.5 % quantiles are the 95 % interval. A row *wins* only when the
interval lies above 0, *loses* when it lies below, and ties otherwise.

Every function here is pure: the draws come from a seeded ``numpy`` generator, or are passed
in (``resampled_differences``), so a result can be checked against a plain loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

# Flags[seed index][task] = per-example correctness (bool or 0/1), one entry per test example.
Flags = Sequence[Mapping[str, Sequence[int] | NDArray[Any]]]


@dataclass(frozen=True)
class Interval:
    """A difference to the reference (``mean``) and its bootstrap interval [low, high]."""

    mean: float
    low: float
    high: float
    level: float

    @property
    def verdict(self) -> str:
        """``"win"`` if the interval lies above 0, ``"loss"`` if below, else ``"tie"``."""
        if self.low > 0:
            return "win"
        if self.high < 0:
            return "loss"
        return "tie"

    def to_json(self) -> dict[str, float | str]:
        """A JSON-ready copy with the verdict."""
        return {
            "mean": self.mean,
            "low": self.low,
            "high": self.high,
            "level": self.level,
            "verdict": self.verdict,
        }


def is_win(interval: Interval) -> bool:
    """True only when the whole interval lies above 0 (an interval touching 0 is a tie)."""
    return interval.verdict == "win"


def accuracy(flags: Sequence[int] | NDArray[Any]) -> float:
    """The fraction of correct examples (ValueError when there are none)."""
    values = np.asarray(flags, dtype=float)
    if values.size == 0:
        raise ValueError("no examples to score")
    return float(values.mean())


def paired_differences(
    row: Flags, reference: Flags, tasks: Sequence[str]
) -> dict[str, NDArray[np.float64]]:
    """``D_t`` (seeds, n_t) per task: the row's flags minus the reference's, seed by seed.

    Raises ValueError when the rows have different numbers of seeds, a task is missing, or a
    task's vectors differ in length (they would not be the same examples).
    """
    if not tasks:
        raise ValueError("no tasks to compare")
    if len(row) != len(reference) or not row:
        raise ValueError(
            f"the rows must have the same seeds: {len(row)} runs against {len(reference)}"
        )
    out: dict[str, NDArray[np.float64]] = {}
    for task in tasks:
        try:
            x = np.array([np.asarray(run[task], dtype=float) for run in row])
            r = np.array([np.asarray(run[task], dtype=float) for run in reference])
        except KeyError as error:
            raise ValueError(f"task {task!r} is missing from a run") from error
        except ValueError as error:  # ragged: seeds with different example counts
            raise ValueError(f"task {task!r}: runs of different lengths") from error
        if x.shape != r.shape or x.ndim != 2 or x.shape[1] == 0:
            raise ValueError(f"task {task!r}: flags of shape {x.shape} against {r.shape}")
        out[task] = x - r
    return out


def mean_difference(row: Flags, reference: Flags, tasks: Sequence[str]) -> float:
    """Mean over seeds and tasks of (the row's accuracy - the reference's accuracy)."""
    differences = paired_differences(row, reference, tasks)
    return float(np.mean([d.mean() for d in differences.values()]))


def resampled_differences(
    differences: Mapping[str, NDArray[np.float64]],
    seed_draws: NDArray[np.int64],
    example_draws: Mapping[str, NDArray[np.int64]],
) -> NDArray[np.float64]:
    """The statistic on each resample (B,), given the draws.

    ``seed_draws`` (B, S) are seed indices; ``example_draws[t]`` (B, n_t) example indices of
    task t. Resample b is ``mean_t mean_{j} mean_{k} D_t[seed_draws[b, j], example_draws[t][b,
    k]]``. Computed from draw counts: the mean over drawn examples is ``D_t @ w`` with w the
    draw frequencies, and likewise for seeds.
    """
    resamples, seeds = seed_draws.shape
    seed_weights = _frequencies(seed_draws, seeds)  # (B, S)
    total = np.zeros(resamples)
    for task, d in differences.items():
        draws = example_draws[task]
        example_weights = _frequencies(draws, d.shape[1])  # (B, n_t)
        per_seed = example_weights @ d.T  # (B, S): each seed's mean over the drawn examples
        total += (per_seed * seed_weights).sum(axis=1)
    result: NDArray[np.float64] = total / len(differences)
    return result


def _frequencies(draws: NDArray[np.int64], size: int) -> NDArray[np.float64]:
    """Per row of ``draws`` (B, k): how often each of ``size`` indices was drawn, over k."""
    resamples, count = draws.shape
    counts = np.zeros((resamples, size))
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1.0)
    frequencies: NDArray[np.float64] = counts / count
    return frequencies


def bootstrap_interval(
    row: Flags,
    reference: Flags,
    tasks: Sequence[str],
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """The mean difference of ``row`` to ``reference`` over ``tasks`` and its paired bootstrap
    interval (``resamples`` draws of seeds and test examples; see the module docstring)."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1; got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    differences = paired_differences(row, reference, tasks)
    generator = np.random.default_rng(seed)
    seeds = len(row)
    seed_draws = generator.integers(0, seeds, size=(resamples, seeds))
    example_draws = {
        task: generator.integers(0, d.shape[1], size=(resamples, d.shape[1]))
        for task, d in differences.items()
    }
    statistics = resampled_differences(differences, seed_draws, example_draws)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(statistics, [tail, 1.0 - tail])
    mean = float(np.mean([d.mean() for d in differences.values()]))
    return Interval(mean=mean, low=float(low), high=float(high), level=level)
