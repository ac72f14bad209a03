"""Quality v3, the regime map (issue 31): where does each aggregation method pay?

What and why
------------
The quality benchmark v2 (``benchmarks.quality_v2``) trained two local steps per client per
round; there every method tied tuned FedAvg. That regime is close to FedSGD. This benchmark maps
the regimes users train in: a *cell* is (federation, local steps per round, rounds), and in every
cell each row (a merge method in rounds) is tuned on the seen tasks' dev splits, run with three
seeds, scored per test example and compared with tuned FedAvg in the same cell (paired
bootstrap, ``benchmarks.stats``).

- Federations (``benchmarks.federations``): ``7``, one client per seen task (task
  heterogeneity, the paper's setting); ``16``, sixteen clients over the seven tasks with
  Dirichlet(0.1) label skew inside each task (strong). Each task's local pool is 512 training
  examples (drawn per seed), as in v2.
- Local work: ``steps`` local steps of batch 8 per round (``local_work_draw``: exactly 8 x steps
  examples of the client's shard, several passes over a small shard); 64 steps is one epoch of
  a 512-example pool. The same learning rate (1e-3, AdamW, a fresh optimiser per round) for
  every method.
- Rounds: 1 (one-shot), 3 and 10, at equal local work per round.
- Not every product is run (``RegimeConfig.skipped`` says why for each cell left out, and the
  report prints it): two local steps were measured by v2; the multi-round cells at 16 clients
  and at 64 steps are cut to fit the CPU budget.

Tuning, per (regime, row), on one seed (``tune_seed``): the server lr, and RobustMerge's keep
ratio (its pruning is what sets it apart from a mean), by ``benchmarks.tuning.tune_by_axis``,
grids grown until the choice is interior or a cap is hit. Fuse weights stay at the paper's 2:
in delta rounds the fuse weight and the server lr multiply the same update (v2 measured equal
dev scores at equal products), so tuning the server lr tunes their product. Every tuned point
runs as many rounds as the longest cell that asks for it and is scored on dev at each cell's
round count, so one run serves several cells; its adapters at those rounds are kept on disk, so
the chosen point's run doubles as the tuning seed's measured run.

Two exact savings make the long cells affordable: ``benchmarks.train_cache`` reuses a client's
training when its start, data, settings and seed repeat (round 1 of every run of one seed, for
every row and point); and a cell's run of R rounds is the first R rounds of a longer run with
the same settings (runs are grouped by the chosen settings).

Per round, every run records what might predict a win (``benchmarks.regime_signals``): the mean
pairwise cosine of the clients' product-space updates, the factor-wise gap, and the server's
product-space step norm; and its cost: bytes up / down, merge seconds, client seconds (rounds
trained afresh only; a cached round costs nothing).

Resumable after every tuned point and every (cell, row, seed): results are written atomically;
a rerun skips what is saved. Stages, in the plan's order: ``zero-shot``, then per regime
``tune-<regime>`` and ``measure-<regime>``, regimes in ``RegimeConfig.regimes`` order (the
cross-silo regime first, then the one nearest the app's default federation, then 16 clients).
``--plan`` measures the unit costs on this machine and prints the plan with its estimated time
per regime before anything runs; ``skipped`` names the cells left out and why.

Usage::

    python -m benchmarks.regimes --plan                 # unit costs and the plan, ~1 min
    python -m benchmarks.regimes --quick                # < 10 min, every stage, regimes-quick.*
    python -m benchmarks.regimes --threads 1            # the full run (resumes)
    python -m benchmarks.regimes --stage tune-7x64      # one stage
    python -m benchmarks.regimes --report-only
    # a second process on other stages, folded back with --combine (as in quality_v2)
    python -m benchmarks.regimes --out-dir B --fork-from benchmarks/results --stage ...
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file

from benchmarks import regime_signals
from benchmarks.federations import (
    Federation,
    RunMeter,
    federation_shards,
    local_work_draw,
    task_pools,
)
from benchmarks.per_example import TrackingWorkload, encode_flags, load_tracking_workload
from benchmarks.quality import CACHE_DIR, RESULTS_DIR, QualityConfig, Workload, run_federated
from benchmarks.quality_v2 import (
    DEFAULT_HYPER,
    FULL_BASE,
    REFERENCE_ROW,
    ROUND_ROWS,
    combine_results,
    fork_results,
    write_json,
)
from benchmarks.train_cache import TrainCache
from benchmarks.tuning import Axis, tune_by_axis
from workload.model import initial_adapter

Adapter = dict[str, torch.Tensor]
ROBUSTMERGE_ROWS = ("robustmerge (paper-exact)", "robustmerge (paper-equation)")


@dataclass(frozen=True)
class Regime:
    """A federation trained ``steps`` local steps per round, measured at each of ``rounds``."""

    federation: str
    steps: int
    rounds: tuple[int, ...]

    @property
    def name(self) -> str:
        """``<federation>x<steps>``, e.g. ``7x64``."""
        return f"{self.federation}x{self.steps}"


@dataclass(frozen=True)
class SkippedCell:
    """A cell of the full grid that the plan leaves out, and why (written into the results)."""

    federation: str
    steps: int
    rounds: int
    reason: str


BUDGET_REASON = (
    "over the CPU budget: on the 2-core machine (0.57 s per client step of batch 8 and 18 ms "
    "per evaluated example, measured idle on 2026-12-06) a multi-round cell with its tuning "
    "grid costs 2-4 CPU hours at 7 clients and twice that at 16; the plan keeps one multi-round "
    "cell per heterogeneity level at 16 clients and the cross-silo cells (64 steps) at few rounds"
)


TWO_STEPS_REASON = (
    "measured by quality v2 (benchmarks/results/quality.md): two local steps of batch 8 per "
    "round at 7, 16 and 64 clients, every row tuned, 3 seeds, full test splits; no row beat "
    "tuned FedAvg there (the updates are nearly the same gradient), so the map spends its "
    "budget where the clients train longer"
)
ONE_SHOT_16_REASON = (
    "over the CPU budget (see the 64-step cells): 16 clients at 64 steps are measured one-shot, "
    "where round 1 is trained once per seed for every row and point"
)


@dataclass(frozen=True)
class RegimeConfig:
    """Sizes of a regime-map run (the defaults are the full run, in plan order)."""

    base: QualityConfig = FULL_BASE
    seeds: tuple[int, ...] = (0, 1, 2)
    tune_seed: int = 0
    pool_examples: int = 512
    local_batch_size: int = 8
    federations: tuple[Federation, ...] = (
        Federation("7", 7),
        Federation("16", 16, alpha=0.1),
    )
    regimes: tuple[Regime, ...] = (
        Regime("7", 64, (1, 3)),
        Regime("7", 16, (1, 3, 10)),
        Regime("16", 64, (1,)),
        Regime("16", 16, (1, 3)),
    )
    skipped: tuple[SkippedCell, ...] = (
        SkippedCell("7", 64, 10, BUDGET_REASON),
        SkippedCell("16", 64, 3, ONE_SHOT_16_REASON),
        SkippedCell("16", 64, 10, BUDGET_REASON),
        SkippedCell("16", 16, 10, BUDGET_REASON),
        *(SkippedCell(f, 2, r, TWO_STEPS_REASON) for f in ("7", "16") for r in (1, 3, 10)),
    )
    rows: tuple[str, ...] = (
        REFERENCE_ROW,
        "robustmerge (paper-exact)",
        "exact-mean",
        "ties",
    )
    lr_grid: tuple[float, ...] = (0.5, 1.0, 2.0)
    keep_grid: tuple[float, ...] = (0.1, 0.2, 0.4)
    max_extensions: int = 4
    curve_examples: int = 25
    resamples: int = 2000

    @property
    def tag(self) -> str:
        """The run's tag (``full``, ``quick``, ...)."""
        return self.base.tag

    @property
    def results_stem(self) -> str:
        """``regimes`` for the full run, ``regimes-<tag>`` otherwise."""
        return "regimes" if self.tag == "full" else f"regimes-{self.tag}"

    def stages(self) -> list[str]:
        """Stage names in run order."""
        out = ["zero-shot"]
        for regime in self.regimes:
            out += [f"tune-{regime.name}", f"measure-{regime.name}"]
        return out

    def federation(self, name: str) -> Federation:
        """The federation shape called ``name``."""
        for federation in self.federations:
            if federation.name == name:
                return federation
        raise KeyError(f"no federation {name!r}")

    def regime(self, name: str) -> Regime:
        """The regime called ``name``."""
        for regime in self.regimes:
            if regime.name == name:
                return regime
        raise KeyError(f"no regime {name!r}")


