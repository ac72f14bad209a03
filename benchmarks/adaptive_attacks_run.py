"""Adaptive-attack benchmark (issue 28): attackers who know the defence, over 10 rounds.

What and why
------------
The attack benchmark (``benchmarks.attacks``) ran 3 rounds of attacks that ignore the defence.
This one runs today's attacks and the adaptive ones (``benchmarks.attacks.ADAPTIVE_ATTACKS``:
just under the norm screen's bound, forward and reversed; ALIE; IPM; min-max and min-sum, each
kept under the screen's bound) by omniscient hostile sites (they see the round's honest updates;
``benchmarks.adaptive_attacks``) against every defence (``ADAPTIVE_DEFENCES``: the run-config
options and two candidates for a new default), at three hostile shares: 1 of 4, 2 of 8 and 4 of
16 (25 %); every seen task has 1, 2 or 4 sites, the hostile ones the last nodes (one site of
each task at 4 of 16). Each run is ``run_federated`` (real client training, the real strategy)
for ``rounds`` rounds at the app's defaults (RobustMerge paper-exact, fuse weight 2, server lr
4), scored on a small fixed ``curve`` subset after every round and on the test split at the end.

Stages
------
- ``screen``: every (share, defence, attack) with one seed, the final score on the first
  ``screen_examples`` test examples of each task.
- ``measure``: the measured defences (the default ``norm`` and the candidates) with
  ``measure_seeds``, scored on the whole test subsets (``base.eval_examples`` per task), against
  the attacks in ``measure_attacks`` plus, per (share, defence), the ``measure_worst`` attacks
  that took the screen's seen accuracy furthest below that defence's no-attack run, and each
  defence's and the undefended no-attack run. The report compares each run with the same
  defence's no-attack run (paired bootstrap over seeds and test examples,
  ``benchmarks.stats``), and each defence's no-attack run with the undefended one (its cost).
- ``skew``: what each measured defence costs where honest sites differ most: ``skew_clients``
  sites over the seen tasks with Dirichlet(``skew_alpha``) label skew inside each task
  (``benchmarks.federations``; each task's pool ``skew_pool`` examples, a site's round a seeded
  draw of its shard), nobody attacking, ``measure_seeds``, whole test subsets; each defence
  against the undefended run (issue 28: at most 0.5 seen points at 16 clients with Dirichlet
  label skew).

Resumable: the JSON (``attacks-adaptive[-tag].json``) is replaced atomically after every
(stage, share, defence, attack, seed); a rerun skips what is saved and refuses a JSON made
with another configuration (a configuration that only gained fields, for a new stage, is the
same one: the saved runs do not depend on them). After a run it prints the full run's time at
the unit costs this run measured (seconds per local step and per evaluated example, with
``benchmarks.budget``).

Usage::

    python -m benchmarks.adaptive_attacks_run --quick           # < 10 min, every stage
    python -m benchmarks.adaptive_attacks_run --stage screen    # then --stage measure
    python -m benchmarks.adaptive_attacks_run --report-only
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import budget
from benchmarks.attacks import (
    ADAPTIVE_DEFENCES,
    ALL_ATTACKS,
    AttackHooks,
    Setup,
    defence_settings,
    share_setup,
)
from benchmarks.federations import Federation, RunMeter, federation_shards, task_pools
from benchmarks.per_example import (
    TrackingWorkload,
    decode_flags,
    encode_flags,
    load_tracking_workload,
)
from benchmarks.quality import RESULTS_DIR, Adapter, QualityConfig, run_federated
from benchmarks.quality_v2 import write_json
from benchmarks.quality_v2_report import compare
from workload.tasks import TaskData

STAGES = ("screen", "measure", "skew")
# Every attack but three variants, to fit the run in about 6 CPU-hours: ipm-10 (capped by the
# screen, it is under-bound along the reversed mean), min-max-std and min-sum-std (the same
# attacks along -std). They stay registered and the tests run them.
SCREEN_ATTACKS = tuple(a for a in ALL_ATTACKS if a not in ("ipm-10", "min-max-std", "min-sum-std"))
TOLERANCE = 0.02  # the bar: within 2 seen points of the same defence's no-attack run
SKEW_TOLERANCE = 0.005  # and at most 0.5 seen points of cost with nobody attacking


FULL_BASE = QualityConfig(
    seen=("banking77", "stackoverflow", "sentiment", "hwu64"),
    unseen=("clinc150", "mcid"),
    train_examples=16,
    eval_examples=1000,
    dev_examples=1,
    tag="full",
)


@dataclass(frozen=True)
class AdaptiveConfig:
    """Sizes of a run (the defaults are the full run). ``base.train_examples`` is what each
    client trains per round (in batches of ``local_batch_size``), ``base.eval_examples`` the
    test subset per task of the measure stage; ``shares`` are (sites per seen task, hostile)."""

    base: QualityConfig = FULL_BASE
    shares: tuple[tuple[int, int], ...] = ((1, 1), (2, 2), (4, 4))
    rounds: int = 10
    local_batch_size: int = 16
    fuse_weight: float = 2.0
    server_lr: float = 4.0
    screen_attacks: tuple[str, ...] = SCREEN_ATTACKS
    screen_defences: tuple[str, ...] = ADAPTIVE_DEFENCES
    screen_seed: int = 0
    screen_examples: int = 96
    measure_defences: tuple[str, ...] = ("norm", "norm-clip-2", "centered-clip")
    measure_attacks: tuple[str, ...] = ("none", "under-bound-reversed")
    measure_worst: int = 2
    measure_seeds: tuple[int, ...] = (0, 1, 2)
    curve_examples: int = 8
    resamples: int = 2000
    skew_clients: int = 16
    skew_alpha: float = 0.1
    skew_pool: int = 512

    @property
    def stem(self) -> str:
        """``attacks-adaptive`` for the full run, ``attacks-adaptive-<tag>`` otherwise."""
        tag = self.base.tag
        return "attacks-adaptive" if tag == "full" else f"attacks-adaptive-{tag}"

    def setups(self) -> list[Setup]:
        """The federations, one per hostile share."""
        return [share_setup(self.base.seen, copies, hostile) for copies, hostile in self.shares]

    def skew_federation(self) -> Federation:
        """The skew stage's federation: ``skew_clients`` sites, Dirichlet(``skew_alpha``)."""
        name = f"dirichlet-{self.skew_alpha:g}-{self.skew_clients}"
        return Federation(name, self.skew_clients, alpha=self.skew_alpha, rounds=self.rounds)

    def skew_defences(self) -> list[str]:
        """The skew stage's defences: the undefended reference, then the measured ones."""
        return list(dict.fromkeys(["none", *self.measure_defences]))


