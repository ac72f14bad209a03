"""Personalization "shared-a" on the server (issue 27): replies carry every LoRA A and no B; the
server reads each B as the global's (a zero update), merges A with the chosen method, and
refuses what cannot work with the reason."""

from __future__ import annotations

import pytest
import torch

from server.config import ConfigError, ServerSettings
from strategies import FedRobustMerge
from strategies.robust import RobustSettings
from tests.server.test_config import project_config
from tests.strategies.test_fed_robustmerge import (
    A0,
    A1,
    B0,
    as_tensors,
    make_global,
    reply,
    start_round,
    trained,
)

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def a_only(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in tensors.items() if ".lora_A." in key}


def with_global_b(
    tensors: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    return {key: base[key] if ".lora_B." in key else value for key, value in tensors.items()}


@pytest.mark.parametrize("method", ["robustmerge", "fedavg", "ties", "dare"])
@pytest.mark.parametrize("streamed", [False, True])
def test_a_only_replies_merge_as_whole_replies_whose_b_is_the_global(
    method: str, streamed: bool
) -> None:
    base = make_global(3)
    clients = [trained(base, seed) for seed in (11, 12, 13)]
    robust = RobustSettings("norm", history=0 if not streamed else 64)
    shared = FedRobustMerge(device="cpu", merge_method=method, robust=robust, server_lr=1.0)
    shared_a = FedRobustMerge(
        device="cpu",
        merge_method=method,
        robust=robust,
        server_lr=1.0,
        personalization="shared-a",
    )
    results = []
    for strategy, sent in (
        (shared, [with_global_b(c, base) for c in clients]),
        (shared_a, [a_only(c) for c in clients]),
    ):
        start_round(strategy, base)
        replies = [reply(node + 1, tensors) for node, tensors in enumerate(sent)]
        record, _ = strategy.aggregate_train(1, iter(replies) if streamed else replies)
        assert not strategy.round_report(1).rejected
        results.append(as_tensors(record))
    whole, a_shared = results
    for key in base:  # equal up to the summation order (buffered rounds sort by content)
        torch.testing.assert_close(a_shared[key], whole[key], rtol=1e-6, atol=1e-7)
    assert torch.equal(a_shared[B0], base[B0])  # B stays the global's
    assert not torch.equal(a_shared[A0], base[A0])  # A moved


def test_a_reply_that_sends_its_b_or_lacks_an_a_is_rejected_with_the_reason() -> None:
    base = make_global(4)
    strategy = FedRobustMerge(device="cpu", personalization="shared-a", server_lr=1.0)
    start_round(strategy, base, nodes=4)
    client = trained(base, 21)
    lacking = {key: value for key, value in a_only(client).items() if key != A1}
    replies = [
        reply(1, a_only(client)),
        reply(2, a_only(trained(base, 22))),
        reply(3, client),  # the whole adapter: its B leaks the site's own part
        reply(4, lacking),
    ]
    strategy.aggregate_train(1, replies)
    rejected = strategy.round_report(1).rejected
    assert set(rejected) == {3, 4}
    assert "personalization = 'shared-a'" in rejected[3] and ".lora_B." in rejected[3]
    assert rejected[4].startswith("missing key") and A1 in rejected[4]


def test_without_shared_a_an_a_only_reply_is_rejected() -> None:
    base = make_global(5)
    strategy = FedRobustMerge(device="cpu", server_lr=1.0)
    start_round(strategy, base, nodes=2)
    strategy.aggregate_train(1, [reply(1, a_only(trained(base, 1))), reply(2, trained(base, 2))])
    assert set(strategy.round_report(1).rejected) == {1}


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"merge-method": "svd"}, "merges the products"),
        ({"merge-mode": "paper-equation"}, "merges the products"),
        ({"uplink": "sparse"}, "uplink 'sparse'"),
        ({"client-ranks": "4,8"}, "client-ranks"),
        ({"secure-aggregation": True}, "secure-aggregation"),
        ({"dp": "server-clipping"}, "dp = 'server-clipping'"),
        ({"server-eval": True}, "server-eval"),
    ],
)
def test_shared_a_refuses_what_needs_every_sites_b(
    overrides: dict[str, object], named: str
) -> None:
    config = {
        **project_config(),
        "personalization": "shared-a",
        "fraction-evaluate": 1.0,
        "server-eval": False,
        **overrides,
    }
    with pytest.raises(ConfigError, match="shared-a") as raised:
        ServerSettings.from_run_config(config)
    assert named in str(raised.value)


def test_shared_a_runs_with_the_defaults_otherwise() -> None:
    config = {
        **project_config(),
        "personalization": "shared-a",
        "fraction-evaluate": 1.0,
        "server-eval": False,
    }
    settings = ServerSettings.from_run_config(config)
    assert settings.personalization == "shared-a"
