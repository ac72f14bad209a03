"""Quality benchmark v2 (issue 17): every method in rounds, tuned, at 7, 16 and 64 clients.

What and why
------------
v1 (``benchmarks.quality``) could not tell the methods apart: 96 test examples per task, one
tuning seed, edge-of-grid choices, two methods in rounds, one federation shape. v2 runs:

- rows in rounds (``ROUND_ROWS``): robustmerge paper-exact and paper-equation, fedavg (FedIT),
  ties, dare, svd (FlexLoRA), the exact mean, FFA-LoRA (fedavg, clients train only lora_B);
- each tuned on the seen tasks' dev splits at the 7-client federation (``benchmarks.tuning``:
  server-lr, and fuse-weight where the method has one; grids grown until the choice is interior);
- at every federation shape (``benchmarks.federations``: 7 clients; 16 and 64 with Dirichlet
  0.5 label skew, 25 % participation at 64), over several seeds, with per-round curves;
- reference rows (zero-shot, individual, multi-task: v1's functions) and one-shot merges of the
  individual adapters (a secondary table);
- scored per test example (``benchmarks.per_example``), so every row gets its difference to
  tuned FedAvg at the same federation with a paired bootstrap interval (``benchmarks.stats``);
- with its cost: bytes up / down per client and round, the server's merge seconds per round.

Sizes and budget
----------------
Each seen task has a local pool of ``pool_examples`` = 512 training examples (of 7,000-28,000 in
its train split), which the 16- and 64-client federations split with Dirichlet(0.5). Measured
on the seven seen tasks for seeds 0, 1, 2, the smallest pool whose split leaves no shard empty
is 256 for dbpedia (219 classes over 2 or 9 shards), 128 for banking77, 96 for hwu64 and 32-48
for the others; 512 is twice the largest. Each round a sampled client trains one epoch on at
most ``round_examples`` = 16 examples of its shard in batches of ``local_batch_size`` = 8
(``benchmarks.federations.round_subsample``, seeded by (seed, round, node)): two local steps,
so clients drift apart within a round (with one step, every method's round is one large-batch
gradient step and there is nothing for an aggregation method to do), and a round's cost does
not grow with the pool. At 64 clients the smallest shards hold only 2-9 examples (Dirichlet
sizes vary), and those train whole.

Server lr and fuse weight are tuned one axis at a time (``benchmarks.tuning.tune_by_axis``): in
the merging methods the two multiply the same update (the first tuning run scored equal
products equally, to the last dev example), so a full product grid spends most of its points
on the same step sizes. ``tune_rounds`` = 5, half the runs' rounds, on one seed.

Cost, measured on the idle 2-vCPU machine with 2 torch threads: 9.3 ms per evaluated example
and about 0.36 s per local step (a step embeds the batch and all of the task's label names, so
a step costs about the same at 4 or 8 examples). The full run plans at about 4.5-5 hours of one
process, most of it the 72 federated runs (8 rows, 3 sizes, 3 seeds): their training (2 steps
per sampled client per round) and their final scoring on 8,331 test examples each (77 s a run).
The issue's own minimums (3 seeds, >= 1,000 test examples per task, >= 10 rounds at 16 and 64
clients) leave little to cut. So the run is built to go across sessions and side by side: it
resumes after every (stage, row, seed), and after ``tune`` a second process can take other
stages (``--fork-from``, one torch thread each: two one-thread processes score about 1.45x as
many examples per second as one two-thread process here), its results folded back with
``--combine``. ``python -m benchmarks.quality_v2`` prints the full run's estimate from the unit
costs its own run measured.

Resumable: results are written after every (stage, row, seed); a rerun skips what is saved.
Stages: ``tune``, ``references``, ``fed-7``, ``fed-16``, ``fed-64``, ``one-shot``; the report
(``benchmarks.quality_v2_report``) is rewritten after each. After any run it prints the full
run's time estimated from the unit costs measured so far (``benchmarks.budget``).

Usage::

    python -m benchmarks.quality_v2 --quick              # < 10 min, writes quality-quick.*
    python -m benchmarks.quality_v2                      # the full run, every stage
    python -m benchmarks.quality_v2 --stage tune         # one stage (then the others)
    python -m benchmarks.quality_v2 --report-only        # tables and plots from the JSON
    # two processes side by side after the tune stage:
    python -m benchmarks.quality_v2 --out-dir A --stage tune
    python -m benchmarks.quality_v2 --out-dir B --fork-from A --threads 1 --stage fed-16 &
    python -m benchmarks.quality_v2 --out-dir A --threads 1 --stage references --stage fed-7
    python -m benchmarks.quality_v2 --out-dir A --combine B   # then the report from both
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks import budget
from benchmarks.federations import Federation, RunMeter, federation_shards, task_pools
from benchmarks.per_example import TrackingWorkload, encode_flags, load_tracking_workload
from benchmarks.quality import (
    CACHE_DIR,
    ONE_SHOT_ROWS,
    RESULTS_DIR,
    QualityConfig,
    individual_adapters,
    multitask_adapter,
    run_federated,
)
from benchmarks.tuning import Axis, tune_by_axis
from strategies.merging import merge_lora
from workload.model import initial_adapter

REFERENCE_ROW = "fedavg (FedIT)"


@dataclass(frozen=True)
class RoundRow:
    """A method in rounds: merge method, strategy options, clients' train-factors, and whether
    it has a fuse weight to tune (besides the server lr)."""

    method: str
    options: tuple[tuple[str, Any], ...] = ()
    train_factors: str = "ab"
    fuse: bool = False


ROUND_ROWS: dict[str, RoundRow] = {
    "robustmerge (paper-exact)": RoundRow("robustmerge", (("mode", "paper-exact"),), fuse=True),
    "robustmerge (paper-equation)": RoundRow(
        "robustmerge", (("mode", "paper-equation"),), fuse=True
    ),
    REFERENCE_ROW: RoundRow("fedavg"),
    "ties": RoundRow("ties", fuse=True),
    "dare": RoundRow("dare", fuse=True),
    "svd (FlexLoRA)": RoundRow("svd"),
    "exact-mean": RoundRow("exact-mean"),
    "FFA-LoRA": RoundRow("fedavg", train_factors="b"),
}
# Where the tuning starts, and what untuned rows (a configuration that tunes only some) run at:
# no server step (server lr 1) and the paper's fuse weight (2). Fixed here, not read from the
# app's defaults, which follow this benchmark's results.
DEFAULT_HYPER = {"server_lr": 1.0, "fuse_weight": 2.0}

FULL_BASE = QualityConfig(
    train_examples=64,
    individual_epochs=3,
    eval_examples=1000,
    dev_examples=100,
    batch_size=32,
    max_length=64,
    learning_rate=1e-3,
    tag="full",
)


@dataclass(frozen=True)
class V2Config:
    """Sizes of a v2 run (the defaults are the full run)."""

    base: QualityConfig = FULL_BASE
    seeds: tuple[int, ...] = (0, 1, 2)
    pool_examples: int = 512
    round_examples: int = 16
    local_batch_size: int = 8
    federations: tuple[Federation, ...] = (
        Federation("7", 7, rounds=10),
        Federation("16", 16, rounds=10),
        Federation("64", 64, participation=0.25, rounds=10),
    )
    tune_federation: str = "7"
    tune_rounds: int = 5
    tune_seed: int = 0
    lr_grid: tuple[float, ...] = (1.0, 2.0, 4.0)
    fuse_grid: tuple[float, ...] = (1.0, 2.0, 4.0)
    max_extensions: int = 6
    curve_examples: int = 25
    rows: tuple[str, ...] = tuple(ROUND_ROWS)
    tune_rows: tuple[str, ...] = tuple(ROUND_ROWS)
    one_shot: bool = True
    resamples: int = 2000

    @property
    def tag(self) -> str:
        """The run's tag (``full``, ``quick``, ...)."""
        return self.base.tag

    @property
    def results_stem(self) -> str:
        """``quality`` for the full run, ``quality-<tag>`` otherwise."""
        return "quality" if self.tag == "full" else f"quality-{self.tag}"

    def stages(self) -> list[str]:
        """Stage names in run order."""
        fed = [f"fed-{f.name}" for f in self.federations]
        return ["tune", "references", *fed, *(["one-shot"] if self.one_shot else [])]

    def federation(self, name: str) -> Federation:
        """The federation shape called ``name``."""
        for federation in self.federations:
            if federation.name == name:
                return federation
        raise KeyError(f"no federation {name!r}")


