"""Sparse uplink end to end in the strategy: clients prune and encode, the server decodes and
merges, and the new global is the dense path's; hostile sparse replies are rejected one by one."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from client.instruction import instructed_method
from client.uplink import reply_records, sparse_update
from protocol.merge_settings import merge_settings
from protocol.sparse_codec import BITMASK_SUFFIX, GAPS_SUFFIX, VALUES_SUFFIX, encode_update
from protocol.wire import (
    ARRAYS,
    CONFIG,
    DENSE,
    FUSE_WEIGHT,
    KEEP_RATIO,
    MERGE_MODE,
    SCALE_QUANTILE,
    SERVER_ROUND,
    SPARSE,
    SPARSE_SETTINGS,
    UPLINK,
)
from strategies import FedRobustMerge
from strategies.merging.decomposed import prune_adapter
from strategies.merging.robustmerge import RobustMerge
from strategies.robust import RobustSettings
from strategies.sparse_uplink import check_sparse_train_reply
from tests.strategies.test_fed_robustmerge import (
    A0,
    A1,
    B0,
    FakeGrid,
    as_tensors,
    make_global,
    reply,
    start_round,
    trained,
)
from workload.config import ConfigError

# What the server sends with a sparse train instruction at the default settings.
INSTRUCTION = {UPLINK: SPARSE, **merge_settings(RobustMerge())}


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def sparse_reply(node: int, wire: dict[str, torch.Tensor], num_examples: object = 100) -> Message:
    message = reply(node, wire, num_examples)
    message.content[CONFIG] = ConfigRecord({UPLINK: SPARSE})
    return message


def client_wire(
    base: dict[str, torch.Tensor], client: dict[str, torch.Tensor], **run_config: object
) -> dict[str, torch.Tensor]:
    return sparse_update(client, base, instructed_method({**INSTRUCTION, **run_config}))


def assert_globals_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same values to 1e-6; sums may run in another client order (replies sort by content)."""
    assert list(got) == list(want) or set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "weighted"),
    [
        ({}, False),
        ({}, True),
        ({"keep_ratio": 0.35, "scale_quantile": 0.5, "fuse_weight": 1.5}, False),
    ],
)
def test_sparse_round_equals_dense_round(options: dict[str, object], weighted: bool) -> None:
    base = make_global(5)
    clients = [trained(base, seed) for seed in (11, 12, 13, 14)]
    counts = [40, 100, 7, 64]
    run_config = {
        "keep-ratio": options.get("keep_ratio", 0.2),
        "scale-quantile": options.get("scale_quantile", 0.2),
        "merge-mode": options.get("mode", "paper-exact"),
    }
    common = {"device": "cpu", "server_lr": 0.7, "weight_by_examples": weighted, **options}
    dense = FedRobustMerge(**common)  # type: ignore[arg-type]
    sparse = FedRobustMerge(uplink="sparse", **common)  # type: ignore[arg-type]
    start_round(dense, base, nodes=4)
    start_round(sparse, base, nodes=4)
    dense_arrays, dense_metrics = dense.aggregate_train(
        1, [reply(i + 1, c, n) for i, (c, n) in enumerate(zip(clients, counts, strict=True))]
    )
    wires = [client_wire(base, c, **run_config) for c in clients]
    sparse_arrays, sparse_metrics = sparse.aggregate_train(
        1, [sparse_reply(i + 1, w, n) for i, (w, n) in enumerate(zip(wires, counts, strict=True))]
    )
    got, want = as_tensors(sparse_arrays), as_tensors(dense_arrays)
    # paper-equation too: truncate_product fixes the SVD's signs, so the factors do not follow
    # the client order (replies sort by content, and sparse contents sort differently).
    assert_globals_match(got, want)
    assert sparse_metrics is not None and dense_metrics is not None
    assert sparse_metrics["clients-accepted"] == 4
    # bytes actually received: the sparse ArrayRecords (with their keys and array headers)
    assert sparse_metrics["bytes-received"] == sum(ArrayRecord(w).count_bytes() for w in wires)

    # The masks, bit for bit: what the server decodes is the client's pruned delta.
    method = RobustMerge(
        keep_ratio=float(run_config["keep-ratio"]),
        scale_quantile=float(run_config["scale-quantile"]),
        mode=str(run_config["merge-mode"]),
    )
    assert sparse.settings.sparse_method is not None
    for wire, client in zip(wires, clients, strict=True):
        accepted = check_sparse_train_reply(
            sparse_reply(1, wire), base, sparse.settings.sparse_method
        )
        pruned, scales = prune_adapter({k: client[k] - base[k] for k in base}, method)
        for key in base:
            decoded = accepted.delta(key)
            assert torch.equal(decoded != 0, pruned[key] != 0), key
            assert torch.equal(decoded, pruned[key]), key
        for name, scale in scales.items():
            assert torch.equal(accepted.scales[name], scale)


