"""The robust screen on the server side: run-config keys, the DP wrappers (screen first, then
Flower's clipping), SecAgg+ (refused or documented as not applied), and a resume that restores the
screen's history bit for bit."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Message

from server.app import build_merge_strategy
from server.checkpoints import CheckpointStore
from server.config import ConfigError, ServerSettings
from server.privacy import wrap_with_privacy
from server.round_modes import MessageRounds
from server.run_loop import LoopSettings, run_federation
from server.secure_aggregation import check_secure_aggregation
from strategies import FedRobustMerge
from strategies.adapter_io.config import adapter_config_for
from strategies.robust import RobustSettings
from tests.messages import AnsweredOnPull
from tests.server.test_privacy import CLIP, clipped
from tests.strategies.test_fed_robustmerge import (
    as_tensors,
    expected_global,
    make_global,
    reply,
    start_round,
    trained,
)

pytestmark = pytest.mark.usefixtures("flower_task_identity")


# --- run config


def test_robust_keys_are_read_and_reach_the_strategy() -> None:
    settings = ServerSettings.from_run_config(
        {
            "robust-aggregation": "krum",
            "robust-norm-factor": 4.0,
            "robust-clip": True,
            "robust-history": 9,
            "robust-krum-malicious": 2,
            "robust-krum-select": 3,
            "robust-trim-fraction": 0.1,
        }
    )
    assert settings.robust == RobustSettings("krum", 4.0, True, 9, 2, 3, 0.1)
    strategy = build_merge_strategy(settings)
    assert strategy.settings.robust == settings.robust and strategy.stages.norm_history.maxlen == 9
    assert ServerSettings.from_run_config({}).robust == RobustSettings().resolve()
    assert ServerSettings.from_run_config({}).robust.aggregation == "centered-clip"
    assert ServerSettings.from_run_config({"uplink": "sparse"}).robust.aggregation == "norm"
    mixed = ServerSettings.from_run_config({"merge-method": "svd", "client-ranks": "4,8"})
    assert mixed.robust == RobustSettings().resolve(mixes_ranks=True)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("robust-aggregation", "bulyan", "one of"),
        ("robust-norm-factor", 0.5, "[1, inf)"),
        ("robust-clip", "yes", "true or false"),
        ("robust-history", -1, ">= 0"),
        ("robust-krum-select", 1.5, "integer"),
        ("robust-trim-fraction", 0.5, "[0, 0.5)"),
    ],
)
def test_bad_robust_values_name_the_key(key: str, value: object, allowed: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(allowed)) as caught:
        ServerSettings.from_run_config({key: value})
    assert repr(key) in str(caught.value)


def test_sparse_uplink_refuses_clip_and_coordinate_stages_at_start() -> None:
    with pytest.raises(ConfigError, match="robust-clip"):
        ServerSettings.from_run_config({"uplink": "sparse", "robust-clip": True})
    with pytest.raises(ConfigError, match="'trimmed-mean'"):
        ServerSettings.from_run_config({"uplink": "sparse", "robust-aggregation": "trimmed-mean"})
    ServerSettings.from_run_config({"uplink": "sparse", "robust-aggregation": "krum"})


# --- differential privacy


def _dp(mode: str, sampled: int = 3) -> Any:
    return wrap_with_privacy(
        FedRobustMerge(device="cpu", server_lr=1.0),
        mode,
        clipping_norm=CLIP,
        noise_multiplier=0.0,
        num_sampled_clients=sampled,
    )


def _norm(delta: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().square().sum()) for v in delta.values()))


def test_under_server_clipping_the_screen_rejects_before_flowers_clipping() -> None:
    base = make_global()
    clients = [trained(base, seed) for seed in (1, 2, 3)]
    clients[2] = {k: base[k] + 1e6 * (v - base[k]) for k, v in clients[2].items()}
    strategy = _dp("server-clipping")
    start_round(strategy, base)
    arrays, metrics = strategy.aggregate_train(1, [reply(i + 1, c) for i, c in enumerate(clients)])
    assert metrics is not None
    assert metrics["clients-rejected"] == 1 and metrics["robust-screened"] == 1
    core = strategy.strategy
    assert "robust-norm-factor" in core.round_report().rejected[3]
    # the merge saw the two good clients, clipped by DP
    want = expected_global(base, [clipped(base, c) for c in clients[:2]])
    for key in base:
        torch.testing.assert_close(as_tensors(arrays)[key], want[key], rtol=1e-5, atol=1e-6)
    # the history holds the raw (pre-clipping) norms of the merged clients, once each
    raw = sorted(_norm({k: c[k] - base[k] for k in base}) for c in clients[:2])
    assert sorted(core.stages.norm_history) == pytest.approx(raw)


def test_under_client_clipping_the_screen_also_runs_first() -> None:
    base = make_global()
    # clients clip themselves: a good client's update arrives at norm <= CLIP
    good = [clipped(base, trained(base, seed)) for seed in (1, 2)]
    bad = {k: base[k] + 1e6 * (v - base[k]) for k, v in trained(base, 3).items()}
    strategy = _dp("client-clipping")
    start_round(strategy, base)
    messages = [reply(i + 1, c) for i, c in enumerate([*good, bad])]
    for message in messages:
        message.content["metrics"]["clipping_norm"] = CLIP  # what fixedclipping_mod reports
    _, metrics = strategy.aggregate_train(1, messages)
    assert metrics is not None and metrics["robust-screened"] == 1


# --- secure aggregation


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("robust-aggregation", "krum"),
        ("robust-aggregation", "median"),
        ("robust-aggregation", "trimmed-mean"),
        ("robust-clip", True),
    ],
)
def test_secure_aggregation_refuses_stages_that_need_single_updates(key: str, value: Any) -> None:
    settings = ServerSettings.from_run_config({"secure-aggregation": True, key: value})
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        check_secure_aggregation(settings)


def test_secure_aggregation_starts_with_the_default_screen_and_says_it_is_not_applied(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flower = logging.getLogger("flwr")
    flower.addHandler(caplog.handler)
    try:
        check_secure_aggregation(ServerSettings.from_run_config({"secure-aggregation": True}))
        assert "NOT applied under secure aggregation" in caplog.text
        assert "secagg-clipping-range" in caplog.text
        caplog.clear()
        check_secure_aggregation(
            ServerSettings.from_run_config(
                {"secure-aggregation": True, "robust-aggregation": "none"}
            )
        )
        assert "NOT applied" not in caplog.text
    finally:
        flower.removeHandler(caplog.handler)


# --- resume


ADAPTER_CONFIG = adapter_config_for(None, 4, 8, ["query", "value"])


class CannedGrid(AnsweredOnPull):
    """Every node answers a train message with a fixed function of (round, node, global)."""

    def __init__(self, nodes: int, scale: dict[tuple[int, int], float]) -> None:
        self.nodes = nodes
        self.scale = scale

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.nodes + 1))

    def answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        server_round = int(message.content["config"]["server-round"])  # type: ignore[arg-type]
        base = {k: v.float() for k, v in message.content["arrays"].to_torch_state_dict().items()}
        client = trained(base, 100 * server_round + node)
        factor = self.scale.get((server_round, node), 1.0)
        canned = reply(node, {k: base[k] + factor * (client[k] - base[k]) for k in base})
        return Message(canned.content, reply_to=message)


def _federate(run_dir: Path, rounds: int, resume: bool, grid: CannedGrid) -> FedRobustMerge:
    strategy = FedRobustMerge(device="cpu", fraction_evaluate=0.0, server_lr=1.0)
    store = CheckpointStore(run_dir, ADAPTER_CONFIG)
    run_federation(
        grid,  # type: ignore[arg-type]
        MessageRounds(strategy),
        LoopSettings(num_rounds=rounds, round_timeout=1.0, run_dir=run_dir, resume=resume),
        initial=make_global(),
        store=store,
        summary={},
    )
    return strategy


def test_resume_restores_the_norm_history_and_the_same_decisions(tmp_path: Path) -> None:
    """Round 3's two replies are both small, one 24 times the other: judged against this round
    alone the larger is rejected; against the history (rounds 1-2) both are ordinary. A resume
    after round 2 must decide as the uninterrupted run does."""
    scale = {(3, 1): 0.05, (3, 2): 1.2}
    whole = _federate(tmp_path / "whole", 3, False, CannedGrid(2, scale))
    _federate(tmp_path / "cut", 2, False, CannedGrid(2, scale))
    resumed = _federate(tmp_path / "cut", 3, True, CannedGrid(2, scale))
    assert len(resumed.stages.norm_history) == 6  # 4 restored from round 2's checkpoint, 2 new
    assert list(resumed.stages.norm_history) == list(whole.stages.norm_history)
    assert not resumed.round_report().rejected
    final = {
        name: CheckpointStore(tmp_path / name, ADAPTER_CONFIG).latest_valid()
        for name in ("whole", "cut")
    }
    assert final["whole"] is not None and final["cut"] is not None
    assert final["cut"].server_round == 3
    for key, value in final["whole"].tensors.items():
        assert torch.equal(final["cut"].tensors[key], value)
    saved = final["cut"].state["strategy"]["robust"]["norm-history"]
    assert saved == list(whole.stages.norm_history)