QUICK = RegimeConfig(
    base=QualityConfig(
        seen=("stackoverflow", "sentiment", "20ng"),
        unseen=("mcid",),
        train_examples=12,
        individual_epochs=1,
        eval_examples=24,
        dev_examples=12,
        batch_size=32,
        max_length=32,
        learning_rate=1e-3,
        tag="quick",
    ),
    seeds=(0, 1),
    pool_examples=64,
    local_batch_size=2,
    federations=(Federation("3", 3), Federation("6", 6, alpha=0.1)),
    regimes=(Regime("3", 4, (1, 2)), Regime("6", 1, (1, 2))),
    skipped=(SkippedCell("6", 4, 2, "quick run: one regime per federation"),),
    rows=(REFERENCE_ROW, "robustmerge (paper-exact)"),
    lr_grid=(1.0, 2.0, 4.0),
    keep_grid=(0.2, 0.4, 0.8),
    max_extensions=1,
    curve_examples=6,
    resamples=200,
)


def tuned_axes(config: RegimeConfig, row: str) -> list[Axis]:
    """The axes tuned for ``row``: the server lr, and the keep ratio for RobustMerge rows."""
    axes = [Axis("server_lr", config.lr_grid)]
    if row in ROBUSTMERGE_ROWS:
        axes.append(Axis("keep_ratio", config.keep_grid, maximum=1.0))
    return axes