def test_client_sending_more_than_its_share_is_pruned_on_the_server() -> None:
    base = make_global(2)
    clients = [trained(base, seed) for seed in (1, 2, 3)]
    honest = [client_wire(base, c) for c in clients]
    # Client 3 sends its whole delta (every entry) with honest scales.
    delta = {k: clients[2][k] - base[k] for k in base}
    _, scales = prune_adapter(delta, RobustMerge())
    greedy = encode_update(delta, scales)
    assert greedy[A0 + VALUES_SUFFIX].numel() == base[A0].numel()

    def run(wires: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        strategy = FedRobustMerge(device="cpu", uplink="sparse")
        start_round(strategy, base)
        arrays, _ = strategy.aggregate_train(
            1, [sparse_reply(i + 1, w) for i, w in enumerate(wires)]
        )
        return as_tensors(arrays)

    assert_globals_match(run([*honest[:2], greedy]), run(honest))


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda w: {k: v for k, v in w.items() if k != key}


def _set(
    key: str, value: torch.Tensor
) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda w: {**w, key: value}


def _scale_of(wire: dict[str, torch.Tensor]) -> str:
    return next(k for k in wire if k.endswith("::scale"))


def _values_nan(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    values = w[A0 + VALUES_SUFFIX].clone()
    values[0] = float("nan")
    return {**w, A0 + VALUES_SUFFIX: values}


def _scale(value: float) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    def apply(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = _scale_of(w)
        scale = w[key].clone()
        scale[0] = value
        return {**w, key: scale}

    return apply


def _positions_key(wire: dict[str, torch.Tensor], key: str) -> str:
    return key + (BITMASK_SUFFIX if key + BITMASK_SUFFIX in wire else GAPS_SUFFIX)


def _out_of_range(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # 4 x 12 = 48 entries: the bitmask's 6 bytes have no padding, so send gaps with one too many
    key = _positions_key(w, A0)
    count = w[A0 + VALUES_SUFFIX].numel()
    gaps = torch.zeros(count, dtype=torch.uint8)
    gaps[-1] = 48 - count + 1  # the last position becomes 48
    return {**{k: v for k, v in w.items() if k != key}, A0 + GAPS_SUFFIX: gaps}


SPARSE_CASES: dict[
    str, tuple[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], str]
] = {
    "NaN value": (_values_nan, "non-finite"),
    "scale below 1": (_scale(0.5), "below 1"),
    "scale NaN": (_scale(float("nan")), "non-finite"),
    "scale not floored": (_scale(1e6), "not floored"),
    "missing scale": (lambda w: _drop(_scale_of(w))(w), "no scale vector"),
    "wrong scale shape": (lambda w: _set(_scale_of(w), torch.ones(3))(w), "rank is 4"),
    "missing values": (_drop(B0 + VALUES_SUFFIX), "no kept values"),
    "position out of range": (_out_of_range, "out of range"),
    "values as float64": (
        lambda w: _set(A1 + VALUES_SUFFIX, w[A1 + VALUES_SUFFIX].double())(w),
        "must be float32",
    ),
    "base weight (privacy)": (
        _set("base_model.model.layer.0.query.weight::values", torch.ones(3)),
        "non-LoRA",
    ),
    "dense tensor in a sparse reply (privacy)": (
        _set("base_model.model.layer.0.query.weight", torch.ones(12, 12)),
        "non-LoRA",
    ),
    "unexpected LoRA array": (
        _set("base_model.model.layer.7.query.lora_A.weight::values", torch.ones(3)),
        "unexpected array",
    ),
}


@pytest.mark.parametrize("case", sorted(SPARSE_CASES))
def test_hostile_sparse_reply_is_rejected_and_round_goes_on(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt, reason = SPARSE_CASES[case]
    base = make_global()
    good = [trained(base, 1), trained(base, 2)]
    strategy = FedRobustMerge(device="cpu", uplink="sparse")
    start_round(strategy, base)
    bad = corrupt(client_wire(base, trained(base, 3)))
    arrays, metrics = strategy.aggregate_train(
        1,
        [
            sparse_reply(1, client_wire(base, good[0])),
            sparse_reply(7, bad),
            sparse_reply(2, client_wire(base, good[1])),
        ],
    )
    dense = FedRobustMerge(device="cpu")
    start_round(dense, base)
    want, _ = dense.aggregate_train(1, [reply(1, good[0]), reply(2, good[1])])
    assert_globals_match(as_tensors(arrays), as_tensors(want))
    assert metrics is not None and metrics["clients-rejected"] == 1
    assert reason in strategy.round_report().rejected[7], strategy.round_report().rejected[7]
    if "privacy" in case:
        assert "PRIVACY" in caplog.text


def test_uplink_mismatch_is_rejected_both_ways() -> None:
    base = make_global()
    wire = client_wire(base, trained(base, 1))
    dense = FedRobustMerge(device="cpu")
    start_round(dense, base)
    dense.aggregate_train(1, [sparse_reply(1, wire), reply(2, trained(base, 2))])
    assert "uplink is dense" in dense.round_report().rejected[1]

    sparse = FedRobustMerge(device="cpu", uplink="sparse")
    start_round(sparse, base)
    unmarked = reply(3, wire)
    sparse.aggregate_train(1, [sparse_reply(1, wire), reply(2, trained(base, 2)), unmarked])
    assert "uplink is sparse" in sparse.round_report().rejected[2]
    assert "uplink is sparse" in sparse.round_report().rejected[3]
    assert sparse.round_report().accepted_nodes == [1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"merge_method": "fedavg"}, "needs merge-method 'robustmerge'"),
        ({"merge_target": "adapter"}, "merge-target 'delta'"),
        ({"mode": "paper-equation"}, "multiplies the pruned B delta by the client's whole A_t"),
        ({"uplink": "compressed"}, "uplink must be one of"),
    ],
)
def test_sparse_uplink_needs_robustmerge_of_deltas(options: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FedRobustMerge(device="cpu", **{"uplink": "sparse", **options})  # type: ignore[arg-type]


def test_client_reply_records() -> None:
    base = make_global()
    client = trained(base, 4)
    dense = reply_records(client, base, {})
    assert set(dense) == {ARRAYS}
    assert list(dense[ARRAYS].keys()) == list(base)
    assert set(reply_records(client, base, {UPLINK: DENSE})) == {ARRAYS}
    records = reply_records(client, base, INSTRUCTION)
    assert set(records) == {ARRAYS, CONFIG}
    assert dict(records[CONFIG]) == {UPLINK: SPARSE}
    keys = list(records[ARRAYS].keys())
    assert all("::" in key for key in keys)
    assert all(np.asarray(records[ARRAYS][k].numpy()).ndim == 1 for k in keys)
    with pytest.raises(ConfigError, match=r"train config key 'uplink' must be one of"):
        reply_records(client, base, {UPLINK: "zip"})


@pytest.mark.parametrize("missing", SPARSE_SETTINGS)
def test_client_refuses_a_sparse_instruction_without_the_merge_settings(missing: str) -> None:
    base = make_global()
    instruction = {key: value for key, value in INSTRUCTION.items() if key != missing}
    with pytest.raises(ConfigError, match=re.escape(f"lacks [{missing!r}]")):
        reply_records(trained(base, 4), base, instruction)


def test_the_server_sends_its_merge_settings_with_a_sparse_instruction() -> None:
    """The client prunes with the server's settings, not its own run config's."""
    settings = {"keep_ratio": 0.35, "scale_quantile": 0.5, "fuse_weight": 1.5}
    base = make_global()
    for uplink, expected in (
        (DENSE, {UPLINK: DENSE}),
        (
            SPARSE,
            {
                UPLINK: SPARSE,
                KEEP_RATIO: 0.35,
                SCALE_QUANTILE: 0.5,
                MERGE_MODE: "paper-exact",
                FUSE_WEIGHT: 1.5,
            },
        ),
    ):
        strategy = FedRobustMerge(device="cpu", uplink=uplink, **settings)  # type: ignore[arg-type]
        messages = list(
            strategy.configure_train(
                3,
                ArrayRecord(dict(base)),
                ConfigRecord(),
                FakeGrid([1, 2]),  # type: ignore[arg-type]
            )
        )
        assert len(messages) == 2
        for message in messages:
            assert dict(message.content.config_records[CONFIG]) == {SERVER_ROUND: 3, **expected}
    method = instructed_method({UPLINK: SPARSE, **merge_settings(RobustMerge(**settings))})  # type: ignore[arg-type]
    assert (method.keep_ratio, method.scale_quantile, method.fuse_weight) == (0.35, 0.5, 1.5)


@pytest.mark.parametrize("weighted", [False, True])
def test_a_streamed_sparse_round_equals_the_streamed_dense_round_bit_for_bit(
    weighted: bool,
) -> None:
    """With a screen history both rounds stream; the fold takes the clients' own pruned deltas
    and scales, so the merged global has the dense path's bits, in any arrival order."""
    base = make_global(6)
    clients = [trained(base, seed) for seed in (21, 22, 23, 24, 25)]
    counts = [40, 100, 7, 64, 9]
    history = {"norm-history": [1.0, 1.2, 0.9]}
    common = {
        "device": "cpu",
        "server_lr": 0.7,
        "weight_by_examples": weighted,
        "robust": RobustSettings("norm"),  # what "auto" picks on the sparse uplink, both sides
    }
    dense = FedRobustMerge(**common)  # type: ignore[arg-type]
    sparse = FedRobustMerge(uplink="sparse", **common)  # type: ignore[arg-type]
    globals_ = []
    for strategy, make in (
        (dense, lambda i, c, n: reply(i + 1, c, n)),
        (sparse, lambda i, c, n: sparse_reply(i + 1, client_wire(base, c), n)),
    ):
        strategy.restore_robust_state(history)
        start_round(strategy, base, nodes=5, server_round=2)
        replies = [make(i, c, n) for i, (c, n) in enumerate(zip(clients, counts, strict=True))]
        arrays, _ = strategy.aggregate_train(2, iter(replies[::-1]))
        assert strategy.round_report(2).streamed
        globals_.append(as_tensors(arrays))
    want, got = globals_
    assert all(torch.equal(got[key], want[key]) for key in want)
