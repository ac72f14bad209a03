"""DP wrappers around FedRobustMerge: clipping bounds each client's update, bad replies are
rejected without stopping the round, the client mod clips only when asked."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.privacy import asks_for_clipping, clip_when_asked
from protocol.wire import ARRAYS, CONFIG, SERVER_ROUND
from server.config import ConfigError, ServerSettings
from server.privacy import (
    ClientSideClipping,
    ServerSideClipping,
    core_strategy,
    restore_privacy_ledger,
    robustmerge_sensitivity_factor,
    wrap_with_privacy,
)
from strategies import FedRobustMerge
from strategies.robust import RobustSettings
from tests.strategies.test_fed_robustmerge import (
    as_tensors,
    expected_global,
    make_global,
    reply,
    start_round,
    trained,
)

CLIP = 0.5


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def wrapped(mode: str, *, noise: float = 0.0, sampled: int = 3, **options: object) -> Strategy:
    """FedRobustMerge on CPU inside the DP wrapper ``mode`` names."""
    return wrap_with_privacy(
        FedRobustMerge(device="cpu", **{"server_lr": 1.0, **options}),  # type: ignore[arg-type]
        mode,
        clipping_norm=CLIP,
        noise_multiplier=noise,
        num_sampled_clients=sampled,
    )


def norm(delta: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in delta.values()))


def clipped(
    base: dict[str, torch.Tensor], client: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    delta = {k: client[k] - base[k] for k in base}
    factor = min(1.0, CLIP / norm(delta))
    return {k: base[k] + delta[k] * factor for k in base}


def test_server_clipping_bounds_a_huge_update_before_the_merge() -> None:
    base = make_global()
    clients = [trained(base, seed) for seed in (1, 2, 3)]
    clients[2] = {k: base[k] + 1000.0 * (v - base[k]) for k, v in clients[2].items()}
    # The robust screen off: DP's clipping alone bounds the outlier (with the default screen it
    # is rejected before the clipping, tests/server/test_robust_server.py).
    strategy = wrapped("server-clipping", noise=0.0, sampled=3, robust=RobustSettings("none"))
    start_round(strategy, base)  # type: ignore[arg-type]
    arrays, _ = strategy.aggregate_train(1, [reply(i + 1, c) for i, c in enumerate(clients)])
    got = as_tensors(arrays)
    # What the merge saw is every client clipped to norm CLIP; the raw outlier is not merged.
    want = expected_global(base, [clipped(base, c) for c in clients])
    raw = expected_global(base, clients)
    for key in base:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    assert norm({k: raw[k] - base[k] for k in base}) > 100 * norm(
        {k: got[k] - base[k] for k in base}
    )
    # RobustMerge sums lambda * A^ over clients: one client moves A by at most lambda * CLIP.
    a_keys = [k for k in base if "lora_A" in k]
    moved = norm({k: got[k] - base[k] for k in a_keys})
    assert moved <= 2.0 * CLIP * 3 + 1e-6


def test_noise_is_added_with_the_wrapper_std() -> None:
    base = make_global()
    clients = [trained(base, seed) for seed in (1, 2)]
    quiet = wrapped("server-clipping", noise=0.0, sampled=2)
    noisy = wrapped("server-clipping", noise=4.0, sampled=2)
    results = []
    for strategy in (quiet, noisy):
        start_round(strategy, base, nodes=2)  # type: ignore[arg-type]
        arrays, _ = strategy.aggregate_train(1, [reply(i + 1, c) for i, c in enumerate(clients)])
        results.append(as_tensors(arrays))
    diff = torch.cat([(results[1][k] - results[0][k]).flatten() for k in base])
    # std = 4.0 * 0.5 / 2 = 1.0 per entry; 192 entries
    assert 0.75 < float(diff.std()) < 1.3


def test_a_malformed_reply_is_rejected_and_the_round_goes_on() -> None:
    base = make_global()
    clients = [trained(base, seed) for seed in (1, 2, 3)]
    bad = dict(clients[1])
    first = next(iter(bad))
    bad[first] = torch.zeros(3, 3)
    strategy = wrapped("server-clipping", noise=0.0, sampled=3)
    start_round(strategy, base)  # type: ignore[arg-type]
    replies = [reply(1, clients[0]), reply(2, bad), reply(3, clients[2])]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    report = core_strategy(strategy).round_report()
    assert report is not None
    assert set(report.rejected) == {2}
    assert "shape" in report.rejected[2]
    want = expected_global(base, [clipped(base, clients[0]), clipped(base, clients[2])])
    got = as_tensors(arrays)
    for key in base:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_flowers_wrapper_alone_cannot_take_that_reply() -> None:
    """Why the screening exists: Flower's clipping zips arrays by position and breaks."""
    base = make_global()
    bad = dict(trained(base, 2))
    bad[next(iter(bad))] = torch.zeros(3, 3)
    strategy = DifferentialPrivacyServerSideFixedClipping(
        FedRobustMerge(device="cpu", server_lr=1.0), 0.0, CLIP, 2
    )
    start_round(strategy, base, nodes=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        strategy.aggregate_train(1, [reply(1, trained(base, 1)), reply(2, bad)])


def test_wrap_modes_and_sensitivity_factor() -> None:
    inner = FedRobustMerge(device="cpu", server_lr=0.5)
    assert (
        wrap_with_privacy(inner, "none", clipping_norm=1, noise_multiplier=1, num_sampled_clients=4)
        is inner
    )
    client = wrap_with_privacy(
        inner, "client-clipping", clipping_norm=1, noise_multiplier=1, num_sampled_clients=4
    )
    assert isinstance(client, ClientSideClipping)
    assert core_strategy(client) is inner
    assert isinstance(
        wrap_with_privacy(
            inner, "server-clipping", clipping_norm=1, noise_multiplier=1, num_sampled_clients=4
        ),
        ServerSideClipping,
    )
    with pytest.raises(ValueError, match="dp mode"):
        wrap_with_privacy(
            inner, "local", clipping_norm=1, noise_multiplier=1, num_sampled_clients=4
        )
    # eta lambda m sqrt(1 + (1 + sqrt(r))^2); r = 4: sqrt(1 + 9) = sqrt(10)
    assert robustmerge_sensitivity_factor(inner, 4, 4) == pytest.approx(0.5 * 2.0 * 4 * 10**0.5)
    fedavg = FedRobustMerge(merge_method="fedavg", device="cpu", server_lr=1.0)
    assert robustmerge_sensitivity_factor(fedavg, 4, 4) == 1.0
    equation = FedRobustMerge(mode="paper-equation", device="cpu", server_lr=1.0)
    assert robustmerge_sensitivity_factor(equation, 4, 4) is None


def test_client_side_wrapper_sends_the_clipping_norm() -> None:
    base = make_global()
    strategy = wrapped("client-clipping", noise=0.0, sampled=2)
    from tests.strategies.test_fed_robustmerge import FakeGrid

    messages = list(
        strategy.configure_train(1, ArrayRecord(dict(base)), ConfigRecord(), FakeGrid([1, 2]))  # type: ignore[arg-type]
    )
    assert messages and all(asks_for_clipping(m) for m in messages)
    assert messages[0].content[CONFIG][KEY_CLIPPING_NORM] == CLIP


def instruction(base: dict[str, torch.Tensor], config: dict[str, float], kind: str) -> Message:
    content = RecordDict({ARRAYS: ArrayRecord(dict(base)), CONFIG: ConfigRecord(config)})
    return Message(content, dst_node_id=1, message_type=kind)


def test_client_mod_clips_train_replies_only_when_asked() -> None:
    base = make_global()
    huge = {k: v + 50.0 for k, v in base.items()}

    def handler(msg: Message, _: Context) -> Message:
        return Message(RecordDict({ARRAYS: ArrayRecord(dict(huge))}), reply_to=msg)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    asked = instruction(base, {KEY_CLIPPING_NORM: CLIP, "server-round": 1}, MessageType.TRAIN)
    out = as_tensors(clip_when_asked(asked, context, handler).content[ARRAYS])
    assert norm({k: out[k] - base[k] for k in base}) == pytest.approx(CLIP, rel=1e-5)
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        plain = instruction(base, {SERVER_ROUND: 1}, kind)
        out = as_tensors(clip_when_asked(plain, context, handler).content[ARRAYS])
        assert all(torch.equal(out[k], huge[k]) for k in base)


def test_dp_with_sparse_uplink_is_refused() -> None:
    with pytest.raises(ConfigError, match="uplink = 'dense'"):
        ServerSettings.from_run_config({"dp": "server-clipping", "uplink": "sparse"})


def _clip(delta: dict[str, torch.Tensor], bound: float) -> dict[str, torch.Tensor]:
    factor = min(1.0, bound / norm(delta))
    return {k: v * factor for k, v in delta.items()}


@pytest.mark.parametrize("seed", range(12))
def test_robustmerge_sensitivity_bound_holds_for_one_added_client(seed: int) -> None:
    """Adding one clipped client moves the paper-exact merge by at most the documented bound,
    also for an adversarial client whose A rows make its scale s~ huge."""
    from strategies import merge_lora

    generator = torch.Generator().manual_seed(seed)
    rank, d_in, d_out, others = 4, 40, 24, 3
    keys = {"m.lora_A.weight": (rank, d_in), "m.lora_B.weight": (d_out, rank)}

    def client(adversarial: bool) -> dict[str, torch.Tensor]:
        delta = {k: torch.randn(shape, generator=generator) for k, shape in keys.items()}
        if adversarial:
            # one large entry per row of A and tiny others: pruning keeps ~1 entry per row, so
            # s = |row| / kept is large and this client's B columns dominate the normalisation
            delta["m.lora_A.weight"] = 1e-3 * delta["m.lora_A.weight"]
            delta["m.lora_A.weight"][:, 0] = 1.0
        return _clip(delta, CLIP)

    existing = [client(False) for _ in range(others)]
    newcomer = client(adversarial=seed % 2 == 0)
    before = merge_lora(existing, device="cpu", form="round")
    after = merge_lora([*existing, newcomer], device="cpu", form="round")
    moved = norm({k: after[k] - before[k] for k in keys})
    bound = 2.0 * CLIP * math.sqrt(1.0 + (1.0 + math.sqrt(rank)) ** 2)
    assert moved <= bound * (1 + 1e-5), (moved, bound)


def test_released_adapters_are_accounted_in_the_round_metrics() -> None:
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    base = make_global()
    strategy = wrapped("server-clipping", noise=40.0, sampled=2, server_lr=1.0)
    factor = robustmerge_sensitivity_factor(core_strategy(strategy), 2, 8)  # default rank
    assert factor is not None
    reference = RdpAccountant(
        PrivacyConfig(
            target_delta=1e-5,
            population_size=2,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    epsilons = []
    for server_round in (1, 2, 3):
        start_round(strategy, base, nodes=2, server_round=server_round)  # type: ignore[arg-type]
        clients = [trained(base, 10 * server_round + seed) for seed in (1, 2)]
        _, metrics = strategy.aggregate_train(
            server_round, [reply(i + 1, c) for i, c in enumerate(clients)]
        )
        assert metrics is not None
        epsilons.append(metrics["dp-epsilon"])
        assert metrics["dp-delta"] == pytest.approx(1e-5)
        reference.compose(GaussianPrivacyEvent(40.0 / factor, 2, 2))
        assert metrics["dp-epsilon"] == pytest.approx(reference.get_epsilon(1e-5))
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]


def test_no_ledger_without_noise_or_without_a_bound() -> None:
    quiet = wrapped("server-clipping", noise=0.0, sampled=2)
    assert getattr(quiet, "ledger", None) is None
    unbounded = wrap_with_privacy(
        FedRobustMerge(mode="paper-equation", device="cpu", server_lr=1.0),
        "server-clipping",
        clipping_norm=CLIP,
        noise_multiplier=1.0,
        num_sampled_clients=2,
    )
    assert getattr(unbounded, "ledger", None) is None
    history = [{"server-round": 1, "train": {"dp-epsilon": 3.0}}]
    assert restore_privacy_ledger(quiet, history) == 0


def test_resume_restores_the_releases_from_the_history() -> None:
    fresh = wrapped("client-clipping", noise=40.0, sampled=2)
    resumed = wrapped("client-clipping", noise=40.0, sampled=2)
    for _ in range(3):
        fresh.ledger.record_release()  # type: ignore[attr-defined]
    history = [
        {"server-round": 0},
        {"server-round": 1, "train": {"dp-epsilon": 1.0}},
        {"server-round": 2, "train": {"round-skipped": 1}},  # skipped: nothing released
        {"server-round": 3, "train": {"dp-epsilon": 2.0}},
        {"server-round": 4, "train": {"dp-epsilon": 3.0}},
    ]
    assert restore_privacy_ledger(resumed, history) == 3
    assert resumed.ledger.epsilon() == pytest.approx(fresh.ledger.epsilon())  # type: ignore[attr-defined]