def full_hyper(point: Mapping[str, float]) -> dict[str, float]:
    """A tuned point with the fixed settings filled in (``DEFAULT_HYPER``; keep ratio 0.2)."""
    return {**DEFAULT_HYPER, "keep_ratio": 0.2, **{k: float(v) for k, v in point.items()}}


def point_key(hyper: Mapping[str, float]) -> str:
    """A stable name of a setting, e.g. ``fuse_weight=2,keep_ratio=0.2,server_lr=1``."""
    return ",".join(f"{k}={hyper[k]:g}" for k in sorted(hyper))


@dataclass
class RoundWatcher:
    """Wraps the workload for one federated run (``run_federated`` sees it as the workload).

    ``run_federated`` calls ``reply_hook`` for every client reply and ``evaluate`` once per round
    with the new global; the watcher records the round's signals (``regime_signals``) and client
    seconds, scores ``split`` (the per-round curve, or nothing), and at the ``checkpoints``
    keeps a copy of the global and, with ``dev``, its mean seen-task dev accuracy.
    """

    work: TrackingWorkload
    checkpoints: Sequence[int]
    dev: bool
    cache: TrainCache
    round: int = 0
    start: Adapter | None = None
    trained: list[Adapter] = field(default_factory=list)
    kept: dict[int, Adapter] = field(default_factory=dict)
    dev_scores: dict[int, float] = field(default_factory=dict)
    signals: list[dict[str, float]] = field(default_factory=list)
    round_began: float = field(default_factory=time.perf_counter)
    merge_seconds: float = 0.0
    hits_before: int = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.work, name)

    def reply_hook(self, node: int, start: Adapter, trained: Adapter) -> Adapter:
        """Keep the reply for the round's signals; the reply itself is unchanged."""
        self.start = start
        self.trained.append(trained)
        return trained

    def round_hook(self, meter: RunMeter) -> Callable[[int, Any], None]:
        """``run_federated``'s round hook: the meter's, plus the merge seconds of the round."""

        def hook(server_round: int, report: Any) -> None:
            meter.round_hook(server_round, report)
            self.merge_seconds = float(report.merge_seconds) + float(report.fold_seconds)

        return hook

    def evaluate(
        self, adapter: Mapping[str, torch.Tensor], split: str = "test", tasks: Any = None
    ) -> dict[str, float]:
        """The round is over: record it, score ``split``, keep what the checkpoints ask."""
        self.round += 1
        elapsed = time.perf_counter() - self.round_began
        assert self.start is not None, "a round without replies"
        updates = [regime_signals.flat_update(self.start, t) for t in self.trained]
        cached = self.cache.hits - self.hits_before
        self.signals.append(
            {
                "round": self.round,
                "clients": len(self.trained),
                "cosine": regime_signals.mean_pairwise_cosine(updates),
                "factorwise_gap": regime_signals.factorwise_gap(self.start, self.trained),
                "step_norm": regime_signals.step_norm(self.start, adapter),
                "client_seconds": round(elapsed - self.merge_seconds, 2),
                "cached_clients": cached,
            }
        )
        scores = self.work.evaluate(adapter, split, tasks)
        if self.round in self.checkpoints:
            self.kept[self.round] = {k: v.detach().clone() for k, v in adapter.items()}
            if self.dev:
                dev = self.work.evaluate(adapter, "dev")
                self.dev_scores[self.round] = sum(dev.values()) / len(dev)
        self.trained = []
        self.hits_before = self.cache.hits
        self.round_began = time.perf_counter()
        return scores


