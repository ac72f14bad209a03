"""FedRobustMerge with sites of different LoRA ranks (issue 16): which replies it accepts, what
it merges (``rank_rounds.merge_mixed_ranks`` on what each site started from), what it reports, and
which settings it refuses."""

from __future__ import annotations

import pytest
import torch

from protocol.wire import LORA_RANK
from strategies import FedRobustMerge
from strategies.combinations import mixed_rank_refusal
from strategies.merging import create_method
from strategies.merging.rank_rounds import merge_mixed_ranks
from strategies.merging.ranks import adapter_at_rank
from strategies.robust import RobustSettings
from tests.strategies.test_fed_robustmerge import as_tensors, reply, start_round

# What "auto" picks when client-ranks mixes ranks; a library strategy cannot know the sites'
# ranks, so a mixed-rank federation built in code names it.
MIXED_RANK_SCREEN = RobustSettings("norm")

MODULES = ("base_model.model.layer.0.query", "base_model.model.layer.1.value")
GLOBAL_RANK = 16
D_OUT, D_IN = 20, 24
PRODUCT_METHODS = [
    ("svd", "paper-exact"),
    ("exact-mean", "paper-exact"),
    ("robustmerge", "paper-equation"),
]

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def make_global(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    adapter: dict[str, torch.Tensor] = {}
    for name in MODULES:
        adapter[f"{name}.lora_A.weight"] = torch.randn(GLOBAL_RANK, D_IN, generator=g)
        adapter[f"{name}.lora_B.weight"] = 0.1 * torch.randn(D_OUT, GLOBAL_RANK, generator=g)
    return adapter


def site_reply(node: int, base: dict[str, torch.Tensor], rank: int, seed: int, **kw: object):
    start = adapter_at_rank(base, rank).tensors
    g = torch.Generator().manual_seed(seed)
    tensors = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    declared = kw.pop("declared", rank)
    extra = {} if declared is None else {LORA_RANK: declared}
    return tensors, reply(node, tensors, extra_metrics=extra, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("method", "mode"), PRODUCT_METHODS)
def test_a_round_of_ranks_4_8_16_is_merge_mixed_ranks(method: str, mode: str) -> None:
    base = make_global()
    strategy = FedRobustMerge(
        robust=MIXED_RANK_SCREEN, merge_method=method, mode=mode, server_lr=0.8, device="cpu"
    )
    start_round(strategy, base, nodes=3)
    ranks = {1: 4, 2: 8, 3: 16}
    clients, messages = {}, []
    for node, rank in ranks.items():
        clients[node], message = site_reply(node, base, rank, seed=node)
        messages.append(message)
    arrays, metrics = strategy.aggregate_train(1, messages)
    got = as_tensors(arrays)
    assert metrics is not None and metrics["clients-accepted"] == 3
    weighted = method in ("svd", "exact-mean")  # they weight by num-examples (all 100 here)
    round_method = create_method(method, **({"mode": mode} if method == "robustmerge" else {}))
    # The strategy merges in content order; the merge does not depend on client order.
    order = sorted(ranks)
    for module in MODULES:
        a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        sent = {}
        for rank in (4, 8, 16):
            start = adapter_at_rank(base, rank).tensors
            sent[rank] = (start[b_key], start[a_key])
        want = merge_mixed_ranks(
            round_method.round_form(),
            base[a_key],
            base[b_key],
            [clients[n][a_key] for n in order],
            [clients[n][b_key] for n in order],
            [100.0] * 3 if weighted else None,
            server_lr=0.8,
            sent=sent,
        )
        torch.testing.assert_close(got[a_key], want.a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[b_key], want.b, rtol=1e-5, atol=1e-6)
        assert tuple(got[a_key].shape) == (GLOBAL_RANK, D_IN)
    report = strategy.round_report(1)
    assert report.site_ranks == ranks
    assert report.site_truncation_errors[3] == 0.0
    assert report.site_truncation_errors[1] == adapter_at_rank(base, 4).relative_error > 0
    assert report.site_truncation_errors[1] > report.site_truncation_errors[2] > 0
    record = report.to_json()
    assert record["site-ranks"] == {"1": 4, "2": 8, "3": 16}
    assert set(record["site-truncation-errors"]) == {"1", "2", "3"}
    assert metrics["site-truncation-error-max"] == report.site_truncation_errors[1]
    assert LORA_RANK not in metrics  # a rank is no metric to average


def test_wrong_declared_rank_or_shapes_are_rejected_with_a_reason() -> None:
    base = make_global()
    strategy = FedRobustMerge(merge_method="svd", device="cpu", robust=RobustSettings("none"))
    start_round(strategy, base, nodes=7)
    _, good = site_reply(1, base, 8, seed=1)
    _, lies = site_reply(2, base, 8, seed=2, declared=4)  # tensors of rank 8, says 4
    _, above = site_reply(3, base, 8, seed=3, declared=32)
    _, undeclared = site_reply(4, base, 8, seed=4, declared=None)  # no lora-rank: the global's
    tensors, _ = site_reply(5, base, 8, seed=5)
    tensors[f"{MODULES[1]}.lora_B.weight"] = torch.zeros(D_OUT, 4)
    mixed = reply(5, tensors, extra_metrics={LORA_RANK: 8})
    _, fractional = site_reply(6, base, 8, seed=6, declared=7.5)
    _, not_a_number = site_reply(7, base, 8, seed=7, declared=float("nan"))
    strategy.aggregate_train(1, [good, lies, above, undeclared, mixed, fractional, not_a_number])
    report = strategy.round_report(1)
    assert report.accepted_nodes == [1]
    assert "shape (4, 24)" not in report.rejected[2]
    assert "expected (4, 24) at the declared lora-rank 4" in report.rejected[2]
    assert "lora-rank 32 is above the global adapter's rank 16" in report.rejected[3]
    assert "expected (16, 24) at the declared lora-rank 16" in report.rejected[4]
    assert "expected (20, 8) at the declared lora-rank 8" in report.rejected[5]
    assert "lora-rank must be an integer >= 1, got 7.5" in report.rejected[6]
    assert "lora-rank must be an integer >= 1, got nan" in report.rejected[7]


def test_a_factor_wise_method_rejects_other_ranks_with_the_reason() -> None:
    base = make_global()
    strategy = FedRobustMerge(robust=MIXED_RANK_SCREEN, merge_method="fedavg", device="cpu")
    start_round(strategy, base, nodes=2)
    _, low = site_reply(1, base, 8, seed=1)
    _, full = site_reply(2, base, 16, seed=2)
    arrays, _ = strategy.aggregate_train(1, [low, full])
    report = strategy.round_report(1)
    assert report.accepted_nodes == [2]
    assert "lora-rank 8 differs from the global adapter's rank 16" in report.rejected[1]
    assert "fedavg cannot merge clients of different ranks" in report.rejected[1]
    assert arrays is not None


def test_the_norm_screen_measures_each_site_against_what_it_started_from() -> None:
    base = make_global()
    strategy = FedRobustMerge(robust=MIXED_RANK_SCREEN, merge_method="svd", device="cpu")
    start_round(strategy, base, nodes=3)
    messages = [
        site_reply(node, base, rank, seed=node)[1] for node, rank in [(1, 4), (2, 8), (3, 16)]
    ]
    strategy.aggregate_train(1, messages)
    report = strategy.round_report(1)
    assert report.accepted_nodes == [1, 2, 3]
    # Each update is 0.05 x N(0, 1) on its own factors: the norm grows with the rank, and is
    # nowhere near the global's own size (which a comparison against the rank-16 global gives).
    norms = report.update_norms
    assert norms[1] < norms[2] < norms[3] < 0.05 * 2 * (2 * (D_OUT + D_IN) * 16) ** 0.5


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"merge_method": "fedavg"}, "fedavg cannot merge clients of different ranks"),
        ({"merge_method": "robustmerge"}, "paper-exact RobustMerge merges A and B factor-wise"),
        ({"merge_method": "ties"}, "ties cannot merge"),
        ({"merge_method": "svd", "merge_target": "adapter"}, "merge-target 'adapter'"),
        ({"merge_method": "svd", "robust": RobustSettings("krum")}, "robust-aggregation 'krum'"),
        (
            {"merge_method": "svd", "robust": RobustSettings("median")},
            "robust-aggregation 'median'",
        ),
        (
            {"merge_method": "svd", "robust": RobustSettings("trimmed-mean")},
            "robust-aggregation 'trimmed-mean'",
        ),
        (
            {"merge_method": "svd", "robust": RobustSettings("norm", clip=True)},
            "robust-clip = true",
        ),
        ({"merge_method": "svd", "dp": "server-clipping"}, "dp 'server-clipping'"),
        (
            {"merge_method": "robustmerge", "mode": "paper-equation", "uplink": "sparse"},
            "uplink 'sparse'",
        ),
    ],
)
def test_mixed_rank_refusals_name_the_setting(settings: dict[str, object], needle: str) -> None:
    args = {
        "merge_method": "svd",
        "mode": "paper-exact",
        "merge_target": "delta",
        "uplink": "dense",
        "robust": MIXED_RANK_SCREEN,
        "dp": "none",
        **settings,
    }
    refusal = mixed_rank_refusal(**args)  # type: ignore[arg-type]
    assert refusal is not None and needle in refusal