QUICK = AdaptiveConfig(
    base=QualityConfig(
        seen=("stackoverflow", "sentiment"),
        unseen=("mcid",),
        train_examples=4,
        eval_examples=24,
        dev_examples=1,
        tag="quick",
    ),
    shares=((2, 1),),
    rounds=2,
    local_batch_size=2,
    screen_attacks=(
        "none",
        "scaled-x1000",
        "under-bound",
        "under-bound-reversed",
        "alie",
        "ipm-0.1",
        "min-max",
        "min-sum",
    ),
    screen_defences=("none", "norm", "centered-clip"),
    screen_examples=12,
    measure_defences=("norm", "centered-clip"),
    measure_attacks=("none", "under-bound-reversed"),
    measure_worst=1,
    measure_seeds=(0, 1),
    curve_examples=4,
    resamples=200,
    skew_clients=4,
    skew_pool=32,
)


def run_key(stage: str, share: str, defence: str, attack: str, seed: int) -> str:
    """The saved run's key."""
    return f"{stage}|{share}|{defence}|{attack}|{seed}"


def prefix(data: TaskData, count: int) -> TaskData:
    """The first ``count`` examples of ``data``."""
    return replace(data, texts=data.texts[:count], labels=data.labels[:count])


@dataclass
class Run:
    """One invocation: config, workload, results, where they are saved, the cost meter."""

    config: AdaptiveConfig
    work: TrackingWorkload
    results: dict[str, Any]
    path: Path
    log: Callable[[str], None] = print

    def save(self, step: str) -> None:
        """Replace the JSON atomically, with the evaluation meter."""
        meter = self.results["meter"]
        meter["eval_seconds"] = meter["eval_seconds_before"] + self.work.eval_seconds
        meter["eval_examples"] = meter["eval_examples_before"] + self.work.eval_examples
        self.results["updated"] = datetime.datetime.now(datetime.UTC).isoformat()
        write_json(self.path, self.results)
        self.log(f"{step} saved")