@dataclass
class RegimeRun:
    """The state of one invocation: config, workload, results, the training cache, saving."""

    config: RegimeConfig
    work: TrackingWorkload
    results: dict[str, Any]
    json_path: Path
    cache_dir: Path
    log: Callable[[str], None] = print
    started: float = field(default_factory=time.perf_counter)
    earlier_seconds: float = 0.0
    cache: TrainCache = field(default_factory=TrainCache)

    def save(self, step: str) -> None:
        """Write the JSON atomically, with the wall time and the cost meter so far."""
        elapsed = self.earlier_seconds + time.perf_counter() - self.started
        self.results["wall_seconds"] = round(elapsed, 1)
        meter = self.results["meter"]
        before = self.results.setdefault("meter_before", dict(meter))
        meter["eval_seconds"] = before["eval_seconds"] + self.work.eval_seconds
        meter["eval_examples"] = before["eval_examples"] + self.work.eval_examples
        write_json(self.json_path, self.results)
        self.log(f"[{elapsed:.0f}s] {step} saved")

    def adapter_dir(self, regime: Regime, row: str, hyper: Mapping[str, float]) -> Path:
        """Where a tuned point's checkpoint adapters (tuning seed) are kept."""
        digest = hashlib.sha256(f"{row}|{point_key(hyper)}".encode()).hexdigest()[:16]
        return self.cache_dir / self.config.tag / regime.name / digest


def federated_record(
    run: RegimeRun,
    regime: Regime,
    row: str,
    seed: int,
    hyper: Mapping[str, float],
    rounds: int,
    checkpoints: Sequence[int],
    *,
    dev: bool,
) -> tuple[dict[str, Any], dict[int, Adapter], dict[int, float]]:
    """One run of ``row`` for ``rounds`` rounds: its record (per-round curve and signals, cost,
    steps trained afresh), the globals at ``checkpoints`` and (with ``dev``) their dev scores."""
    config = run.config
    spec = ROUND_ROWS[row]
    federation = config.federation(regime.federation)
    pools = task_pools(config.base.seen, config.pool_examples, seed)
    shards = federation_shards(pools, federation, seed)
    meter = RunMeter()
    watcher = RoundWatcher(run.work, checkpoints, dev, run.cache, hits_before=run.cache.hits)
    options: dict[str, Any] = {**dict(spec.options), **federation.strategy_options()}
    if row in ROBUSTMERGE_ROWS:
        options["keep_ratio"] = hyper["keep_ratio"]
    began = time.perf_counter()
    eval_before = run.work.eval_seconds
    misses_before = run.cache.misses
    curve = run_federated(
        cast(Workload, watcher),
        method=spec.method,
        seed=seed,
        rounds=rounds,
        fuse_weight=hyper["fuse_weight"],
        server_lr=hyper["server_lr"],
        split="curve",
        log=run.log,
        client_tasks=[d.name for d in shards],
        strategy_options=options,
        data_hook=meter.metered_hook(
            shards, regime.steps * config.local_batch_size, seed, draw=local_work_draw
        ),
        reply_hook=watcher.reply_hook,
        train_factors=spec.train_factors,
        round_hook=watcher.round_hook(meter),
        local_batch_size=config.local_batch_size,
        train_cache=run.cache,
    )
    fresh = run.cache.misses - misses_before
    train_seconds = time.perf_counter() - began - (run.work.eval_seconds - eval_before)
    assert run.work.last_adapter is not None
    meter_totals = run.results["meter"]
    meter_totals["train_seconds"] += train_seconds
    meter_totals["train_steps"] += fresh * regime.steps
    record = {
        "curve": curve,
        "signals": watcher.signals,
        "cost": meter.summary(run.work.last_adapter),
        "fresh_client_rounds": fresh,
        "seconds": round(time.perf_counter() - began, 1),
        "hyper": dict(hyper),
    }
    return record, watcher.kept, watcher.dev_scores


