"""Order independence on inputs that tell an exact sum from a running one (issue 29).

Float addition is not associative, but tame random inputs rarely show it: a float64 running sum
of a few float32 terms is usually exact. The terms below are chosen so that it is not. Over
every order of

    [1, 2^-24, 2^-54, 2^-54, 2^-54]

a float64 running sum takes two values (the three 2^-54 first add up to 3 * 2^-54, which rounds
1 + 2^-24 up by one float64 ulp; one at a time after 1 they vanish), and

    [1, 2^-24, 2^-53, 2^-54]

does the same with four terms (2^-53 + 2^-54 = 3/4 ulp rounds up; 2^-53 alone is a tie that
rounds to even, down). 1 + 2^-24 is a float32 tie, so after a division by a power of two the
one-ulp float64 difference survives the cast to float32: each test also checks that a running
sum *would* give two answers, so it can fail. ``ExactSum`` drops everything below 2^-32 here
(bins of 32 bits under the leading one) and gives 1 + 2^-24 in every order.

Each fold of ``strategies.merging.streaming`` and a streamed strategy round go over all 24
orders; buffered svd and exact-mean rounds (which sort replies by content) over permuted
arrivals, their new global compared with ``torch.equal`` and the truncation errors they record
with ``==``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence

import pytest
import torch

from strategies import FedRobustMerge
from strategies.merging import create_method
from strategies.merging.exact_sum import ExactSum
from strategies.merging.streaming import DareFold, MeanFold, RobustMergeFold, RoundFold, TiesFold
from strategies.robust import RobustSettings
from tests.strategies.test_fed_robustmerge import as_tensors, reply, start_round, trained
from tests.strategies.test_fed_robustmerge import make_global as random_global

pytestmark = pytest.mark.usefixtures("flower_task_identity")

FIVE = [1.0, 2.0**-24, 2.0**-54, 2.0**-54, 2.0**-54]
FOUR = [1.0, 2.0**-24, 2.0**-53, 2.0**-54]
A_KEY = "base_model.model.layer.0.query.lora_A.weight"
B_KEY = "base_model.model.layer.0.query.lora_B.weight"
KEYS = [A_KEY, B_KEY]


def running_sum(terms: Sequence[float]) -> float:
    """What a plain float64 accumulator gives in this order."""
    total = 0.0
    for term in terms:
        total += term
    return total


def as_float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float64).to(torch.float32))


def test_the_terms_do_separate_a_running_sum_from_an_exact_one() -> None:
    five = {running_sum(order) for order in itertools.permutations(FIVE)}
    four = {as_float32(running_sum(order) / 4) for order in itertools.permutations(FOUR)}
    assert five == {1.0 + 2.0**-24, 1.0 + 2.0**-24 + 2.0**-52}
    assert four == {0.25, 0.25 + 2.0**-25}  # float32: the tie rounds down, one ulp above up


def test_exact_sum_gives_one_value_over_all_120_orders() -> None:
    values = set()
    for order in itertools.permutations(range(len(FIVE))):
        total = ExactSum((1,))
        for index in order:
            total.add(torch.tensor([FIVE[index]], dtype=torch.float32))
        values.add((float(total.value()[0]), float(total.value(torch.float32)[0])))
    assert values == {(1.0 + 2.0**-24, 1.0)}


def adapter(value: float) -> dict[str, torch.Tensor]:
    """A rank-1 module whose A and B carry ``value`` in their first entry (and 0.5 elsewhere,
    the same for every client)."""
    return {
        A_KEY: torch.tensor([[value, 0.5]], dtype=torch.float32),
        B_KEY: torch.tensor([[value], [0.5]], dtype=torch.float32),
    }


# keep_ratio 1 prunes nothing, so the folds sum the terms as given; each divides the sums by
# 4 (the count or total weight) times a power of two, exact in float64.
FOLDS: dict[str, Callable[[], RoundFold]] = {
    "mean": lambda: MeanFold(KEYS),
    "robustmerge": lambda: RobustMergeFold(
        create_method("robustmerge", keep_ratio=1.0).round_form(),  # type: ignore[arg-type]
        KEYS,
    ),
    "ties": lambda: TiesFold(create_method("ties", keep_ratio=1.0), KEYS),  # type: ignore[arg-type]
    "dare": lambda: DareFold(create_method("dare").round_form(), KEYS),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("name", sorted(FOLDS))
def test_each_fold_gives_one_result_over_all_24_orders(name: str) -> None:
    results = set()
    for order in itertools.permutations(FOUR):
        fold = FOLDS[name]()
        for value in order:
            fold.add(adapter(value))
        merged = fold.finish()
        results.add(tuple(float(merged[key].flatten()[0]) for key in KEYS))
    assert len(results) == 1, f"{name}: {len(results)} results over 24 orders: {results}"


STREAMED = {
    "fedavg": {},
    "robustmerge": {"keep_ratio": 1.0},
    "ties": {"keep_ratio": 1.0},
    "dare": {"merge_options": {"drop_rate": 0.5, "seed": 3}},
}


@pytest.mark.parametrize("method", sorted(STREAMED))
def test_a_streamed_strategy_round_gives_one_global_over_all_24_arrival_orders(
    method: str,
) -> None:
    base = {key: torch.zeros_like(value) for key, value in adapter(0.0).items()}
    globals_seen = set()
    for order in itertools.permutations(range(len(FOUR))):
        strategy = FedRobustMerge(
            device="cpu",
            merge_method=method,
            robust=RobustSettings(aggregation="none"),
            **STREAMED[method],  # type: ignore[arg-type]
        )
        start_round(strategy, base, nodes=4)
        replies = [reply(node + 1, adapter(FOUR[node]), 1) for node in order]
        record, _ = strategy.aggregate_train(1, iter(replies))
        assert strategy.round_report(1).streamed
        got = as_tensors(record)
        globals_seen.add(tuple(float(got[key].flatten()[0]) for key in KEYS))
    assert len(globals_seen) == 1, f"{method}: {len(globals_seen)} globals: {globals_seen}"


BUFFERED = {
    "svd": {},
    "exact-mean": {},
}


@pytest.mark.parametrize("method", sorted(BUFFERED))
def test_a_buffered_round_gives_the_same_bits_in_any_arrival_order(method: str) -> None:
    base = random_global(4)
    clients = [trained(base, 50 + node) for node in range(8)]
    results = []
    for seed in range(6):
        strategy = FedRobustMerge(
            device="cpu",
            merge_method=method,
            robust=RobustSettings(aggregation="none"),
            **BUFFERED[method],  # type: ignore[arg-type]
        )
        start_round(strategy, base, nodes=8)
        order = list(range(8))
        random.Random(seed).shuffle(order)
        replies = [reply(node + 1, clients[node], 10 + node) for node in order]
        record, _ = strategy.aggregate_train(1, replies)
        report = strategy.round_report(1).to_json()
        assert not report["streamed"]
        # svd's float32 factors come from a float64 SVD and rarely show the order; the float64
        # truncation errors the round records do (their QR sees the clients' blocks in order)
        errors = (report["relative-error"], report["update-relative-error"])
        results.append((as_tensors(record), errors))
    first, first_errors = results[0]
    for other, errors in results[1:]:
        for key in base:
            assert torch.equal(first[key], other[key]), f"{method}: {key} depends on order"
        assert errors == first_errors, f"{method}: the recorded errors depend on order"