QUICK = V2Config(
    base=QualityConfig(
        seen=("stackoverflow", "sentiment", "20ng"),
        unseen=("mcid",),
        train_examples=12,
        individual_epochs=1,
        eval_examples=24,
        dev_examples=12,
        tag="quick",
    ),
    seeds=(0,),
    pool_examples=64,
    round_examples=4,
    local_batch_size=2,
    federations=(
        Federation("3", 3, rounds=1),
        Federation("6", 6, rounds=1),
        Federation("12", 12, participation=0.25, rounds=2),
    ),
    tune_federation="3",
    tune_rounds=1,
    lr_grid=(1.0, 2.0, 4.0),
    fuse_grid=(1.0, 2.0),
    max_extensions=1,
    curve_examples=8,
    tune_rows=(REFERENCE_ROW,),
    resamples=500,
)


def write_json(path: Path, results: Mapping[str, Any]) -> None:
    """Write ``results`` to ``path`` atomically (a stop mid-write leaves the last good file):
    hours of runs live in this file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=1))
    os.replace(partial, path)


@dataclass
class Run:
    """The state of one benchmark invocation: config, workload, results and how to save."""

    config: V2Config
    work: TrackingWorkload
    results: dict[str, Any]
    json_path: Path
    log: Callable[[str], None] = print
    started: float = field(default_factory=time.perf_counter)
    earlier_seconds: float = 0.0
    only_seeds: tuple[int, ...] | None = None

    @property
    def seeds(self) -> tuple[int, ...]:
        """The configuration's seeds this invocation runs (``only_seeds`` splits a stage over
        processes by seed; the saved keys are per seed, so ``combine_results`` joins them)."""
        if self.only_seeds is None:
            return self.config.seeds
        return tuple(s for s in self.config.seeds if s in self.only_seeds)

    def save(self, step: str) -> None:
        """Write the JSON (after every (stage, row, seed)), with the wall time so far."""
        elapsed = self.earlier_seconds + time.perf_counter() - self.started
        self.results["wall_seconds"] = round(elapsed, 1)
        self.results["meter"]["eval_seconds"] = self.work.eval_seconds + self.eval_before[0]
        self.results["meter"]["eval_examples"] = self.work.eval_examples + self.eval_before[1]
        write_json(self.json_path, self.results)
        self.log(f"[{elapsed:.0f}s] {step} saved")

    @property
    def eval_before(self) -> tuple[float, int]:
        """The evaluation meter of earlier invocations (kept in the saved JSON)."""
        before = self.results.setdefault("meter_before", {"eval_seconds": 0.0, "eval_examples": 0})
        return float(before["eval_seconds"]), int(before["eval_examples"])

    def add_training(self, seconds: float, examples: int) -> None:
        """Count a run's training (and merge) seconds and examples in the meter."""
        meter = self.results["meter"]
        meter["train_seconds"] += seconds
        meter["train_examples"] += examples