def stage_zero_shot(run: RegimeRun) -> None:
    """The base model with each seed's initial adapter (B = 0): per-example test flags."""
    runs = run.results["runs"]
    for seed in run.config.seeds:
        key = f"zero-shot|0|zero-shot|{seed}"
        if key not in runs:
            flags = run.work.test_flags(initial_adapter(run.work.lora, seed=seed))
            runs[key] = {"flags": {t: encode_flags(f) for t, f in flags.items()}}
            run.save(key)


def tune_row(run: RegimeRun, regime: Regime, row: str) -> None:
    """Tune ``row`` for every rounds cell of ``regime`` (longest first), each point saved."""
    config = run.config
    name = f"{regime.name}|{row}"
    if name in run.results["tuning"]:
        return
    points: dict[str, Any] = run.results.setdefault("tune_points", {}).setdefault(name, {})
    chosen: dict[str, dict[str, float]] = {}
    records: dict[str, Any] = {}
    for cell in sorted(regime.rounds, reverse=True):

        def score(point: Mapping[str, float], cell: int = cell) -> float:
            hyper = full_hyper(point)
            key = point_key(hyper)
            entry = points.get(key)
            if entry is None or str(cell) not in entry["dev"]:
                checkpoints = [r for r in regime.rounds if r <= cell]
                record, kept, dev = federated_record(
                    run, regime, row, config.tune_seed, hyper, cell, checkpoints, dev=True
                )
                folder = run.adapter_dir(regime, row, hyper)
                folder.mkdir(parents=True, exist_ok=True)
                for r, adapter in kept.items():
                    save_file(adapter, str(folder / f"round-{r}.safetensors"))
                entry = {
                    "hyper": hyper,
                    "dev": {str(r): v for r, v in dev.items()},
                    "rounds": cell,
                    "record": record,
                }
                points[key] = entry
                run.save(f"tune {regime.name} {row} {key} ({cell} rounds)")
            return float(entry["dev"][str(cell)])

        axes = tuned_axes(config, row)
        start = {axis.name: full_hyper({})[axis.name] for axis in axes}
        record = tune_by_axis(score, axes, start, max_extensions=config.max_extensions, log=run.log)
        chosen[str(cell)] = full_hyper(record.chosen)
        records[str(cell)] = record.to_json()
        run.log(f"tuned {regime.name} {row} at {cell} rounds: {record.chosen}")
    run.results["tuning"][name] = {"chosen": chosen, "records": records}
    run.save(f"tune {name}")


def stage_tune(run: RegimeRun, regime: Regime) -> None:
    """Tune every row of the configuration at ``regime``."""
    for row in run.config.rows:
        tune_row(run, regime, row)


