"""Centered clipping (robust-aggregation "centered-clip"): the pure functions on hand-checked
cases, and the strategy stage on mock replies (parity with the functions, what it bounds)."""

from __future__ import annotations

import pytest
import torch

from strategies import FedRobustMerge
from strategies.combinations import mixed_rank_refusal, robust_refusal
from strategies.robust import (
    DEFAULT_CENTER_RADIUS,
    ROBUST_AGGREGATIONS,
    RobustSettings,
    center_scales,
    clip_toward,
    coordinate_median,
)
from tests.strategies.test_fed_robustmerge import (
    as_tensors,
    make_global,
    reply,
    start_round,
    trained,
)

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def test_coordinate_median_odd_and_even() -> None:
    odd = torch.tensor([[1.0, -4.0], [5.0, 0.0], [3.0, 9.0]])
    torch.testing.assert_close(coordinate_median(odd), torch.tensor([3.0, 0.0]))
    # even: midpoint of the two middle values: (2 + 4) / 2 = 3, (0 + 1) / 2 = 0.5
    even = torch.tensor([[1.0, 0.0], [2.0, 1.0], [4.0, -7.0], [10.0, 8.0]])
    torch.testing.assert_close(coordinate_median(even), torch.tensor([3.0, 0.5]))


def test_center_scales_hand_checked() -> None:
    # lower median of 1, 2, 3, 10 is 2; tau = 2 x 2 = 4; only 10 is pulled in, to 4 / 10
    assert center_scales([1.0, 2.0, 3.0, 10.0], 2.0) == [1.0, 1.0, 1.0, 0.4]
    # radius 1: tau = 2; 3 -> 2 / 3, 10 -> 0.2
    assert center_scales([1.0, 2.0, 3.0, 10.0], 1.0) == pytest.approx([1.0, 1.0, 2 / 3, 0.2])
    assert center_scales([], 2.0) == []
    with pytest.raises(ValueError, match="radius"):
        center_scales([1.0], 0.5)


def test_clip_toward_hand_checked() -> None:
    delta, center = torch.tensor([10.0, 2.0]), torch.tensor([0.0, 2.0])
    torch.testing.assert_close(clip_toward(delta, center, 0.4), torch.tensor([4.0, 2.0]))
    assert clip_toward(delta, center, 1.0) is delta


def test_the_default_auto_is_centered_clipping_where_it_can_run_else_the_norm_screen() -> None:
    """ "auto" (the default) resolves once: centered clipping on the dense uplink at one rank
    without secure aggregation, the norm screen otherwise, saying why; other names stay."""
    assert RobustSettings().aggregation == "auto"
    with pytest.raises(ValueError, match="robust-aggregation 'auto' is chosen at start-up"):
        _ = RobustSettings().screens
    chosen = RobustSettings().resolve()
    assert chosen.aggregation == "centered-clip"
    assert chosen.chosen_by_auto == "every client's dense update at one rank reaches the server"
    assert chosen.describe().startswith("centered-clip (chosen by 'auto': every client's dense")
    blocked = {
        "sparse": RobustSettings().resolve(uplink="sparse"),
        "ranks": RobustSettings().resolve(mixes_ranks=True),
        "secagg": RobustSettings().resolve(secure_aggregation=True),
    }
    assert {name: s.aggregation for name, s in blocked.items()} == dict.fromkeys(blocked, "norm")
    assert blocked["sparse"].chosen_by_auto == (
        "centered clipping cannot run here: uplink 'sparse' sends deltas the clients already pruned"
    )
    assert "mixes LoRA ranks" in str(blocked["ranks"].chosen_by_auto)
    assert "only the sum of the updates" in str(blocked["secagg"].chosen_by_auto)
    explicit = RobustSettings("krum")
    assert explicit.resolve(uplink="sparse") is explicit
    assert FedRobustMerge(device="cpu").settings.robust.aggregation == "centered-clip"
    assert FedRobustMerge(device="cpu", uplink="sparse").settings.robust.aggregation == "norm"


def test_settings_register_centered_clipping() -> None:
    assert "centered-clip" in ROBUST_AGGREGATIONS
    settings = RobustSettings("centered-clip")
    assert settings.screens and settings.clips_to_center and settings.rewrites_coordinates
    assert not RobustSettings("median").clips_to_center
    assert "centered clip" in settings.describe()


def test_refused_where_deltas_cannot_be_rewritten() -> None:
    settings = RobustSettings("centered-clip")
    refusal = robust_refusal(settings, "sparse")
    assert refusal is not None and "centered-clip" in refusal
    assert robust_refusal(settings, "dense") is None


def test_refused_with_mixed_ranks() -> None:
    refusal = mixed_rank_refusal(
        "svd", "paper-exact", "delta", "dense", RobustSettings("centered-clip")
    )
    assert refusal is not None and "centered-clip" in refusal
    norm = RobustSettings("norm")
    assert mixed_rank_refusal("svd", "paper-exact", "delta", "dense", norm) is None
    chosen = mixed_rank_refusal("svd", "paper-exact", "delta", "dense", RobustSettings().resolve())
    assert chosen is not None
    assert chosen.startswith(
        "robust-aggregation 'centered-clip' (chosen by 'auto', which did not know the sites' "
        "ranks) compares or rewrites"
    )
    assert chosen.endswith(
        "or give the sites' ranks in run-config client-ranks (then 'auto' picks 'norm')"
    )