def federated(
    run: Run,
    setup: Setup,
    defence: str,
    attack: str,
    seed: int,
    shards: Sequence[TaskData] | None = None,
) -> dict[str, Any]:
    """One attacked run: per-round curve scores, the final adapter in ``run.work.last_adapter``,
    what the defence did to the hostile replies, and the training cost (the meter counts local
    steps: a step's cost is mostly the fixed embedding of the task's label names, so it barely
    depends on the batch size; ``benchmarks.quality_v2``'s note).

    ``shards``: node i + 1's local data (a seeded draw of ``base.train_examples`` of it each
    round, ``benchmarks.federations``) in place of its task's draw."""
    config = run.config
    hooks = AttackHooks(attack, setup, defence_settings(defence, setup))
    draws = RunMeter()
    shard_draw = draws.metered_hook(shards, config.base.train_examples, seed) if shards else None
    trained = [0]

    def data_hook(node: int, data: TaskData) -> TaskData:
        out = hooks.data_hook(node, shard_draw(node, data) if shard_draw else data)
        trained[0] += math.ceil(len(out) / config.local_batch_size)
        return out

    def round_hook(server_round: int, report: Any) -> None:
        draws.round_hook(server_round, report)
        hooks.round_hook(server_round, report)

    eval_before = run.work.eval_seconds
    began = time.perf_counter()
    history = run_federated(
        run.work,
        method="robustmerge",
        seed=seed,
        rounds=config.rounds,
        fuse_weight=config.fuse_weight,
        server_lr=config.server_lr,
        split="curve",
        log=run.log,
        client_tasks=setup.client_tasks,
        strategy_options={"robust": hooks.settings},
        data_hook=data_hook,
        reply_hook=hooks.reply_hook,
        round_hook=round_hook,
        local_batch_size=config.local_batch_size,
    )
    spent = time.perf_counter() - began - (run.work.eval_seconds - eval_before)
    meter = run.results["meter"]
    meter["train_seconds"] += spent
    meter["train_steps"] += trained[0]
    return {
        "curve": [
            {k: v for k, v in scores.items() if k in ("seen-avg", "unseen-avg")}
            for scores in history
        ],
        "hostile-rejected": hooks.hostile_rejected,
        "train-seconds": round(spent, 1),
    }


def _scored(run: Run, flags: Mapping[str, Sequence[bool]]) -> dict[str, Any]:
    config = run.config.base
    seen = [float(np.mean(flags[t])) for t in config.seen]
    unseen = [float(np.mean(flags[t])) for t in config.unseen]
    return {
        "seen": float(np.mean(seen)),
        "unseen": float(np.mean(unseen)) if unseen else None,
        "flags": {t: encode_flags(f) for t, f in flags.items()},
    }


def measured_first(config: AdaptiveConfig) -> list[str]:
    """The measured defences in the order both stages run them: the candidates before the
    current default (which comes first in ``measure_defences``)."""
    return [d for d in reversed(config.measure_defences) if d in config.screen_defences]


def setup_order(config: AdaptiveConfig) -> list[Setup]:
    """The shares in the order both stages run them: the smallest and the largest federation
    (issue 28's bar: 1 of 4 and 25 % of 16) before the others."""
    setups = config.setups()
    first = [setups[0], setups[-1]] if len(setups) > 1 else setups
    return first + [setup for setup in setups if setup not in first]


def screen_order(config: AdaptiveConfig) -> list[tuple[Setup, str]]:
    """(share, defence) in the order the screen runs them, so that a partial screen already
    answers which default holds: the measured defences first (``measured_first``), at the
    shares of ``setup_order``, the smallest and the largest before the others; then the other
    defences, at every share."""
    measured = measured_first(config)
    others = [d for d in config.screen_defences if d not in config.measure_defences]
    setups = setup_order(config)
    first, rest = setups[:2], setups[2:]
    order = [(s, d) for group in (first, rest) for s in group for d in measured]
    return order + [(setup, defence) for setup in config.setups() for defence in others]