def cell_groups(tuning: Mapping[str, Any]) -> list[tuple[dict[str, float], list[int]]]:
    """The rounds cells that share a chosen setting, longest run first: one run serves each
    group (a cell of R rounds is the first R rounds of a longer run with the same setting)."""
    groups: dict[str, tuple[dict[str, float], list[int]]] = {}
    for cell, hyper in tuning["chosen"].items():
        groups.setdefault(point_key(hyper), (dict(hyper), []))[1].append(int(cell))
    out = [(hyper, sorted(cells)) for hyper, cells in groups.values()]
    return sorted(out, key=lambda group: -max(group[1]))


def saved_tuning_run(
    run: RegimeRun, regime: Regime, row: str, hyper: Mapping[str, float], cells: Sequence[int]
) -> tuple[dict[str, Any], dict[int, Adapter]] | None:
    """The tuning seed's run at ``hyper`` if tuning ran it long enough and its checkpoint
    adapters are on disk (not after a fork to another machine, say); else None."""
    entry = run.results["tune_points"].get(f"{regime.name}|{row}", {}).get(point_key(hyper))
    if entry is None or entry["rounds"] < max(cells):
        return None
    folder = run.adapter_dir(regime, row, hyper)
    paths = {r: folder / f"round-{r}.safetensors" for r in cells}
    if not all(p.exists() for p in paths.values()):
        return None
    return entry["record"], {r: load_file(str(p)) for r, p in paths.items()}


def stage_measure(run: RegimeRun, regime: Regime) -> None:
    """Every row at every rounds cell of ``regime`` for every seed: test flags, curve, signals,
    cost (saved per (cell, row, seed))."""
    config, runs = run.config, run.results["runs"]
    for row in config.rows:
        tuning = run.results["tuning"].get(f"{regime.name}|{row}")
        if tuning is None:
            raise SystemExit(f"{row!r} is not tuned at {regime.name}: run tune-{regime.name}")
        for seed in config.seeds:
            for hyper, cells in cell_groups(tuning):
                todo = [c for c in cells if f"{regime.name}|{c}|{row}|{seed}" not in runs]
                if not todo:
                    continue
                found = (
                    saved_tuning_run(run, regime, row, hyper, todo)
                    if seed == config.tune_seed
                    else None
                )
                if found is None:
                    record, kept, _ = federated_record(
                        run, regime, row, seed, hyper, max(todo), todo, dev=False
                    )
                else:
                    record, kept = found
                for cell in todo:
                    flags = run.work.test_flags(kept[cell])
                    key = f"{regime.name}|{cell}|{row}|{seed}"
                    runs[key] = {
                        "flags": {t: encode_flags(f) for t, f in flags.items()},
                        "curve": record["curve"][:cell],
                        "signals": record["signals"][:cell],
                        "cost": record["cost"],
                        "hyper": dict(hyper),
                        "from_tuning": found is not None,
                    }
                    run.save(key)


def open_run(
    config: RegimeConfig,
    out_dir: Path,
    log: Callable[[str], None],
    threads: int,
    cache_dir: Path,
) -> RegimeRun:
    """Load the workload and the saved results of ``config`` (or start new ones)."""
    torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{config.results_stem}.json"
    wanted = json.loads(json.dumps(asdict(config)))
    earlier = 0.0
    if json_path.exists():
        results: dict[str, Any] = json.loads(json_path.read_text())
        if measured_part(results["config"]) != measured_part(wanted):
            raise SystemExit(f"{json_path} was made with another configuration; move it away")
        results["config"] = wanted  # the plan (regimes, skipped cells) may have grown
        earlier = float(results.get("wall_seconds", 0.0))
        results["meter_before"] = dict(results["meter"])
    else:
        results = {
            "config": wanted,
            "run_id": uuid.uuid4().hex,
            "machine": f"{platform.node()} {platform.machine()}, torch {torch.__version__}, "
            f"{threads} thread(s) per process",
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "tuning": {},
            "tune_points": {},
            "runs": {},
            "meter": zero_meter(),
        }
    work = load_tracking_workload(config.base, config.curve_examples)
    return RegimeRun(config, work, results, json_path, cache_dir, log, earlier_seconds=earlier)


PLAN_FIELDS = ("regimes", "skipped")