def _merged(
    replies: list[dict[str, torch.Tensor]],
    base: dict[str, torch.Tensor],
    aggregation: str,
    method: str = "fedavg",
) -> dict[str, torch.Tensor]:
    strategy = FedRobustMerge(
        device="cpu",
        merge_method=method,
        min_train_nodes=1,
        min_available_nodes=1,
        robust=RobustSettings(aggregation),
        server_lr=1.0,
    )
    start_round(strategy, base, nodes=len(replies))
    arrays, _ = strategy.aggregate_train(1, [reply(n + 1, r) for n, r in enumerate(replies)])
    return as_tensors(arrays)


def _flat(update: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([update[k].reshape(-1).to(torch.float64) for k in keys])


def test_strategy_stage_equals_the_functions_on_a_reversed_boosted_update() -> None:
    """fedavg after the stage = mean of the clipped deltas (computed here from the pure
    functions), server lr 1: the hostile update is pulled in, the honest ones are not."""
    base = make_global(0)
    keys = list(base)
    honest = [trained(base, seed) for seed in (2, 3, 4)]
    own = trained(base, 1)
    hostile = {k: base[k] - 9.0 * (own[k] - base[k]) for k in keys}  # under the screen's 10 x
    replies = [*honest, hostile]
    got = _merged(replies, base, "centered-clip")
    deltas = torch.stack([_flat({k: r[k] - base[k] for k in keys}, keys) for r in replies])
    center = coordinate_median(deltas)
    distances = (deltas - center).norm(dim=1).tolist()
    scales = center_scales(distances, DEFAULT_CENTER_RADIUS)
    assert scales[:3] == [1.0, 1.0, 1.0] and scales[3] < 0.5
    want = torch.stack([clip_toward(d, center, s) for d, s in zip(deltas, scales, strict=True)])
    mean = want.mean(dim=0)
    torch.testing.assert_close(_flat(got, keys) - _flat(base, keys), mean, rtol=1e-4, atol=1e-5)


def test_it_bounds_what_the_norm_screen_lets_through() -> None:
    """The reversed update at 9 x passes the norm screen and moves the merged update far from
    the honest ones' part; centered clipping keeps the hostile share c + s (d - c) within
    (||c|| + tau) / T of it (c the center, tau = radius x the median distance)."""
    base = make_global(0)
    keys = list(base)
    honest = [trained(base, seed) for seed in (2, 3, 4)]
    own = trained(base, 1)
    hostile = {k: base[k] - 9.0 * (own[k] - base[k]) for k in keys}
    deltas = torch.stack(
        [_flat({k: r[k] - base[k] for k in keys}, keys) for r in [*honest, hostile]]
    )
    center = coordinate_median(deltas)
    distances = sorted((deltas - center).norm(dim=1).tolist())
    tau = DEFAULT_CENTER_RADIUS * distances[1]  # lower median of 4
    bound = (float(center.norm()) + tau) / 4

    def off(aggregation: str) -> float:
        merged = _flat(_merged([*honest, hostile], base, aggregation), keys) - _flat(base, keys)
        return float((merged - deltas[:3].sum(dim=0) / 4).norm())

    assert off("centered-clip") <= bound * (1 + 1e-5)
    assert off("norm") > 3 * bound


def test_two_or_fewer_replies_are_unchanged() -> None:
    base = make_global(0)
    replies = [trained(base, 1), trained(base, 2)]
    got = _merged(replies, base, "centered-clip")
    want = _merged(replies, base, "norm")
    for key in base:
        torch.testing.assert_close(got[key], want[key])


def _pulled_in(
    replies: list[dict[str, torch.Tensor]], base: dict[str, torch.Tensor]
) -> list[dict[str, torch.Tensor]]:
    """Each reply after centered clipping, read plainly key by key in float32 (the center per
    key, the squared offsets summed per reply in float64, key after key)."""
    center: dict[str, torch.Tensor] = {}
    squared = [0.0] * len(replies)
    for key in base:
        stack = torch.stack([r[key] - base[key] for r in replies])
        center[key] = coordinate_median(stack)
        for row in range(len(replies)):
            squared[row] += float((stack[row] - center[key]).to(torch.float64).square().sum())
    scales = center_scales([value**0.5 for value in squared], DEFAULT_CENTER_RADIUS)
    return [
        {k: base[k] + clip_toward(r[k] - base[k], center[k], scale) for k in base}
        for r, scale in zip(replies, scales, strict=True)
    ]


@pytest.mark.parametrize("method", ["fedavg", "robustmerge", "ties"])
def test_a_centered_clip_round_is_the_streamed_fold_of_its_pulled_in_replies(
    method: str,
) -> None:
    """The buffered round folds the rewritten replies into the streamed round's exact sums: its
    new global is, bit for bit, a streamed round's (no defence) over the pulled-in replies, and
    the same for any arrival order."""
    base = make_global(0)
    honest = [trained(base, seed) for seed in (2, 3, 4, 5)]
    own = trained(base, 1)
    hostile = {k: base[k] - 9.0 * (own[k] - base[k]) for k in base}
    replies = [*honest, hostile]
    got = _merged(replies, base, "centered-clip", method)
    want = _merged(_pulled_in(replies, base), base, "none", method)
    backwards = _merged(replies[::-1], base, "centered-clip", method)
    for key in base:
        assert torch.equal(got[key], want[key]), key
        assert torch.equal(backwards[key], got[key]), key
