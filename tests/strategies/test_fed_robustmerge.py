"""FedRobustMerge with mock replies: good, bad one by one, all bad, weighting, diagnostics."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from protocol.wire import (
    ARRAYS,
    EVAL_ACCURACY,
    METRICS,
    NUM_EXAMPLES,
    PERSONALIZED_ACCURACY,
    TRAIN_LOSS,
)
from strategies import FedRobustMerge, merge_lora
from strategies.merging import create_method
from tests.messages import from_node

A0 = "base_model.model.layer.0.query.lora_A.weight"
B0 = "base_model.model.layer.0.query.lora_B.weight"
A1 = "base_model.model.layer.1.value.lora_A.weight"
B1 = "base_model.model.layer.1.value.lora_B.weight"
SHAPES = {A0: (4, 12), B0: (10, 4), A1: (4, 12), B1: (10, 4)}


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def make_global(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) for key, shape in SHAPES.items()}


def trained(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: value + 0.1 * torch.randn(value.shape, generator=generator)
        for key, value in base.items()
    }


def reply(
    node: int,
    tensors: dict[str, torch.Tensor] | None,
    num_examples: object = 100,
    *,
    extra_metrics: dict[str, float] | None = None,
) -> Message:
    content = RecordDict()
    if tensors is not None:
        content[ARRAYS] = ArrayRecord({k: v.contiguous() for k, v in tensors.items()})
    metrics: dict[str, object] = {TRAIN_LOSS: 1.0, **(extra_metrics or {})}
    if num_examples is not None:
        metrics[NUM_EXAMPLES] = num_examples
    content[METRICS] = MetricRecord(metrics)  # type: ignore[arg-type]
    return from_node(node, content)


def error_reply(node: int) -> Message:
    return from_node(node, Error(code=0, reason="out of memory"))


class FakeGrid:
    """The part of Grid the strategy uses for sampling."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def start_round(
    strategy: FedRobustMerge,
    base: dict[str, torch.Tensor],
    nodes: int = 3,
    server_round: int = 1,
) -> None:
    list(
        strategy.configure_train(
            server_round,
            ArrayRecord(dict(base)),
            ConfigRecord(),
            FakeGrid(list(range(1, nodes + 1))),  # type: ignore[arg-type]
        )
    )


def expected_global(
    base: dict[str, torch.Tensor],
    clients: list[dict[str, torch.Tensor]],
    server_lr: float = 1.0,
    **merge: object,
) -> dict[str, torch.Tensor]:
    deltas = [{k: c[k] - base[k] for k in base} for c in clients]
    # rounds use each method's size-invariant round form (RobustMerge: A averaged, not summed)
    name = str(merge.pop("method", "robustmerge"))
    weights = merge.pop("weights", None)
    method = create_method(name, **merge).round_form()
    merged = merge_lora(deltas, method, weights, device="cpu")  # type: ignore[arg-type]
    return {k: base[k] + server_lr * merged[k] for k in base}


def as_tensors(record: ArrayRecord | None) -> dict[str, torch.Tensor]:
    assert record is not None
    return dict(record.to_torch_state_dict())


def test_good_replies_give_robustmerge_of_deltas_plus_server_step() -> None:
    base = make_global()
    strategy = FedRobustMerge(server_lr=0.5, device="cpu")
    start_round(strategy, base)
    clients = [trained(base, seed) for seed in (1, 2, 3)]
    arrays, metrics = strategy.aggregate_train(1, [reply(i + 1, c) for i, c in enumerate(clients)])
    got = as_tensors(arrays)
    want = expected_global(base, clients, server_lr=0.5)
    for key in base:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)
    assert metrics is not None
    assert metrics["clients-accepted"] == 3
    assert metrics["clients-rejected"] == 0
    assert metrics["bytes-received"] > 0
    assert metrics[TRAIN_LOSS] == pytest.approx(1.0)
    assert -1.0 <= metrics["direction-cosine-min"] <= metrics["direction-cosine-mean"] <= 1.0
    assert metrics["merged-update-norm"] > 0


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda t: {k: v for k, v in t.items() if k != key}