def hyper_for(config: V2Config, results: dict[str, Any], row: str) -> dict[str, float]:
    """The row's tuned server lr and fuse weight (or the defaults for an untuned row).

    A row the configuration tunes but whose tuning is not saved yet is an error: running it at
    the defaults would silently make it an untuned row.
    """
    chosen = dict(DEFAULT_HYPER)
    record = results["tuning"].get(row)
    if record is not None:
        chosen.update(record["chosen"])
    elif row in config.tune_rows:
        raise SystemExit(f"{row!r} is not tuned yet: run the 'tune' stage first")
    return chosen


def federated_run(
    run: Run,
    row: str,
    federation: Federation,
    seed: int,
    hyper: dict[str, float],
    split: str,
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """One federated run of ``row``: the per-round scores on ``split`` and its cost summary.

    The last global adapter stays in ``run.work.last_adapter``.
    """
    spec = ROUND_ROWS[row]
    config = run.config
    pools = task_pools(config.base.seen, config.pool_examples, seed)
    shards = federation_shards(pools, federation, seed)
    meter = RunMeter()
    eval_before = run.work.eval_seconds
    began = time.perf_counter()
    history = run_federated(
        run.work,
        method=spec.method,
        seed=seed,
        rounds=federation.rounds if split != "skip" else config.tune_rounds,
        fuse_weight=hyper["fuse_weight"],
        server_lr=hyper["server_lr"],
        split=split,
        log=run.log,
        client_tasks=[d.name for d in shards],
        strategy_options={**dict(spec.options), **federation.strategy_options()},
        data_hook=meter.metered_hook(shards, config.round_examples, seed),
        train_factors=spec.train_factors,
        round_hook=meter.round_hook,
        local_batch_size=config.local_batch_size,
    )
    spent = time.perf_counter() - began - (run.work.eval_seconds - eval_before)
    run.add_training(spent, meter.train_examples)
    assert run.work.last_adapter is not None
    return history, meter.summary(run.work.last_adapter)


def stage_tune(run: Run) -> None:
    """Tune each row in ``config.tune_rows`` on dev at the tuning federation (saved per row)."""
    config = run.config
    federation = config.federation(config.tune_federation)
    for row in config.tune_rows:
        if row in run.results["tuning"]:
            continue
        axes = [Axis("server_lr", config.lr_grid)]
        if ROUND_ROWS[row].fuse:
            axes.append(Axis("fuse_weight", config.fuse_grid))

        def score(point: Mapping[str, float], row: str = row) -> float:
            hyper = {**DEFAULT_HYPER, **point}
            federated_run(run, row, federation, config.tune_seed, hyper, "skip")
            assert run.work.last_adapter is not None
            dev = run.work.evaluate(run.work.last_adapter, "dev")
            return sum(dev.values()) / len(dev)

        start = {axis.name: DEFAULT_HYPER[axis.name] for axis in axes}
        record = tune_by_axis(score, axes, start, max_extensions=config.max_extensions, log=run.log)
        run.results["tuning"][row] = record.to_json()
        run.log(f"tuned {row}: {record.chosen} (dev {record.best_score:.3f})")
        run.save(f"tune {row}")


def stage_references(run: Run, cache_dir: Path) -> None:
    """Zero-shot, individual and multi-task rows per seed (v1's adapters), per-example flags."""
    config, work, runs = run.config, run.work, run.results["runs"]
    for seed in run.seeds:
        key = f"references|zero-shot|{seed}"
        if key not in runs:
            flags = work.test_flags(initial_adapter(work.lora, seed=seed))
            runs[key] = {"flags": {t: encode_flags(f) for t, f in flags.items()}}
            run.save(key)
        key = f"references|individual|{seed}"
        if key not in runs:
            began = time.perf_counter()
            adapters = individual_adapters(work, seed, run.log, cache_dir)
            run.add_training(
                time.perf_counter() - began,
                len(config.base.seen) * config.base.train_examples * config.base.individual_epochs,
            )
            flags_all: dict[str, str] = {}
            for name, adapter in zip(config.base.seen, adapters, strict=True):
                flags_all[name] = encode_flags(work.test_flags(adapter, [name])[name])
            runs[key] = {"flags": flags_all}
            run.save(key)
        key = f"references|multi-task|{seed}"
        if key not in runs:
            began = time.perf_counter()
            adapter = multitask_adapter(work, seed)
            run.add_training(
                time.perf_counter() - began,
                len(config.base.seen) * config.base.train_examples * config.base.individual_epochs,
            )
            flags = work.test_flags(adapter)
            runs[key] = {"flags": {t: encode_flags(f) for t, f in flags.items()}}
            run.save(key)


def stage_federation(run: Run, federation: Federation) -> None:
    """Every row at ``federation`` for every seed: curves, final test flags, cost."""
    config, runs = run.config, run.results["runs"]
    for row in config.rows:
        hyper = hyper_for(config, run.results, row)
        for seed in run.seeds:
            key = f"fed-{federation.name}|{row}|{seed}"
            if key in runs:
                continue
            began = time.perf_counter()
            history, cost = federated_run(run, row, federation, seed, hyper, "curve")
            assert run.work.last_adapter is not None
            flags = run.work.test_flags(run.work.last_adapter)
            runs[key] = {
                "flags": {t: encode_flags(f) for t, f in flags.items()},
                "curve": history,
                "cost": cost,
                "hyper": hyper,
                "seconds": round(time.perf_counter() - began, 1),
            }
            run.save(key)


def stage_one_shot(run: Run, cache_dir: Path) -> None:
    """One-shot merges of the individual adapters (v1's rows and defaults), per seed."""
    work, runs = run.work, run.results["runs"]
    for seed in run.seeds:
        todo = [r for r in ONE_SHOT_ROWS if f"one-shot|{r[0]}|{seed}" not in runs]
        if not todo:
            continue
        adapters = individual_adapters(work, seed, run.log, cache_dir)
        for row, method, hp in todo:
            merged = merge_lora(adapters, method, device="cpu", **hp)
            flags = work.test_flags(merged)
            runs[f"one-shot|{row}|{seed}"] = {
                "flags": {t: encode_flags(f) for t, f in flags.items()}
            }
            run.save(f"one-shot {row} seed {seed}")


def plan_inputs(config: V2Config, work: TrackingWorkload) -> budget.PlanInputs:
    """The budget planner's inputs for ``config`` (sizes read from the loaded workload)."""
    tune_fed = config.federation(config.tune_federation)
    grids = tuple((len(config.lr_grid), 2 if ROUND_ROWS[r].fuse else 1) for r in config.tune_rows)
    return budget.PlanInputs(
        seeds=len(config.seeds),
        seen_tasks=len(config.base.seen),
        pool_examples=config.pool_examples,
        round_examples=config.round_examples,
        train_examples=config.base.train_examples,
        individual_epochs=config.base.individual_epochs,
        test_total=sum(len(d) for d in work.test.values()),
        seen_test_total=sum(len(work.test[t]) for t in config.base.seen),
        dev_total=sum(len(d) for d in work.dev.values()),
        curve_total=sum(len(d) for d in work.curve.values()),
        tune_rounds=config.tune_rounds,
        tune_federation=(tune_fed.clients, tune_fed.sampled()),
        federations=tuple((f.name, f.clients, f.sampled(), f.rounds) for f in config.federations),
        round_rows=len(config.rows),
        tuning_grids=grids,
        one_shot_rows=len(ONE_SHOT_ROWS) if config.one_shot else 0,
    )


def full_estimate(results: dict[str, Any], full: V2Config, log: Callable[[str], None]) -> None:
    """Print (and keep in ``results``) the full run's time at this run's measured unit costs."""
    meter = results["meter"]
    try:
        train_rate, eval_rate = budget.unit_costs(
            meter["train_seconds"],
            meter["train_examples"],
            meter["eval_seconds"],
            meter["eval_examples"],
        )
    except ValueError as error:
        log(f"no estimate: {error}")
        return
    work = load_tracking_workload(full.base, full.curve_examples)
    estimate = budget.estimate_seconds(
        budget.plan_counts(plan_inputs(full, work)), train_rate, eval_rate
    )
    results["full_run_estimate"] = {
        "train_seconds_per_example": train_rate,
        "eval_seconds_per_example": eval_rate,
        "seconds": estimate,
    }
    log(
        f"measured: {train_rate:.3f} s per trained example, {1000 * eval_rate:.1f} ms per "
        f"evaluated example; the full run would take:\n{budget.format_estimate(estimate)}"
    )


def _zero_meter() -> dict[str, float | int]:
    """A cost meter with nothing counted (a new run's, a fork's)."""
    return {"train_seconds": 0.0, "train_examples": 0, "eval_seconds": 0.0, "eval_examples": 0}


def open_run(config: V2Config, out_dir: Path, log: Callable[[str], None], threads: int = 2) -> Run:
    """Load the workload and the saved results of ``config`` (or start new ones).

    ``threads``: torch's CPU threads (2 on the idle 2-core machine; 1 per process when two
    processes share it, see ``fork_results``).
    """
    torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{config.results_stem}.json"
    wanted = json.loads(json.dumps(asdict(config)))
    earlier = 0.0
    if json_path.exists():
        results: dict[str, Any] = json.loads(json_path.read_text())
        if results["config"] != wanted:
            raise SystemExit(f"{json_path} was made with another configuration; move it away")
        earlier = float(results.get("wall_seconds", 0.0))
        results.setdefault("run_id", uuid.uuid4().hex)
        results["meter_before"] = {
            "eval_seconds": results["meter"]["eval_seconds"],
            "eval_examples": results["meter"]["eval_examples"],
        }
    else:
        results = {
            "config": wanted,
            "run_id": uuid.uuid4().hex,
            "machine": f"{platform.node()} {platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads",
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "tuning": {},
            "runs": {},
            "meter": _zero_meter(),
        }
    work = load_tracking_workload(config.base, config.curve_examples)
    return Run(config, work, results, json_path, log, earlier_seconds=earlier)


def run_stages(
    config: V2Config,
    out_dir: Path,
    stages: Sequence[str] | None = None,
    *,
    log: Callable[[str], None] = print,
    cache_dir: Path = CACHE_DIR,
    threads: int = 2,
    only_seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run ``stages`` (default: all, in order) of ``config``, resuming saved results;
    ``only_seeds``: run only these of the configuration's seeds."""
    if only_seeds is not None and not set(only_seeds) <= set(config.seeds):
        raise SystemExit(f"seeds {sorted(set(only_seeds) - set(config.seeds))} not in the config")
    run = open_run(config, out_dir, log, threads)
    run.only_seeds = tuple(only_seeds) if only_seeds is not None else None
    wanted = list(stages) if stages is not None else config.stages()
    unknown = set(wanted) - set(config.stages())
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; known: {config.stages()}")
    for stage in config.stages():
        if stage not in wanted:
            continue
        began = time.perf_counter()
        if stage == "tune":
            stage_tune(run)
        elif stage == "references":
            stage_references(run, cache_dir)
        elif stage == "one-shot":
            stage_one_shot(run, cache_dir)
        else:
            stage_federation(run, config.federation(stage.removeprefix("fed-")))
        run.results.setdefault("stage_seconds", {})[stage] = round(
            run.results.get("stage_seconds", {}).get(stage, 0.0) + time.perf_counter() - began, 1
        )
        run.save(f"stage {stage}")
    return run.results


def fork_results(saved: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``saved`` for a second process that runs other stages in parallel.

    It keeps the configuration, the tuning and the runs (so the fork skips them and uses the
    same tuned values), and starts its cost meter and stage times at zero, so that
    ``combine_results`` can add the fork's work back without counting the shared part twice.
    """
    fork: dict[str, Any] = json.loads(json.dumps(saved))
    fork["meter"] = _zero_meter()
    fork.pop("meter_before", None)
    fork["stage_seconds"] = {}
    fork["run_id"] = uuid.uuid4().hex
    fork["forked_from"] = saved.get("run_id")
    return fork


def combine_results(into: dict[str, Any], fork: dict[str, Any]) -> dict[str, Any]:
    """``into`` with another process's work added: its runs and tuning, its cost meter and stage
    times. ``fork`` is a fork (``fork_results``) or a run started on its own; either way its
    meter counts only its own work. The wall time is the longer of the two (they ran side by
    side).

    Refuses results of another configuration, a copy of ``into`` itself (same ``run_id``: its
    meter would be counted twice), and a run or tuning saved by both with different contents
    (the same seeds give the same numbers, so a difference means a mix-up).
    """
    if fork.get("config") != into.get("config"):
        raise SystemExit("the fork was made with another configuration")
    if fork.get("run_id") is None or fork.get("run_id") == into.get("run_id"):
        raise SystemExit(
            "not a fork (same or no run_id): a copy's meter would be counted twice; "
            "make the second process's results with --fork-from or in an empty --out-dir"
        )
    out: dict[str, Any] = json.loads(json.dumps(into))
    for part in ("tuning", "runs"):
        for key, value in fork[part].items():
            if key in out[part] and out[part][key] != value:
                raise SystemExit(f"{part} {key!r} differs between the two results")
            out[part][key] = value
    for name, value in fork["meter"].items():
        out["meter"][name] += value
    out.pop("meter_before", None)
    stages = out.setdefault("stage_seconds", {})
    for stage, seconds in fork.get("stage_seconds", {}).items():
        stages[stage] = round(stages.get(stage, 0.0) + seconds, 1)
    out["wall_seconds"] = max(out.get("wall_seconds", 0.0), fork.get("wall_seconds", 0.0))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, run the stages, write the report, print the full-run estimate."""
    from benchmarks.quality_v2_report import write_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 10 min")
    parser.add_argument("--stage", action="append", help="run only this stage (repeatable)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--report-only", action="store_true", help="report from the saved JSON")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (1 per process when two share)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        action="append",
        dest="seeds",
        help="run only this seed of the configuration's (repeatable): splits a stage over "
        "processes",
    )
    parser.add_argument(
        "--fork-from",
        type=Path,
        metavar="DIR",
        help="start --out-dir as a fork of DIR's results (after 'tune'), to run other stages "
        "in a second process; fold it back with --combine (a second process that needs no "
        "tuning, e.g. 'references', can start in an empty --out-dir instead)",
    )
    parser.add_argument(
        "--combine",
        type=Path,
        metavar="DIR",
        help="add DIR's results (a fork, or a run of other stages) to --out-dir's",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be positive")
    config = QUICK if args.quick else V2Config()
    stem = args.out_dir / config.results_stem
    json_path = stem.with_suffix(".json")
    if args.fork_from is not None:
        if json_path.exists():
            parser.error(f"{json_path} exists; fork into an empty --out-dir")
        source = json.loads((args.fork_from / json_path.name).read_text())
        args.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(json_path, fork_results(source))
    if args.combine is not None:
        fork = json.loads((args.combine / json_path.name).read_text())
        write_json(json_path, combine_results(json.loads(json_path.read_text()), fork))
    if args.report_only or args.combine is not None:
        results = json.loads(json_path.read_text())
    else:
        results = run_stages(
            config, args.out_dir, args.stage, threads=args.threads, only_seeds=args.seeds
        )
        full_estimate(results, V2Config(), print)
        write_json(json_path, results)
    command = "python -m benchmarks.quality_v2" + (" --quick" if args.quick else "")
    write_report(results, config, stem, command)
    print(f"wall {results['wall_seconds'] / 60:.1f} min; wrote {stem}.md/.json/.png")


if __name__ == "__main__":
    main()
