"""Budget planning for the quality benchmark v2: the full run's time from measured unit costs.

What and why
------------
Issue 17's full run must fit in about 3 hours on 2 cores, across sessions. Its cost is almost
all forward/backward passes of the encoder, so it is planned in two measured unit costs:

- seconds per trained example (local training plus the server's merge, per example trained:
  the federated runs' wall time less their evaluation time, over the examples they trained);
- seconds per evaluated example (``TrackingWorkload``'s evaluation meter).

``plan_counts`` counts, from a configuration alone, the examples each stage trains and
evaluates; ``estimate_seconds`` multiplies them by the unit costs. Tuning is counted with one
extension per tuned axis (its base grid plus one point per axis); the planner says so, as the
true number depends on where the optima fall.

A federated round trains, on each sampled client, at most ``round_examples`` of its shard
(``benchmarks.federations.round_subsample``). The planner counts ``min(sampled *
round_examples, pool share)`` per round, the pool share being the sampled clients' part of the
pool (``seen_tasks * pool_examples * sampled / clients``): an upper bound, as a Dirichlet shard
smaller than ``round_examples`` trains fewer, which the measured unit costs do not need.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PlanInputs:
    """What the counts depend on (read from a configuration and the loaded workload)."""

    seeds: int
    seen_tasks: int
    pool_examples: int
    round_examples: int
    train_examples: int
    individual_epochs: int
    test_total: int
    seen_test_total: int
    dev_total: int
    curve_total: int
    tune_rounds: int
    # (clients, sampled clients per round) of the tuning federation
    tune_federation: tuple[int, int]
    # (name, clients, sampled clients per round, rounds) per federation shape
    federations: tuple[tuple[str, int, int, int], ...]
    round_rows: int
    # per tuned row: base grid points per axis (e.g. 3) and how many axes it tunes (1 or 2)
    tuning_grids: tuple[tuple[int, int], ...]
    one_shot_rows: int


@dataclass(frozen=True)
class StageCount:
    """Examples a stage trains and evaluates."""

    train: int
    evaluate: int

    def seconds(self, train_rate: float, eval_rate: float) -> float:
        """Estimated seconds at the given seconds-per-example costs."""
        return self.train * train_rate + self.evaluate * eval_rate


def _expected_points(per_axis: int, axes: int) -> int:
    """Points a one-axis-at-a-time search scores: each axis's base grid plus one extension
    (the planner's assumption; a second sweep that moves nothing scores no new point)."""
    return axes * (per_axis + 1)


def round_train(inputs: PlanInputs, clients: int, sampled: int) -> int:
    """Examples one round trains at ``clients`` clients, ``sampled`` of them per round: each
    sampled client trains at most ``round_examples``, and no more than its pool share."""
    share = inputs.seen_tasks * inputs.pool_examples * sampled / clients
    return round(min(sampled * inputs.round_examples, share))


def plan_counts(inputs: PlanInputs) -> dict[str, StageCount]:
    """Examples trained and evaluated per stage (see the module docstring)."""
    counts: dict[str, StageCount] = {}
    tune_points = sum(_expected_points(p, a) for p, a in inputs.tuning_grids)
    counts["tune"] = StageCount(
        train=tune_points * inputs.tune_rounds * round_train(inputs, *inputs.tune_federation),
        evaluate=tune_points * inputs.dev_total,
    )
    individual = inputs.seen_tasks * inputs.train_examples * inputs.individual_epochs
    counts["references"] = StageCount(
        train=inputs.seeds * 2 * individual,  # individual adapters + the multi-task adapter
        evaluate=inputs.seeds * (2 * inputs.test_total + inputs.seen_test_total),
    )
    for name, clients, sampled, rounds in inputs.federations:
        runs = inputs.round_rows * inputs.seeds
        counts[f"fed-{name}"] = StageCount(
            train=runs * rounds * round_train(inputs, clients, sampled),
            evaluate=runs * (rounds * inputs.curve_total + inputs.test_total),
        )
    counts["one-shot"] = StageCount(
        train=0, evaluate=inputs.seeds * inputs.one_shot_rows * inputs.test_total
    )
    return counts


def estimate_seconds(
    counts: Mapping[str, StageCount], train_rate: float, eval_rate: float
) -> dict[str, float]:
    """Seconds per stage and ``"total"`` at the measured unit costs."""
    out = {name: c.seconds(train_rate, eval_rate) for name, c in counts.items()}
    out["total"] = sum(out.values())
    return out


def unit_costs(
    train_seconds: float, train_examples: int, eval_seconds: float, eval_examples: int
) -> tuple[float, float]:
    """(seconds per trained example, seconds per evaluated example); ValueError if unmeasured."""
    if train_examples <= 0 or eval_examples <= 0:
        raise ValueError("no training or evaluation measured yet; run a stage first")
    return train_seconds / train_examples, eval_seconds / eval_examples


def format_estimate(estimate: Mapping[str, float], stages: Sequence[str] | None = None) -> str:
    """One line per stage (minutes) and the total (hours)."""
    names = list(stages) if stages is not None else [n for n in estimate if n != "total"]
    lines = [f"  {name}: {estimate[name] / 60:.0f} min" for name in names]
    lines.append(f"  total: {estimate['total'] / 3600:.2f} h")
    return "\n".join(lines)