@pytest.mark.parametrize(("method", "mode"), PRODUCT_METHODS)
def test_product_methods_with_the_norm_screen_take_mixed_ranks(method: str, mode: str) -> None:
    assert mixed_rank_refusal(method, mode, "delta", "dense", MIXED_RANK_SCREEN) is None
    assert mixed_rank_refusal(method, mode, "delta", "dense", RobustSettings("none")) is None


def test_a_node_that_changes_its_rank_is_rejected_and_the_ranks_are_checkpointed() -> None:
    base = make_global()
    strategy = FedRobustMerge(robust=MIXED_RANK_SCREEN, merge_method="svd", device="cpu")
    start_round(strategy, base, nodes=2)
    strategy.aggregate_train(1, [site_reply(1, base, 4, 1)[1], site_reply(2, base, 16, 2)[1]])
    assert strategy.robust_state()["node-ranks"] == {"1": 4, "2": 16}
    start_round(strategy, base, nodes=2, server_round=2)
    strategy.aggregate_train(2, [site_reply(1, base, 8, 3)[1], site_reply(2, base, 16, 4)[1]])
    report = strategy.round_report(2)
    assert report.accepted_nodes == [2]
    assert "lora-rank 8, but this node trained rank 4 in earlier rounds" in report.rejected[1]
    resumed = FedRobustMerge(robust=MIXED_RANK_SCREEN, merge_method="svd", device="cpu")
    resumed.restore_robust_state(strategy.robust_state())
    assert resumed.admission.node_ranks == {1: 4, 2: 16}


def test_a_dp_wrapper_prescreen_takes_only_the_global_rank() -> None:
    """Flower's DP wrappers clip each update against the global's shapes, so the pre-screen
    they call rejects a reply of another rank, saying why."""
    base = make_global()
    strategy = FedRobustMerge(robust=MIXED_RANK_SCREEN, merge_method="svd", device="cpu")
    start_round(strategy, base, nodes=2)
    kept, rejected = strategy.screen_train_replies(
        1, [site_reply(1, base, 4, 1)[1], site_reply(2, base, 16, 2)[1]]
    )
    assert [m.metadata.src_node_id for m in kept] == [2]
    assert "Flower's DP wrappers clip each update against the global adapter" in rejected[1]
