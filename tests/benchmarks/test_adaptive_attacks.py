"""The adaptive attacks' math on hand-checked cases, the hooks that run them against the real
strategy on mock replies, and (slow) a tiny benchmark run that resumes and reports."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks import adaptive_attacks as aa
from benchmarks.adaptive_attacks_run import AdaptiveConfig, screen_order
from benchmarks.attacks import (
    ADAPTIVE_ATTACKS,
    AttackHooks,
    RoundView,
    share_setup,
    under_bound_reversed,
)
from strategies import FedRobustMerge
from strategies.robust import RobustSettings
from tests.strategies.test_fed_robustmerge import make_global, reply, start_round, trained

pytestmark = pytest.mark.usefixtures("flower_task_identity")


# ----------------------------------------------------------------------------- ALIE, IPM


@pytest.mark.parametrize(
    ("clients", "hostile", "z"),
    [
        # s = floor(4 / 2 + 1) - 1 = 2; Phi^-1((4 - 2) / 4) = Phi^-1(0.5) = 0: the mean itself
        (4, 1, 0.0),
        # s = 5 - 2 = 3; Phi^-1(5 / 8) = 0.318639
        (8, 2, 0.3186393639643752),
        # s = 9 - 4 = 5; Phi^-1(11 / 16) = 0.488776
        (16, 4, 0.4887764111146695),
        # the paper's example, n = 50, m = 12: s = 26 - 12 = 14; Phi^-1(36 / 50) = 0.582842
        (50, 12, 0.5828415072712162),
    ],
)
def test_alie_z_is_the_papers_formula(clients: int, hostile: int, z: float) -> None:
    assert aa.alie_z(clients, hostile) == pytest.approx(z, abs=1e-9)


def test_alie_z_refuses_impossible_shares() -> None:
    with pytest.raises(ValueError, match="hostile"):
        aa.alie_z(4, 0)
    with pytest.raises(ValueError, match="hostile"):
        aa.alie_z(4, 4)


def test_alie_is_mean_minus_z_unbiased_std() -> None:
    honest = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float64)
    # mean (2, 4); unbiased std (sqrt 2, 2 sqrt 2)
    got = aa.alie(honest, 1.5)
    want = torch.tensor([2 - 1.5 * math.sqrt(2), 4 - 3 * math.sqrt(2)], dtype=torch.float64)
    torch.testing.assert_close(got, want)


def test_ipm_points_against_the_honest_mean() -> None:
    honest = torch.tensor([[1.0, 0.0], [3.0, 2.0]], dtype=torch.float64)
    got = aa.ipm(honest, 0.1)
    torch.testing.assert_close(got, torch.tensor([-0.2, -0.1], dtype=torch.float64))
    assert float(got @ honest.mean(dim=0)) < 0


# ----------------------------------------------------------------------------- min-max, min-sum


def test_perturbations() -> None:
    honest = torch.tensor([[0.0, 0.0], [6.0, 8.0]], dtype=torch.float64)
    # mean (3, 4), norm 5; unbiased std (3 sqrt 2, 4 sqrt 2)
    torch.testing.assert_close(
        aa.perturbation(honest, "unit-mean"), torch.tensor([-0.6, -0.8], dtype=torch.float64)
    )
    torch.testing.assert_close(
        aa.perturbation(honest, "std"),
        -math.sqrt(2) * torch.tensor([3.0, 4.0], dtype=torch.float64),
    )
    with pytest.raises(ValueError, match="perturbation"):
        aa.perturbation(honest, "sign")


def test_min_max_and_min_sum_hand_checked() -> None:
    # honest (0, 0) and (2, 0): mean (1, 0), p = -(1, 0); the malicious update (1 - g, 0).
    # min-max: max((1 - g)^2, (1 + g)^2) = (1 + g)^2 <= max pairwise 4  ->  g* = 1
    # min-sum: (1 - g)^2 + (1 + g)^2 = 2 + 2 g^2 <= max_i sum_j 4 = 4  ->  g* = 1
    honest = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    direction = aa.perturbation(honest, "unit-mean")
    assert aa.min_max_gamma(honest, direction) == pytest.approx(1.0, rel=1e-4)
    assert aa.min_sum_gamma(honest, direction) == pytest.approx(1.0, rel=1e-4)
    torch.testing.assert_close(
        aa.min_max(honest), torch.tensor([0.0, 0.0], dtype=torch.float64), atol=1e-4, rtol=0
    )
    # std: (0, 0), (2, 2): p = -(sqrt 2, sqrt 2), update (1 - sqrt2 g) (1, 1);
    # min-max: 2 (1 + sqrt2 g)^2 <= 8  ->  g* = 1 / sqrt 2
    square = torch.tensor([[0.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    got = aa.min_max_gamma(square, aa.perturbation(square, "std"))
    assert got == pytest.approx(1 / math.sqrt(2), rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["unit-mean", "std"])
def test_gamma_meets_its_constraint_at_the_bisections_tolerance(seed: int, kind: str) -> None:
    generator = torch.Generator().manual_seed(seed)
    honest = torch.randn(5, 40, generator=generator, dtype=torch.float64) + 0.3
    direction = aa.perturbation(honest, kind)
    mean = honest.mean(dim=0)
    tolerance = 1e-5

    def distances(gamma: float) -> torch.Tensor:
        return (honest - (mean + gamma * direction)).square().sum(dim=1)

    pairwise = torch.cdist(honest, honest).square()
    gamma = aa.min_max_gamma(honest, direction, tolerance)
    assert gamma > 0
    assert float(distances(gamma).max()) <= float(pairwise.max())
    assert float(distances(gamma / (1 - tolerance)).max()) > float(pairwise.max())
    gamma = aa.min_sum_gamma(honest, direction, tolerance)
    assert gamma > 0
    assert float(distances(gamma).sum()) <= float(pairwise.sum(dim=1).max())
    assert float(distances(gamma / (1 - tolerance)).sum()) > float(pairwise.sum(dim=1).max())


def test_largest_feasible_finds_gammas_beyond_the_papers_reach() -> None:
    # The paper's code bisects from 10 with halving steps and cannot pass 20.
    assert aa.largest_feasible(lambda g: g <= 123.4) == pytest.approx(123.4, rel=1e-4)
    assert aa.largest_feasible(lambda g: g <= 0.001) == pytest.approx(0.001, rel=1e-4)
    assert aa.largest_feasible(lambda g: g == 0.0) == 0.0


# ----------------------------------------------------------------------------- the screen's bound


def test_screen_bound_puts_the_hostile_norms_at_the_top() -> None:
    # pool 1, 2, 3, top: lower median (4 - 1) // 2 = 1 -> 2; bound 10 x 2
    assert aa.screen_bound([1.0, 2.0, 3.0], [], 1, 10.0, streamed=False) == 20.0
    # with three hostile: 1, 2, 3, top, top, top -> index 2 -> 3
    assert aa.screen_bound([1.0, 2.0, 3.0], [], 3, 10.0, streamed=False) == 30.0
    # history 0.5, 0.6 joins the pool: 0.5, 0.6, 1, 2, 3, top -> index 2 -> 1
    assert aa.screen_bound([1.0, 2.0, 3.0], [0.5, 0.6], 1, 10.0, streamed=False) == 10.0
    # a streamed round: the history alone, 1 and 4 -> 1
    assert aa.screen_bound([7.0, 8.0], [1.0, 4.0], 1, 10.0, streamed=True) == 10.0
    # streamed but under two remembered norms: the round's pool
    assert aa.screen_bound([7.0, 8.0], [1.0], 1, 2.0, streamed=True) == 14.0
    # a first round of 5 replies over a pool of 3: the first three arrivals, 1, 2, 3 -> 2
    assert aa.screen_bound([1.0, 2.0, 3.0, 4.0], [], 1, 10.0, streamed=True, pool=3) == 20.0
    # the same round buffered (a stage holds every reply): 1, 2, 3, 4, top -> 3
    assert aa.screen_bound([1.0, 2.0, 3.0, 4.0], [], 1, 10.0, streamed=False, pool=3) == 30.0
    # a round no larger than the pool is judged by all of it
    assert aa.screen_bound([1.0, 2.0], [], 1, 10.0, streamed=True, pool=3) == 20.0


def test_cap_norm_and_scale_to() -> None:
    vector = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert float(aa.cap_norm(vector, 2.0).norm()) == pytest.approx(aa.UNDER * 2.0)
    assert torch.equal(aa.cap_norm(vector, 10.0), vector)
    assert torch.equal(aa.cap_norm(vector, None), vector)
    assert float(aa.scale_to(vector, 10.0).norm()) == pytest.approx(10.0)
    zero = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(aa.scale_to(zero, 3.0), zero)


def test_flatten_round_trips() -> None:
    adapter = make_global(3)
    keys = list(adapter)
    back = aa.unflatten(aa.flatten(adapter, keys), adapter)
    assert all(torch.equal(back[k], adapter[k]) for k in keys)
    with pytest.raises(ValueError, match="values"):
        aa.unflatten(torch.zeros(3), adapter)


def _round_under_the_screen(scale_of_bound: float) -> list[int]:
    """Round 1 of the default strategy, 3 honest replies and one reversed update scaled to
    ``scale_of_bound`` x the bound the attacker predicts; the nodes the screen rejected."""
    base = make_global(0)
    honest = [trained(base, seed) for seed in (2, 3, 4)]
    own = trained(base, 1)
    keys = list(base)
    norms = [aa.update_norm({k: h[k] - base[k] for k in keys}) for h in honest]
    bound = aa.screen_bound(norms, [], 1, RobustSettings("norm").norm_factor, streamed=False)
    assert bound is not None
    own_delta = aa.flatten({k: own[k] - base[k] for k in keys}, keys)
    view = RoundView(torch.zeros(3, own_delta.numel()), own_delta, 4, 1, bound)
    crafted = under_bound_reversed(view)
    assert float(crafted @ own_delta) < 0  # reversed
    delta = aa.unflatten(aa.scale_to(crafted, scale_of_bound * bound), base)
    hostile = {k: base[k] + delta[k] for k in keys}
    strategy = FedRobustMerge(device="cpu", min_train_nodes=1, min_available_nodes=1, server_lr=1.0)
    start_round(strategy, base, nodes=4)
    replies = [reply(n + 1, r) for n, r in enumerate(honest)] + [reply(4, hostile)]
    strategy.aggregate_train(1, replies)
    report = strategy.round_report(1)
    assert report.norm_bound is not None
    assert report.norm_bound.bound == pytest.approx(bound, rel=1e-9)
    return list(report.screened)


def test_under_bound_passes_the_default_screen_and_one_percent_more_does_not() -> None:
    assert _round_under_the_screen(aa.UNDER) == []
    assert _round_under_the_screen(1.01) == [4]


# ----------------------------------------------------------------------------- the hooks


def _run_rounds(
    attack: str, defence: RobustSettings, rounds: int = 3, copies: int = 2, hostile: int = 1
) -> AttackHooks:
    """``rounds`` rounds of ``hostile`` of ``2 x copies`` on mock replies through the hooks
    (checks the predicted bound every round, and that the attackers' history is the server's)."""
    setup = share_setup(("a", "b"), copies, hostile)
    hooks = AttackHooks(attack, setup, defence)
    base = make_global(0)
    strategy = FedRobustMerge(
        device="cpu", min_train_nodes=1, min_available_nodes=1, robust=defence, server_lr=1.0
    )
    clients = len(setup.client_tasks)
    for server_round in range(1, rounds + 1):
        start_round(strategy, base, nodes=clients, server_round=server_round)
        replies = []
        for node in range(1, clients + 1):
            sent = hooks.reply_hook(node, base, trained(base, 10 * server_round + node))
            replies.append(reply(node, sent))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        hooks.round_hook(server_round, strategy.round_report(server_round))
        if defence.screens:
            assert list(hooks.history) == pytest.approx(
                list(strategy.stages.norm_history), rel=1e-12
            )
        assert arrays is not None
        base = {k: v.to(torch.float32) for k, v in arrays.to_torch_state_dict().items()}
    return hooks


@pytest.mark.parametrize("attack", list(ADAPTIVE_ATTACKS))
@pytest.mark.parametrize("defence", ["norm", "krum", "centered-clip"])
def test_adaptive_attacks_pass_the_screen_every_round(attack: str, defence: str) -> None:
    """Buffered (round 1, krum, centered-clip) and streamed (norm from round 2) rounds: the
    attackers' bound is the server's (else round_hook raises) and no hostile reply is screened."""
    settings = RobustSettings(defence, krum_malicious=1)
    hooks = _run_rounds(attack, settings)
    assert hooks.rounds == 3
    if defence == "norm":
        assert hooks.hostile_rejected == 0
    assert len(hooks.history) == (12 if defence != "krum" else 9)


@pytest.mark.parametrize("attack", ["under-bound-reversed", "min-max"])
def test_attackers_predict_a_first_round_judged_by_its_pool(attack: str) -> None:
    """4 of 16: round 1 has more replies than the first-round pool (8), so the server judges
    it by the pool of the first 8 (honest) arrivals; the attackers' bound is the server's."""
    settings = RobustSettings("norm")
    hooks = _run_rounds(attack, settings, rounds=2, copies=8, hostile=4)
    assert hooks.rounds == 2 and hooks.hostile_rejected == 0
    pooled = aa.screen_bound([1.0] * 12, [], 4, settings.norm_factor, True, settings.pool)
    assert pooled == pytest.approx(settings.norm_factor)  # the hostile norms are not in it


@pytest.mark.parametrize("attack", ["scaled-x10", "under-bound-reversed"])
def test_the_attackers_history_keeps_clipped_norms_at_the_bound(attack: str) -> None:
    """norm-clip-2: a x10 update is clipped to the bound, and the history (the attackers' copy
    too) keeps the bound, not its norm."""
    settings = RobustSettings("norm", norm_factor=2.0, clip=True)
    hooks = _run_rounds(attack, settings)
    assert len(hooks.history) == 12


def test_the_under_bound_attack_lands_just_under_the_bound() -> None:
    settings = RobustSettings("norm")
    setup = share_setup(("a", "b"), 2, 1)
    hooks = AttackHooks("under-bound-reversed", setup, settings)
    base = make_global(0)
    for node in (1, 2, 3):
        hooks.reply_hook(node, base, trained(base, node))
    sent = hooks.reply_hook(4, base, trained(base, 4))
    norm = aa.update_norm({k: sent[k] - base[k] for k in base})
    assert hooks.predicted is not None
    assert norm == pytest.approx(aa.UNDER * hooks.predicted, rel=1e-5)


def test_a_hostile_node_before_the_honest_ones_is_an_error() -> None:
    hooks = AttackHooks("alie", share_setup(("a", "b"), 2, 1), RobustSettings("norm"))
    base = make_global(0)
    with pytest.raises(RuntimeError, match="hostile nodes last"):
        hooks.reply_hook(4, base, trained(base, 4))


def test_a_wrong_prediction_is_an_error() -> None:
    hooks = _run_rounds("alie", RobustSettings("norm"), rounds=1)
    hooks.predicted = 1.0
    with pytest.raises(RuntimeError, match="predicted"):
        hooks._check_prediction(2, 2.0)


def test_hostile_nodes_are_the_last_and_omniscient_ones_train_one_example() -> None:
    from workload.tasks import TaskData

    setup = share_setup(("a", "b"), 4, 2)
    assert setup.name == "2-of-8"
    hooks = AttackHooks("ipm-0.1", setup, RobustSettings("norm"))
    assert list(hooks.hostile_nodes) == [7, 8]
    data = TaskData("a", ["x", "y", "z"], [0, 1, 0], ["p", "q"])
    assert len(hooks.data_hook(8, data)) == 1
    assert hooks.data_hook(6, data) == data
    own = AttackHooks("under-bound", setup, RobustSettings("norm"))
    assert own.data_hook(8, data) == data
    with pytest.raises(ValueError, match="unknown attack"):
        AttackHooks("nope", setup, RobustSettings("norm"))


# ----------------------------------------------------------------------------- the benchmark


@pytest.mark.slow
def test_tiny_benchmark_runs_every_stage_resumes_and_reports(tmp_path: Path) -> None:
    from benchmarks.adaptive_attacks_run import (
        QUICK,
        markdown,
        measure_rows,
        run_stages,
        skew_setup,
    )

    tiny = replace(
        QUICK,
        base=replace(QUICK.base, train_examples=2, eval_examples=8, tag="tiny"),
        rounds=1,
        screen_attacks=("none", "under-bound-reversed", "min-max"),
        screen_defences=("norm",),
        screen_examples=4,
        measure_defences=("norm",),
        measure_attacks=("none",),
        measure_worst=1,
        measure_seeds=(0,),
        curve_examples=2,
        resamples=50,
    )
    logs: list[str] = []
    results = run_stages(tiny, tmp_path, log=logs.append)
    runs = results["runs"]
    screen = {k for k in runs if k.startswith("screen|")}
    assert screen == {f"screen|1-of-4|norm|{a}|0" for a in tiny.screen_attacks}
    measured = {k for k in runs if k.startswith("measure|")}
    clean = runs["screen|1-of-4|norm|none|0"]["seen"]
    drops = {a: clean - runs[f"screen|1-of-4|norm|{a}|0"]["seen"] for a in tiny.screen_attacks[1:]}
    worst = sorted(drops, key=lambda a: (-drops[a], a))[0]
    assert measured == {
        "measure|1-of-4|none|none|0",
        "measure|1-of-4|norm|none|0",
        f"measure|1-of-4|norm|{worst}|0",
    }
    skewed = {k for k in runs if k.startswith("skew|")}
    assert skewed == {"skew|dirichlet-0.1-4|none|none|0", "skew|dirichlet-0.1-4|norm|none|0"}
    setup, shards = skew_setup(tiny, 0)
    assert setup.malicious == 0 and len(shards) == tiny.skew_clients
    assert sorted(setup.client_tasks) == sorted(tiny.base.seen * 2)
    assert sum(len(d) for d in shards) == tiny.skew_pool * len(tiny.base.seen)
    for key in screen:
        assert len(runs[key]["flags"]["mcid"]) == 4
        assert runs[key]["hostile-rejected"] == 0
    saved = json.loads((tmp_path / "attacks-adaptive-tiny.json").read_text())
    assert saved["runs"].keys() == runs.keys()
    rows = measure_rows(saved, tiny)
    assert {(r["defence"], r["attack"]) for r in rows} == {("norm", "none"), ("norm", worst)}
    assert [(r["defence"], r["attack"]) for r in measure_rows(saved, tiny, "skew")] == [
        ("norm", "none")
    ]
    text = markdown(saved, tiny, "cmd")
    assert "### 1-of-4" in text and "under-bound-reversed" in text
    assert "Dirichlet(0.1)" in text and "| dirichlet-0.1-4 | norm | none | none/none |" in text
    # a results file from before the skew stage's fields were added resumes as the same run
    for key in ("skew_clients", "skew_alpha", "skew_pool"):
        del saved["config"][key]
    (tmp_path / "attacks-adaptive-tiny.json").write_text(json.dumps(saved))
    logs.clear()
    again = run_stages(tiny, tmp_path, log=logs.append)
    assert again["runs"].keys() == runs.keys()
    assert not any(line.startswith("  fed ") for line in logs)
    with pytest.raises(SystemExit, match="another configuration"):
        run_stages(replace(tiny, rounds=2), tmp_path, log=logs.append)


def test_the_screen_runs_the_measured_defences_at_every_share_before_the_others() -> None:
    config = AdaptiveConfig()
    order = [(setup.name, defence) for setup, defence in screen_order(config)]
    measured = len(config.measure_defences) * len(config.shares)
    assert {d for _, d in order[:measured]} == set(config.measure_defences)
    names = [s.name for s in config.setups()]
    # the smallest and the largest federation first, the candidates before the default
    step = len(config.measure_defences)
    assert [s for s, _ in order[:measured:step]] == [names[0], names[-1], *names[1:-1]]
    assert [d for _, d in order[:step]] == list(reversed(config.measure_defences))
    assert sorted(order) == sorted(
        (s.name, d) for s in config.setups() for d in config.screen_defences
    )  # every (share, defence) once, none dropped


def test_the_measure_stage_runs_the_candidates_first_and_waits_for_their_screen() -> None:
    from benchmarks.adaptive_attacks_run import Run, measure_order, run_key

    config = AdaptiveConfig()
    small, large = config.setups()[0].name, config.setups()[-1].name
    drops = {"none": 0.0, "sign-flip": 0.05, "alie": 0.01, "noise": 0.03}
    runs = {
        run_key("screen", share, "centered-clip", attack, config.screen_seed): {"seen": 0.7 - drop}
        for share in (small, large)
        for attack, drop in drops.items()
    }
    logs: list[str] = []
    run = Run(config, None, {"runs": runs}, Path("unused"), logs.append)  # type: ignore[arg-type]
    order = [(setup.name, defence, attack) for setup, defence, attack in measure_order(run)]
    cc = [
        "none",
        *config.measure_attacks[1:],
        "sign-flip",
        "noise",
    ]  # no attack, the named ones, then the screen's two worst
    assert order == [
        *[(small, "centered-clip", a) for a in cc],
        (small, "none", "none"),
        *[(large, "centered-clip", a) for a in cc],
        (large, "none", "none"),
    ]
    left_out = {line for line in logs if "left out" in line}
    assert len(left_out) == len(config.measure_defences) * len(config.shares) - 2