def measured_part(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a saved run's numbers depend on: the configuration without the plan (which regimes
    run, which cells are skipped), so a plan can grow or shrink across sessions while the saved
    cells stay comparable."""
    return {k: v for k, v in config.items() if k not in PLAN_FIELDS}


def zero_meter() -> dict[str, float]:
    """A cost meter with nothing counted."""
    return {"train_seconds": 0.0, "train_steps": 0, "eval_seconds": 0.0, "eval_examples": 0}


def run_stages(
    config: RegimeConfig,
    out_dir: Path,
    stages: Sequence[str] | None = None,
    *,
    log: Callable[[str], None] = print,
    threads: int = 1,
    cache_dir: Path = CACHE_DIR / "regimes",
) -> dict[str, Any]:
    """Run ``stages`` (default: all, in plan order) of ``config``, resuming saved results."""
    wanted = list(stages) if stages is not None else config.stages()
    unknown = set(wanted) - set(config.stages())
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; known: {config.stages()}")
    run = open_run(config, out_dir, log, threads, cache_dir)
    for stage in config.stages():
        if stage not in wanted:
            continue
        began = time.perf_counter()
        if stage == "zero-shot":
            stage_zero_shot(run)
        elif stage.startswith("tune-"):
            stage_tune(run, config.regime(stage.removeprefix("tune-")))
        else:
            stage_measure(run, config.regime(stage.removeprefix("measure-")))
        seconds = run.results.setdefault("stage_seconds", {})
        seconds[stage] = round(seconds.get(stage, 0.0) + time.perf_counter() - began, 1)
        run.save(f"stage {stage}")
    run.results["train_cache"] = {"hits": run.cache.hits, "misses": run.cache.misses}
    return run.results


def combine(into: dict[str, Any], fork: dict[str, Any]) -> dict[str, Any]:
    """``benchmarks.quality_v2.combine_results`` (runs, tuning, meter, stage times) plus the
    fork's tuned points."""
    out = combine_results(into, fork)
    points = out.setdefault("tune_points", {})
    for name, entries in fork.get("tune_points", {}).items():
        points.setdefault(name, {}).update(entries)
    return out


# ----------------------------------------------------------------------------- the plan


def plan_counts(config: RegimeConfig, work: TrackingWorkload) -> dict[str, dict[str, float]]:
    """Expected client steps trained afresh and examples evaluated, per regime (and zero-shot).

    Expected tuning points per row: 4 per tuned axis (the 3-point grid and one extension), the
    longest cell's points run to its rounds; each shorter cell adds one new point of its own
    length. Round 1 of a seed is trained once for every row and point (``TrainCache``), so only
    later rounds count per run. Measured runs: the tuning seed's come from tuning; the other
    seeds run each row once to the longest cell.
    """
    test_total = sum(len(d) for d in work.test.values())
    dev_total = sum(len(d) for d in work.dev.values())
    curve_total = sum(len(d) for d in work.curve.values())
    out: dict[str, dict[str, float]] = {
        "zero-shot": {"steps": 0.0, "examples": float(len(config.seeds) * test_total)}
    }
    for regime in config.regimes:
        round_steps = config.federation(regime.federation).sampled() * regime.steps
        longest = max(regime.rounds)
        shorter = [r for r in regime.rounds if r != longest]
        other_seeds = len(config.seeds) - 1
        later_rounds = 0
        examples = 0.0
        for row in config.rows:
            points = 4 * len(tuned_axes(config, row))
            later_rounds += points * (longest - 1) + sum(r - 1 for r in shorter)
            later_rounds += other_seeds * (longest - 1)
            examples += (points + len(shorter)) * (
                len(regime.rounds) * dev_total + longest * curve_total
            )
            examples += other_seeds * longest * curve_total
            examples += len(config.seeds) * len(regime.rounds) * test_total
        steps = (later_rounds + len(config.seeds)) * round_steps
        out[regime.name] = {"steps": float(steps), "examples": examples}
    return out