def _run_and_save(
    run: Run,
    stage: str,
    setup: Setup,
    defence: str,
    attack: str,
    seed: int,
    score: Callable[[Adapter], Mapping[str, Sequence[bool]]],
    shards: Sequence[TaskData] | None = None,
) -> None:
    """One run of ``stage`` under its ``run_key``, skipped when the results already hold it:
    ``federated``, then ``score``'s per-example flags of the final adapter, saved."""
    key = run_key(stage, setup.name, defence, attack, seed)
    if key in run.results["runs"]:
        return
    record = federated(run, setup, defence, attack, seed, shards)
    assert run.work.last_adapter is not None
    record |= _scored(run, score(run.work.last_adapter))
    run.results["runs"][key] = record
    run.save(key)


def stage_screen(run: Run) -> None:
    """Every (share, defence, attack) of the screen, one seed (saved after each)."""
    config = run.config

    def screen_flags(adapter: Adapter) -> dict[str, list[bool]]:
        test = {t: prefix(d, config.screen_examples) for t, d in run.work.test.items()}
        return run.work.flags(adapter, test)

    for setup, defence in screen_order(config):
        for attack in config.screen_attacks:
            _run_and_save(run, "screen", setup, defence, attack, config.screen_seed, screen_flags)


def worst_attacks(results: Mapping[str, Any], share: str, defence: str, count: int) -> list[str]:
    """The ``count`` attacks whose screen runs fell furthest below the screen's no-attack run
    of ``defence`` at ``share`` (seen accuracy); SystemExit when that run is missing."""
    runs = results["runs"]
    prefix_ = f"screen|{share}|{defence}|"
    clean = next((r for k, r in runs.items() if k.startswith(prefix_ + "none|")), None)
    if clean is None:
        raise SystemExit(f"no screen run of {defence!r} without attack at {share}: screen first")
    drops = {
        key.split("|")[3]: clean["seen"] - row["seen"]
        for key, row in runs.items()
        if key.startswith(prefix_) and key.split("|")[3] != "none"
    }
    return sorted(drops, key=lambda a: (-drops[a], a))[:count]


def measure_plan(run: Run, setup: Setup, defence: str) -> list[str]:
    """The attacks the measure stage runs against ``defence`` at ``setup``: no attack,
    ``measure_attacks`` and the screen's ``measure_worst``."""
    config = run.config
    worst = worst_attacks(run.results, setup.name, defence, config.measure_worst)
    return list(dict.fromkeys(["none", *config.measure_attacks, *worst]))


def measure_order(run: Run) -> list[tuple[Setup, str, str]]:
    """(share, defence, attack) in the order the measure stage runs them, so that a partial
    measure already answers whether a candidate holds: defence by defence (``measured_first``:
    the candidates first), each at the shares of ``setup_order``; the undefended no-attack run
    of a share (what a defence's cost is measured against) right after the first defence's runs
    there. A (share, defence) whose screen has no no-attack run yet is left out, logged."""
    order: list[tuple[Setup, str, str]] = []
    for defence in measured_first(run.config):
        for setup in setup_order(run.config):
            screened = run_key("screen", setup.name, defence, "none", run.config.screen_seed)
            if screened not in run.results["runs"]:
                run.log(f"measure: {defence} at {setup.name} left out until the screen has it")
                continue
            order += [(setup, defence, attack) for attack in measure_plan(run, setup, defence)]
            if (setup, "none", "none") not in order:
                order.append((setup, "none", "none"))
    return order


def stage_measure(run: Run) -> None:
    """The measured defences' runs, every seed, whole test subsets (saved after each)."""
    for setup, defence, attack in measure_order(run):
        for seed in run.config.measure_seeds:
            _run_and_save(run, "measure", setup, defence, attack, seed, run.work.test_flags)


