"""The paired bootstrap of benchmarks.stats: hand-checked cases, invariants, parity with a loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from benchmarks.stats import (
    Interval,
    accuracy,
    bootstrap_interval,
    is_win,
    mean_difference,
    paired_differences,
    resampled_differences,
)


def test_mean_difference_by_hand() -> None:
    # seed 0: task a 3/4 vs 1/4 (+0.5), task b 1/2 vs 1/2 (0); seed 1: a 2/4 vs 2/4, b 2/2 vs 0/2
    row = [
        {"a": [1, 1, 1, 0], "b": [1, 0]},
        {"a": [1, 1, 0, 0], "b": [1, 1]},
    ]
    ref = [
        {"a": [1, 0, 0, 0], "b": [0, 1]},
        {"a": [0, 0, 1, 1], "b": [0, 0]},
    ]
    # per task, mean over seeds: a (0.5 + 0) / 2 = 0.25, b (0 + 1) / 2 = 0.5; mean 0.375
    assert mean_difference(row, ref, ["a", "b"]) == pytest.approx(0.375)
    assert mean_difference(row, ref, ["a"]) == pytest.approx(0.25)
    assert accuracy([True, False, True, True]) == 0.75


def test_resampled_differences_by_hand() -> None:
    d = {"a": np.array([[1.0, 0.0, -1.0], [0.0, 0.0, 1.0]])}
    seeds = np.array([[0, 0], [1, 0]])
    examples = {"a": np.array([[0, 0, 2], [1, 2, 2]])}
    # resample 0: seed 0 twice, examples 0,0,2 -> (1 + 1 - 1) / 3 = 1/3
    # resample 1: seeds 1 and 0, examples 1,2,2 -> seed 1: (0+1+1)/3, seed 0: (0-1-1)/3 -> 0
    out = resampled_differences(d, seeds, examples)
    assert out == pytest.approx([1 / 3, 0.0])


def test_identical_rows_tie_at_zero() -> None:
    flags = [{"a": [1, 0, 1, 1, 0]}, {"a": [0, 0, 1, 1, 1]}]
    interval = bootstrap_interval(flags, flags, ["a"], resamples=200)
    assert (interval.mean, interval.low, interval.high) == (0.0, 0.0, 0.0)
    assert interval.verdict == "tie" and not is_win(interval)


def test_row_right_everywhere_the_reference_is_wrong_wins() -> None:
    row = [{"a": [1] * 50}] * 3
    ref = [{"a": [0] * 50}] * 3
    interval = bootstrap_interval(row, ref, ["a"], resamples=200)
    assert (interval.low, interval.high, interval.mean) == pytest.approx((1.0, 1.0, 1.0))
    assert is_win(interval)
    assert bootstrap_interval(ref, row, ["a"], resamples=200).verdict == "loss"


def test_verdict_needs_the_interval_to_exclude_zero() -> None:
    assert Interval(0.02, 0.0, 0.04, 0.95).verdict == "tie"
    assert Interval(0.02, 0.001, 0.04, 0.95).verdict == "win"
    assert Interval(-0.02, -0.04, -0.001, 0.95).verdict == "loss"


def test_a_small_difference_on_few_examples_is_not_a_win() -> None:
    generator = np.random.default_rng(3)
    ref = [{"a": generator.random(40) < 0.5} for _ in range(3)]
    row = [{"a": r["a"].copy()} for r in ref]
    for r in row:
        r["a"][0] = True  # at most one more correct example in 40
    interval = bootstrap_interval(row, ref, ["a"], resamples=500)
    assert interval.mean >= 0
    assert not is_win(interval)


def test_mismatched_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="same seeds"):
        paired_differences([{"a": [1]}], [{"a": [1]}, {"a": [0]}], ["a"])
    with pytest.raises(ValueError, match="missing"):
        paired_differences([{"a": [1]}], [{"b": [1]}], ["a"])
    with pytest.raises(ValueError, match="task 'a'"):
        paired_differences([{"a": [1, 0]}], [{"a": [1]}], ["a"])
    with pytest.raises(ValueError):
        bootstrap_interval([{"a": [1]}], [{"a": [1]}], ["a"], level=1.0)


def _naive(
    d: dict[str, NDArray[np.float64]],
    seeds: NDArray[np.int64],
    examples: dict[str, NDArray[np.int64]],
) -> list[float]:
    """A plain reading of the statistic: loops over resamples, tasks, drawn seeds, examples."""
    out = []
    for b in range(seeds.shape[0]):
        per_task = []
        for task, diff in d.items():
            per_seed = [
                sum(diff[s, i] for i in examples[task][b]) / len(examples[task][b])
                for s in seeds[b]
            ]
            per_task.append(sum(per_seed) / len(per_seed))
        out.append(sum(per_task) / len(per_task))
    return out


flag_runs = st.integers(1, 3).flatmap(
    lambda seeds: st.tuples(
        st.lists(st.integers(1, 12), min_size=1, max_size=3).flatmap(
            lambda sizes: st.tuples(
                *(
                    st.lists(
                        st.lists(st.booleans(), min_size=2 * n, max_size=2 * n),
                        min_size=seeds,
                        max_size=seeds,
                    )
                    for n in sizes
                )
            )
        ),
        st.integers(0, 2**31),
    )
)


Case = tuple[tuple[list[list[bool]], ...], int]
Runs = list[dict[str, list[bool]]]


def _split(case: Case) -> tuple[Runs, Runs, list[str], int]:
    """Hypothesis' per-task lists (seeds x 2n flags) -> row and reference runs."""
    tasks, seed = case
    names = [f"t{i}" for i in range(len(tasks))]
    seeds = len(tasks[0])
    row = [
        {n: t[s][: len(t[s]) // 2] for n, t in zip(names, tasks, strict=True)} for s in range(seeds)
    ]
    ref = [
        {n: t[s][len(t[s]) // 2 :] for n, t in zip(names, tasks, strict=True)} for s in range(seeds)
    ]
    return row, ref, names, seed


@settings(max_examples=40, deadline=None)
@given(flag_runs)
def test_vectorised_statistic_matches_the_loop(case: Case) -> None:
    row, ref, names, seed = _split(case)
    d = paired_differences(row, ref, names)
    generator = np.random.default_rng(seed)
    seeds = generator.integers(0, len(row), size=(7, len(row)))
    examples = {t: generator.integers(0, v.shape[1], size=(7, v.shape[1])) for t, v in d.items()}
    assert resampled_differences(d, seeds, examples) == pytest.approx(_naive(d, seeds, examples))


@settings(max_examples=40, deadline=None)
@given(flag_runs)
def test_interval_invariants(case: Case) -> None:
    row, ref, names, seed = _split(case)
    forward = bootstrap_interval(row, ref, names, resamples=100, seed=seed)
    backward = bootstrap_interval(ref, row, names, resamples=100, seed=seed)
    # bounded, ordered, and antisymmetric under swapping the rows
    assert -1.0 <= forward.low <= forward.high <= 1.0
    assert forward.mean == pytest.approx(mean_difference(row, ref, names))
    assert backward.mean == pytest.approx(-forward.mean)
    assert backward.low == pytest.approx(-forward.high)
    assert backward.high == pytest.approx(-forward.low)
    assert not (is_win(forward) and is_win(backward))
    # a row that is right wherever the reference is cannot lose, and every resample is >= 0
    better = [{t: np.logical_or(r[t], f[t]) for t in names} for r, f in zip(row, ref, strict=True)]
    dominated = bootstrap_interval(better, ref, names, resamples=100, seed=seed)
    assert dominated.low >= 0.0
    assert dominated.verdict != "loss"