def _set(
    key: str, value: torch.Tensor
) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda t: {**t, key: value}


def _poison(value: float) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    def apply(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        bad = t[A0].clone()
        bad[0, 0] = value
        return {**t, A0: bad}

    return apply


TENSOR_CASES = {
    "missing key": (_drop(B1), "missing key"),
    "extra LoRA key": (
        _set("base_model.model.layer.9.query.lora_A.weight", torch.zeros(4, 12)),
        "unexpected LoRA key",
    ),
    "non-LoRA key (base weight)": (
        _set("base_model.model.layer.0.query.weight", torch.zeros(12, 12)),
        "non-LoRA",
    ),
    "wrong shape": (_set(B0, torch.zeros(10, 5)), "shape"),
    "wrong rank": (_set(A0, torch.zeros(2, 12)), "shape"),
    "integer dtype": (_set(A0, torch.zeros(4, 12, dtype=torch.int32)), "dtype"),
    "bool dtype": (_set(A0, torch.zeros(4, 12, dtype=torch.bool)), "dtype"),
    "complex dtype": (_set(A0, torch.zeros(4, 12, dtype=torch.complex64)), "dtype"),
    "NaN": (_poison(float("nan")), "non-finite"),
    "+Inf": (_poison(float("inf")), "non-finite"),
    "-Inf": (_poison(float("-inf")), "non-finite"),
    "empty ArrayRecord": (lambda t: {}, "empty"),
}


def test_a_rounds_report_is_handed_out_only_once_the_round_is_closed() -> None:
    base = make_global()
    strategy = FedRobustMerge(device="cpu", server_lr=1.0)
    with pytest.raises(RuntimeError, match="not this strategy's last round"):
        strategy.round_report(1)
    with pytest.raises(RuntimeError, match="not opened by configure_train"):
        strategy.aggregate_train(1, [reply(1, trained(base, 1))])
    start_round(strategy, base, server_round=4)
    with pytest.raises(RuntimeError, match="still open"):
        strategy.round_report(4)
    with pytest.raises(RuntimeError, match="round 5 was not opened"):
        strategy.aggregate_train(5, [reply(1, trained(base, 1))])
    strategy.aggregate_train(4, [reply(1, trained(base, 1)), reply(2, trained(base, 2))])
    report = strategy.round_report(4)
    assert report.server_round == 4 and sorted(report.accepted_nodes) == [1, 2]
    assert strategy.round_report() is report
    with pytest.raises(RuntimeError, match="not this strategy's last round"):
        strategy.round_report(3)
    with pytest.raises(RuntimeError, match="already closed"):
        strategy.aggregate_train(4, [reply(1, trained(base, 1))])


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_bad_reply_is_rejected_and_round_goes_on(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt, reason = TENSOR_CASES[case]
    base = make_global()
    strategy = FedRobustMerge(device="cpu", server_lr=1.0)
    start_round(strategy, base)
    good = [trained(base, 1), trained(base, 2)]
    bad = corrupt(trained(base, 3))
    arrays, metrics = strategy.aggregate_train(
        1, [reply(1, good[0]), reply(7, bad), reply(2, good[1])]
    )
    want = expected_global(base, good)
    got = as_tensors(arrays)
    for key in base:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)
    assert metrics is not None and metrics["clients-rejected"] == 1
    assert reason in strategy.round_report().rejected[7]
    if case.startswith("non-LoRA"):
        assert "PRIVACY" in caplog.text or "non-LoRA" in strategy.round_report().rejected[7]


NUM_EXAMPLE_CASES = {
    "missing": None,
    "zero": 0,
    "negative": -5,
    "non-integer": 2.5,
    "absurd": 10**12,
}


@pytest.mark.parametrize("case", sorted(NUM_EXAMPLE_CASES))
def test_bad_num_examples_is_rejected(case: str) -> None:
    base = make_global()
    strategy = FedRobustMerge(device="cpu", merge_method="fedavg", server_lr=1.0)
    start_round(strategy, base)
    good = [trained(base, 1), trained(base, 2)]
    replies = [
        reply(1, good[0], 10),
        reply(2, good[1], 30),
        reply(3, trained(base, 3), NUM_EXAMPLE_CASES[case]),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    want = expected_global(base, good, method="fedavg", weights=[10, 30])
    got = as_tensors(arrays)
    for key in base:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)
    assert metrics is not None and metrics["clients-rejected"] == 1
    assert NUM_EXAMPLES in strategy.round_report().rejected[3]


def test_error_reply_and_duplicate_node_are_rejected() -> None:
    base = make_global()
    strategy = FedRobustMerge(device="cpu", server_lr=1.0)
    start_round(strategy, base)
    good = trained(base, 1)
    replies = [
        reply(1, good),
        error_reply(2),
        reply(3, trained(base, 3)),
        reply(3, trained(base, 4)),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert "out of memory" in strategy.round_report().rejected[2]
    assert "2 replies" in strategy.round_report().rejected[3]
    got = as_tensors(arrays)
    want = expected_global(base, [good])
    for key in base:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)


def test_all_bad_keeps_global_and_counts_rejections() -> None:
    base = make_global()
    strategy = FedRobustMerge(device="cpu", server_lr=1.0)
    start_round(strategy, base)
    arrays, metrics = strategy.aggregate_train(
        1, [error_reply(1), reply(2, _poison(float("nan"))(trained(base, 2)))]
    )
    assert arrays is None
    assert metrics is not None
    assert metrics["round-skipped"] == 1 and metrics["clients-rejected"] == 2


def test_min_merge_replies_skips_round() -> None:
    base = make_global()
    strategy = FedRobustMerge(device="cpu", min_merge_replies=3, server_lr=1.0)
    start_round(strategy, base)
    arrays, metrics = strategy.aggregate_train(
        1, [reply(1, trained(base, 1)), reply(2, trained(base, 2))]
    )
    assert arrays is None and metrics is not None and metrics["round-skipped"] == 1


def test_max_update_norm_rejects_outlier() -> None:
    base = make_global()
    strategy = FedRobustMerge(device="cpu", max_update_norm=5.0, server_lr=1.0)
    start_round(strategy, base)
    huge = {k: v + 100.0 for k, v in base.items()}
    arrays, _ = strategy.aggregate_train(1, [reply(1, trained(base, 1)), reply(2, huge)])
    assert "max-update-norm" in strategy.round_report().rejected[2]
    want = expected_global(base, [trained(base, 1)])
    torch.testing.assert_close(as_tensors(arrays)[A0], want[A0])


def test_weight_by_examples_switch_reshapes_fuse_weights() -> None:
    base = make_global()
    clients = [trained(base, 1), trained(base, 2)]
    strategy = FedRobustMerge(device="cpu", weight_by_examples=True, server_lr=1.0)
    start_round(strategy, base)
    arrays, _ = strategy.aggregate_train(1, [reply(1, clients[0], 100), reply(2, clients[1], 300)])
    want = expected_global(base, clients, weights=[100, 300])
    torch.testing.assert_close(as_tensors(arrays)[B0], want[B0], rtol=1e-6, atol=1e-7)
    unweighted = expected_global(base, clients)
    assert not torch.allclose(want[B0], unweighted[B0])


def test_adapter_target_merges_full_adapters() -> None:
    base = make_global()
    clients = [trained(base, 1), trained(base, 2)]
    strategy = FedRobustMerge(device="cpu", merge_target="adapter", fuse_weight=0.5, server_lr=1.0)
    start_round(strategy, base)
    arrays, _ = strategy.aggregate_train(1, [reply(1, clients[0]), reply(2, clients[1])])
    want = merge_lora(clients, device="cpu", fuse_weight=0.5)
    torch.testing.assert_close(as_tensors(arrays)[A1], want[A1], rtol=1e-6, atol=1e-7)


def test_every_registered_method_runs_through_the_strategy() -> None:
    from strategies import available_methods

    base = make_global()
    for method in available_methods():
        if method == "task_arithmetic":
            with pytest.raises(ValueError, match="no round form"):
                FedRobustMerge(device="cpu", merge_method=method, server_lr=1.0)
            continue
        strategy = FedRobustMerge(device="cpu", merge_method=method, server_lr=1.0)
        start_round(strategy, base)
        arrays, metrics = strategy.aggregate_train(
            1, [reply(1, trained(base, 1)), reply(2, trained(base, 2))]
        )
        assert arrays is not None and metrics is not None, method
        assert metrics["clients-accepted"] == 2


def test_unknown_method_and_foreign_option_are_refused() -> None:
    with pytest.raises(ValueError, match="known methods"):
        FedRobustMerge(merge_method="nope", server_lr=1.0)
    with pytest.raises(ValueError, match="does not take drop_rate"):
        FedRobustMerge(merge_method="robustmerge", merge_options={"drop_rate": 0.1}, server_lr=1.0)


def test_sampling_is_seeded_per_round() -> None:
    base = make_global()
    record = ArrayRecord(dict(base))
    grid = FakeGrid(list(range(100, 120)))

    def sampled(seed: int, server_round: int) -> list[int]:
        strategy = FedRobustMerge(device="cpu", fraction_train=0.25, seed=seed, server_lr=1.0)
        messages = strategy.configure_train(server_round, record, ConfigRecord(), grid)  # type: ignore[arg-type]
        return [m.metadata.dst_node_id for m in messages]

    assert sampled(0, 1) == sampled(0, 1)
    assert len(sampled(0, 1)) == 5
    assert sampled(0, 1) != sampled(0, 2) or sampled(0, 1) != sampled(0, 3)


def test_aggregate_evaluate_ignores_malformed_replies() -> None:
    strategy = FedRobustMerge(device="cpu", server_lr=1.0)
    good = reply(1, None, 10, extra_metrics={EVAL_ACCURACY: 0.5})
    other = reply(2, None, 30, extra_metrics={EVAL_ACCURACY: 0.9})
    broken = reply(3, None, None, extra_metrics={EVAL_ACCURACY: 0.0})
    metrics = strategy.aggregate_evaluate(1, [good, other, broken, error_reply(4)])
    assert metrics is not None
    assert metrics[EVAL_ACCURACY] == pytest.approx((0.5 * 10 + 0.9 * 30) / 40)
    assert metrics[NUM_EXAMPLES] == 40


# --- round forms through the strategy (issue: merge the right thing at any size) ---------------


def _only_b_moved(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    moved = trained(base, seed)
    return {k: (moved[k] if ".lora_B." in k else base[k].clone()) for k in base}


@pytest.mark.parametrize(
    "options",
    [
        {"merge_method": "svd"},
        {"merge_method": "exact-mean"},
        {"merge_method": "robustmerge", "mode": "paper-equation"},
        {"merge_method": "robustmerge"},
        {"merge_method": "fedavg"},
    ],
)
def test_clients_that_move_only_b_move_the_global(options: dict[str, object]) -> None:
    base = make_global()
    for key in (B0, B1):
        base[key] = torch.zeros_like(base[key])  # round 1: PEFT's zero B
    strategy = FedRobustMerge(device="cpu", **options)  # type: ignore[arg-type]
    start_round(strategy, base)
    replies = [reply(n, _only_b_moved(base, n)) for n in (1, 2, 3)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics is not None and arrays is not None
    assert metrics["merged-update-norm"] > 0.01
    new = as_tensors(arrays)
    assert float((new[B0] @ new[A0]).norm()) > 0.01
    assert metrics["factorwise-gap"] == pytest.approx(0.0, abs=1e-6)  # only B moved: exact
    if strategy.settings.method.merges_products():
        assert 0.0 <= metrics["rank-truncation-error"] < 1e-6  # rank r: nothing dropped
        assert "update-truncation-error" in metrics
    else:
        assert "rank-truncation-error" not in metrics


@pytest.mark.parametrize(
    "options",
    [
        {"merge_method": "robustmerge"},
        {"merge_method": "robustmerge", "mode": "paper-equation"},
        {"merge_method": "fedavg"},
        {"merge_method": "ties"},
        {"merge_method": "dare"},
        {"merge_method": "svd"},
        {"merge_method": "exact-mean"},
    ],
)
@pytest.mark.parametrize("count", [4, 64])
def test_identical_replies_move_the_global_as_far_as_one(
    options: dict[str, object], count: int
) -> None:
    base = make_global()
    client = trained(base, 5)

    def new_global(copies: int) -> dict[str, torch.Tensor]:
        strategy = FedRobustMerge(
            device="cpu",
            min_train_nodes=1,
            min_available_nodes=1,
            **options,  # type: ignore[arg-type]
        )
        start_round(strategy, base, nodes=copies)
        arrays, _ = strategy.aggregate_train(1, [reply(n + 1, client) for n in range(copies)])
        return as_tensors(arrays)

    one, many = new_global(1), new_global(count)
    for a_key, b_key in ((A0, B0), (A1, B1)):
        want = (one[b_key] @ one[a_key]).double()
        got = (many[b_key] @ many[a_key]).double()
        assert float((got - want).norm() / want.norm()) < 1e-5, (options, count)


def test_factorwise_gap_is_reported_when_both_factors_move() -> None:
    base = make_global()
    strategy = FedRobustMerge(device="cpu", merge_method="fedavg", server_lr=1.0)
    start_round(strategy, base)
    _, metrics = strategy.aggregate_train(1, [reply(n, trained(base, n)) for n in (1, 2, 3)])
    assert metrics is not None and metrics["factorwise-gap"] > 0
    assert strategy.round_report().to_json()["factorwise-gap"] == metrics["factorwise-gap"]


def test_personalised_scores_are_logged_per_site_and_averaged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 27: the server logs each site's personalised accuracy next to its global one, and
    the mean of both (example-weighted) reaches the evaluate metrics."""
    strategy = FedRobustMerge(device="cpu")
    first = reply(1, None, 10, extra_metrics={EVAL_ACCURACY: 0.5, PERSONALIZED_ACCURACY: 0.7})
    second = reply(2, None, 30, extra_metrics={EVAL_ACCURACY: 0.9, PERSONALIZED_ACCURACY: 0.8})
    plain = reply(3, None, 20, extra_metrics={EVAL_ACCURACY: 0.6})
    with caplog.at_level(logging.INFO):
        metrics = strategy.aggregate_evaluate(3, [first, second, plain])
    assert metrics is not None
    assert metrics[PERSONALIZED_ACCURACY] == pytest.approx((0.7 * 10 + 0.8 * 30) / 40)
    assert metrics[EVAL_ACCURACY] == pytest.approx((0.5 * 10 + 0.9 * 30 + 0.6 * 20) / 60)
    lines = [r.getMessage() for r in caplog.records if "personalised" in r.getMessage()]
    assert any(
        "round 3: node 1: eval-accuracy 0.5000 global -> 0.7000 personalised" in m for m in lines
    )
    assert any("node 2: eval-accuracy 0.9000 global -> 0.8000 personalised" in m for m in lines)
    assert not any("node 3" in m for m in lines)  # no personal copy: nothing to compare
    assert any(m.startswith("round 3: mean over the sites: eval-accuracy") for m in lines)
    # Each site's own pair is kept for metrics.json; a site without a personal copy is not.
    assert strategy.site_scores(3) == {
        1: {EVAL_ACCURACY: 0.5, PERSONALIZED_ACCURACY: 0.7},
        2: {EVAL_ACCURACY: 0.9, PERSONALIZED_ACCURACY: 0.8},
    }
    assert strategy.site_scores(2) == {}  # another round's evaluation: nothing kept for it
    strategy.aggregate_evaluate(4, [plain])
    assert strategy.site_scores(4) == {} and strategy.site_scores(3) == {}