def skew_setup(config: AdaptiveConfig, seed: int) -> tuple[Setup, list[TaskData]]:
    """The skew stage's federation for ``seed``: its setup (nobody hostile) and the sites'
    shards (each seen task's pool split over its sites with Dirichlet label skew)."""
    federation = config.skew_federation()
    pools = task_pools(config.base.seen, config.skew_pool, seed)
    shards = federation_shards(pools, federation, seed)
    return Setup(federation.name, tuple(d.name for d in shards), 0), shards


def stage_skew(run: Run) -> None:
    """Each measured defence and the undefended run without attack at the skewed federation,
    every seed, whole test subsets (saved after each)."""
    config = run.config
    for seed in config.measure_seeds:
        setup, shards = skew_setup(config, seed)
        for defence in config.skew_defences():
            _run_and_save(run, "skew", setup, defence, "none", seed, run.work.test_flags, shards)


STAGE_RUNS: dict[str, Callable[[Run], None]] = {
    "screen": stage_screen,
    "measure": stage_measure,
    "skew": stage_skew,
}


# ----------------------------------------------------------------------------- the plan


def plan_counts(config: AdaptiveConfig, test_total: int) -> dict[str, budget.StageCount]:
    """Local steps each stage trains and examples it evaluates (an upper bound: omniscient
    hostile sites train one example a round, counted as a full draw; the measure stage counts
    ``measure_worst`` screen-chosen attacks beside ``measure_attacks`` per defence)."""
    tasks = len(config.base.seen) + len(config.base.unseen)
    curve = config.rounds * tasks * config.curve_examples
    steps_per_round = math.ceil(config.base.train_examples / config.local_batch_size)
    screen = budget.StageCount(0, 0)
    measure = budget.StageCount(0, 0)
    per_defence = len(set(config.measure_attacks) | {"none"}) + config.measure_worst
    for setup in config.setups():
        steps = len(setup.client_tasks) * config.rounds * steps_per_round
        runs = len(config.screen_defences) * len(config.screen_attacks)
        screen = budget.StageCount(
            screen.train + runs * steps,
            screen.evaluate + runs * (curve + tasks * config.screen_examples),
        )
        measured = (1 + len(config.measure_defences) * per_defence) * len(config.measure_seeds)
        measure = budget.StageCount(
            measure.train + measured * steps, measure.evaluate + measured * (curve + test_total)
        )
    skewed = len(config.skew_defences()) * len(config.measure_seeds)
    steps = config.skew_clients * config.rounds * steps_per_round
    skew = budget.StageCount(skewed * steps, skewed * (curve + test_total))
    return {"screen": screen, "measure": measure, "skew": skew}


def full_estimate(results: dict[str, Any], log: Callable[[str], None]) -> None:
    """Print (and keep) the full run's time at this run's measured unit costs."""
    meter = results["meter"]
    try:
        train_rate, eval_rate = budget.unit_costs(
            meter["train_seconds"],
            meter["train_steps"],
            meter["eval_seconds"],
            meter["eval_examples"],
        )
    except ValueError as error:
        log(f"no estimate: {error}")
        return
    full = AdaptiveConfig()
    work = load_tracking_workload(full.base, full.curve_examples)
    test_total = sum(len(d) for d in work.test.values())
    estimate = budget.estimate_seconds(plan_counts(full, test_total), train_rate, eval_rate)
    results["full_run_estimate"] = {
        "train_seconds_per_step": train_rate,
        "eval_seconds_per_example": eval_rate,
        "seconds": estimate,
    }
    log(
        f"measured: {train_rate:.3f} s per local step, {1000 * eval_rate:.1f} ms per "
        f"evaluated example; the full run would take:\n{budget.format_estimate(estimate)}"
    )


# ----------------------------------------------------------------------------- the report


def _points(value: float) -> str:
    return f"{round(100 * value, 1) + 0.0:+.1f}"