def plan_lines(
    config: RegimeConfig, work: TrackingWorkload, step_seconds: float, example_seconds: float
) -> list[str]:
    """The plan, one line per regime with its estimated CPU hours and the running total."""
    lines = [
        f"unit costs: {step_seconds:.3f} s per client step (batch {config.local_batch_size}), "
        f"{1000 * example_seconds:.1f} ms per evaluated example"
    ]
    total = 0.0
    for name, counts in plan_counts(config, work).items():
        hours = (counts["steps"] * step_seconds + counts["examples"] * example_seconds) / 3600
        total += hours
        lines.append(
            f"  {name:>10}: {counts['steps']:>9,.0f} client steps, {counts['examples']:>10,.0f} "
            f"examples evaluated: {hours:5.2f} CPU h (total {total:5.2f})"
        )
    for cell in config.skipped:
        lines.append(
            f"  skipped {cell.federation}x{cell.steps} at {cell.rounds} rounds: {cell.reason}"
        )
    return lines


def measure_unit_costs(config: RegimeConfig, work: TrackingWorkload) -> tuple[float, float]:
    """Seconds per client step (mean over the seen tasks, 2 steps each after a warm-up) and per
    evaluated example (on the curve split), measured on this machine now."""
    from workload.model import set_lora_state
    from workload.training import train_lora

    settings = replace(work.train, batch_size=config.local_batch_size, local_epochs=1)
    pools = task_pools(config.base.seen, 4 * config.local_batch_size, 0)
    model = work.model_for(initial_adapter(work.lora, seed=0))
    per_task = []
    for pool in pools.values():
        data = local_work_draw(pool, 2 * config.local_batch_size, seed=0, server_round=1, node=1)
        set_lora_state(model, initial_adapter(work.lora, seed=0))
        train_lora(model, data, settings, seed=0)
        began = time.perf_counter()
        train_lora(model, data, settings, seed=1)
        per_task.append((time.perf_counter() - began) / 2)
    eval_before, examples_before = work.eval_seconds, work.eval_examples
    work.evaluate(initial_adapter(work.lora, seed=0), "curve")
    example_seconds = (work.eval_seconds - eval_before) / (work.eval_examples - examples_before)
    return sum(per_task) / len(per_task), example_seconds


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line; plan, run the stages, or report."""
    from benchmarks.regimes_report import write_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 10 min")
    parser.add_argument("--plan", action="store_true", help="measure unit costs, print the plan")
    parser.add_argument("--stage", action="append", help="run only this stage (repeatable)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--report-only", action="store_true", help="report from the saved JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--fork-from", type=Path, metavar="DIR", help="start as a fork of DIR")
    parser.add_argument("--combine", type=Path, metavar="DIR", help="add DIR's results")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be positive")
    config = QUICK if args.quick else RegimeConfig()
    stem = args.out_dir / config.results_stem
    json_path = stem.with_suffix(".json")
    if args.plan:
        torch.set_num_threads(args.threads)
        work = load_tracking_workload(config.base, config.curve_examples)
        step_seconds, example_seconds = measure_unit_costs(config, work)
        print("\n".join(plan_lines(config, work, step_seconds, example_seconds)))
        return
    if args.fork_from is not None:
        if json_path.exists():
            parser.error(f"{json_path} exists; fork into an empty --out-dir")
        source = json.loads((args.fork_from / json_path.name).read_text())
        args.out_dir.mkdir(parents=True, exist_ok=True)
        fork = fork_results(source)
        fork["meter"] = zero_meter()
        write_json(json_path, fork)
    if args.combine is not None:
        fork = json.loads((args.combine / json_path.name).read_text())
        write_json(json_path, combine(json.loads(json_path.read_text()), fork))
    if args.report_only or args.combine is not None:
        results = json.loads(json_path.read_text())
    else:
        results = run_stages(config, args.out_dir, args.stage, threads=args.threads)
        write_json(json_path, results)
    command = "python -m benchmarks.regimes" + (" --quick" if args.quick else "")
    write_report(results, config, stem, command)
    print(f"wall {results['wall_seconds'] / 60:.1f} min; wrote {stem}.md/.json/.png")


if __name__ == "__main__":
    main()