def screen_table(results: Mapping[str, Any], config: AdaptiveConfig) -> str:
    """Markdown per share: attack rows x defence columns, seen accuracy (%) and in brackets its
    change against the same defence's no-attack run; ``*`` marks a change beyond 2 points."""
    runs = results["runs"]
    lines: list[str] = []
    for setup in config.setups():
        lines += [
            f"### {setup.name}",
            "",
            "| attack | " + " | ".join(config.screen_defences) + " |",
        ]
        lines.append("|---" * (len(config.screen_defences) + 1) + "|")
        for attack in config.screen_attacks:
            cells = []
            for defence in config.screen_defences:
                row = runs.get(run_key("screen", setup.name, defence, attack, config.screen_seed))
                clean = runs.get(run_key("screen", setup.name, defence, "none", config.screen_seed))
                if row is None:
                    cells.append("")
                    continue
                text = f"{100 * row['seen']:.1f}"
                if clean is not None and attack != "none":
                    change = row["seen"] - clean["seen"]
                    text += f" ({_points(change)}){'*' if change < -TOLERANCE else ''}"
                cells.append(text)
            lines.append(f"| {attack} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _flags(
    results: Mapping[str, Any], share: str, defence: str, attack: str, stage: str = "measure"
) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for key, row in results["runs"].items():
        run_stage, run_share, run_defence, run_attack, seed = key.split("|")
        if (run_stage, run_share, run_defence, run_attack) == (stage, share, defence, attack):
            out[int(seed)] = {t: decode_flags(f) for t, f in row["flags"].items()}
    return out


def measure_rows(
    results: Mapping[str, Any], config: AdaptiveConfig, stage: str = "measure"
) -> list[dict[str, Any]]:
    """Per (share, defence, attack) of ``stage`` (measure, skew): seen and unseen accuracy and
    the difference to the reference (the same defence's no-attack run; for a no-attack run, the
    undefended one) with its paired bootstrap interval."""
    seen, unseen = list(config.base.seen), list(config.base.unseen)
    rows: list[dict[str, Any]] = []
    pairs = sorted(
        {tuple(key.split("|")[1:4]) for key in results["runs"] if key.startswith(f"{stage}|")}
    )
    for share, defence, attack in pairs:
        reference = ("none", "none") if attack == "none" else (defence, "none")
        if (defence, attack) == reference:
            continue
        row = _flags(results, share, defence, attack, stage)
        against = _flags(results, share, reference[0], reference[1], stage)
        seen_cmp = compare(row, against, seen, config.resamples)
        if seen_cmp is None:
            continue
        unseen_cmp = compare(row, against, unseen, config.resamples) if unseen else None
        rows.append(
            {
                "share": share,
                "defence": defence,
                "attack": attack,
                "against": "/".join(reference),
                "seen": seen_cmp,
                "unseen": unseen_cmp,
            }
        )
    return rows


def _interval(comparison: Mapping[str, Any] | None) -> str:
    if comparison is None:
        return ""
    diff = comparison["diff"]
    return (
        f"{100 * comparison['accuracy']:.1f} ({_points(diff['mean'])} "
        f"[{_points(diff['low'])}, {_points(diff['high'])}])"
    )


def measure_table(rows: Sequence[Mapping[str, Any]], tolerance: float = TOLERANCE) -> str:
    """Markdown: per measured run, seen and unseen accuracy (%) and the difference with its 95 %
    interval; ``beyond <tolerance>`` when the seen difference is below -tolerance (points)."""
    lines = [
        "| share | defence | attack | against | seeds | seen (diff [95 %]) | unseen (diff [95 %]) "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        diff = row["seen"]["diff"]["mean"]
        bar = f"{100 * tolerance:g}"
        verdict = f"beyond {bar}" if diff < -tolerance else f"within {bar}"
        lines.append(
            f"| {row['share']} | {row['defence']} | {row['attack']} | {row['against']} | "
            f"{row['seen']['seeds']} | {_interval(row['seen'])} | {_interval(row['unseen'])} | "
            f"{verdict} |"
        )
    return "\n".join(lines)


def markdown(results: Mapping[str, Any], config: AdaptiveConfig, command: str) -> str:
    """The report: sizes, the screen's table, the measured table."""
    base = config.base
    return (
        "# Adaptive-attack benchmark\n\n"
        f"`{command}`; {results.get('machine', '')}, {results.get('date', '')}. "
        f"{config.rounds} rounds, RobustMerge paper-exact, fuse weight {config.fuse_weight:g}, "
        f"server lr {config.server_lr:g}; {base.train_examples} training examples per client "
        "and round; hostile sites are the last nodes and see the round's honest updates "
        "(omniscient); adaptive attacks stay under the norm screen's bound.\n\n"
        f"## Screen (seed {config.screen_seed}, {config.screen_examples} test examples per "
        "task)\n\nSeen accuracy (%), in brackets the change against the same defence's "
        "no-attack run; * beyond 2 points.\n\n"
        + screen_table(results, config)
        + f"\n## Measured ({len(config.measure_seeds)} seeds, up to {base.eval_examples} test "
        "examples per task)\n\nAgainst the same defence's no-attack run (a no-attack run: "
        "against the undefended one, its cost); paired bootstrap 95 % intervals.\n\n"
        + measure_table(measure_rows(results, config))
        + f"\n\n## No attack, {config.skew_clients} sites with Dirichlet({config.skew_alpha:g}) "
        f"label skew ({len(config.measure_seeds)} seeds)\n\nWhat each defence costs where "
        "honest sites differ most: against the undefended run, paired bootstrap 95 % "
        "intervals (the issue's bar: at most 0.5 seen points).\n\n"
        + measure_table(measure_rows(results, config, "skew"), SKEW_TOLERANCE)
        + "\n"
    )


# ----------------------------------------------------------------------------- the run


def open_run(config: AdaptiveConfig, out_dir: Path, log: Callable[[str], None]) -> Run:
    """The workload and the saved results of ``config`` (new ones when there are none)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{config.stem}.json"
    wanted = json.loads(json.dumps(asdict(config)))
    if path.exists():
        results: dict[str, Any] = json.loads(path.read_text())
        saved = results["config"]
        if any(key not in wanted or wanted[key] != value for key, value in saved.items()):
            raise SystemExit(f"{path} was made with another configuration; move it away")
        results["config"] = wanted  # fields added since (a new stage's) change no saved run
    else:
        results = {
            "config": wanted,
            "run_id": uuid.uuid4().hex,
            "machine": f"{platform.node()} {platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads",
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "runs": {},
            "meter": {"train_seconds": 0.0, "train_steps": 0},
        }
    meter = results["meter"]
    meter["eval_seconds_before"] = meter.get("eval_seconds", 0.0)
    meter["eval_examples_before"] = meter.get("eval_examples", 0)
    meter.setdefault("eval_seconds", 0.0)
    meter.setdefault("eval_examples", 0)
    work = load_tracking_workload(config.base, config.curve_examples)
    return Run(config, work, results, path, log)


def run_stages(
    config: AdaptiveConfig,
    out_dir: Path,
    stages: Sequence[str] | None = None,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run ``stages`` (default: both, in order), resuming what is saved."""
    wanted = list(stages) if stages is not None else list(STAGES)
    unknown = set(wanted) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; known: {list(STAGES)}")
    run = open_run(config, out_dir, log)
    for stage in STAGES:
        if stage not in wanted:
            continue
        began = time.perf_counter()
        STAGE_RUNS[stage](run)
        seconds = run.results.setdefault("stage_seconds", {})
        seconds[stage] = round(seconds.get(stage, 0.0) + time.perf_counter() - began, 1)
        run.save(f"stage {stage}")
    return run.results


def main(argv: Sequence[str] | None = None) -> None:
    """Run the stages, write the report, print the full run's estimate."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 10 min")
    parser.add_argument("--stage", action="append", choices=STAGES, help="repeatable")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = QUICK if args.quick else AdaptiveConfig()
    path = args.out_dir / f"{config.stem}.json"
    if args.report_only:
        results = json.loads(path.read_text())
    else:
        results = run_stages(config, args.out_dir, args.stage)
        full_estimate(results, print)
        write_json(path, results)
    command = "python -m benchmarks.adaptive_attacks_run" + (" --quick" if args.quick else "")
    path.with_suffix(".md").write_text(markdown(results, config, command))
    print(f"wrote {path.with_suffix('.md')} and {path.name}")


if __name__ == "__main__":
    main()
