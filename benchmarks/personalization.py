"""Personalised federations (issue 27, item 4): is a site better off with what it keeps?

What and why
------------
Every site today gets the same global adapter. Issue 27 adds two personalisation modes; this
benchmark scores each site on *its own* held-out test data under:

- the global FedAvg adapter and the global RobustMerge (paper-exact) adapter (today's baseline);
- ``local-finetune``: that global fine-tuned for ``personalization-steps`` local steps on the
  site's own training data (``client.personalization``), for both globals;
- ``shared-a`` (FedSA-LoRA): sites send only LoRA A, the server merges A (FedAvg, as in the
  paper) and each site keeps its own B across rounds (``client.shared_a``).

Federations and local work are the regime map's cross-silo regimes (``benchmarks.regimes``:
``RegimeConfig``'s regimes at 64 local steps, each scored at its rounds cells): 7 sites, one seen
task each, and 16 sites with Dirichlet(0.1) label skew inside each task
(``benchmarks.federations``: a 512-example pool per task and seed, split by
``benchmarks.partitioning``); every round a site trains exactly ``steps`` steps of batch 8
(``local_work_draw``). Three seeds.

The app's own code runs every round, in-process: the server is ``server.app.build_merge_strategy``
built from a run config (``ServerSettings``), driven as its round loop drives it
(``configure_train`` / ``aggregate_train`` / ``configure_evaluate`` / ``aggregate_evaluate``; a
``benchmarks.inprocess.FakeGrid`` lists the nodes); every site is the real ``ClientApp``
(``client.app.app``, mods included) called with its own persistent ``Context`` (so shared-a's B
lives in ``context.state`` as in a simulation). A site's data are files, as on a real site
(node-config ``data-path``, rewritten each round with the round's draw, and ``eval-data-path``).

Scores: read from the run, not recomputed. Each site's evaluate reply carries ``eval-accuracy``
(the global) and, under a personalisation mode, ``personalized-accuracy`` (the site's own
adapter), both scored by the client on its ``eval-data-path``; those replies are what the
server's ``aggregate_evaluate`` logs per node (``strategies.round_metrics``). That is cheaper
than scoring adapters here (the local-finetune copy never leaves the site; re-scoring would
train it twice) and it is what a site sees. One FedAvg run with ``local-finetune`` gives both
the FedAvg global's and the fine-tuned copy's scores (the mode changes evaluation only), and
likewise for RobustMerge, so a (federation, seed) is three runs.

What that implies (stated in the report): a data file's classes are the labels it holds
(``workload.tasks.load_data_file``), so a site chooses among *its own* classes. A site's test
file is drawn from its task's test split with the site's own label mix (every class of its
training shard at least once), so train and test classes agree; with Dirichlet(0.1) a few
sites hold a single class and score 1.0 under every arm (a tie). Intervals: the per-site
accuracy is the unit, paired by site and seed (``benchmarks.stats.bootstrap_interval`` with the
sites as the resampled "examples"); test-example noise inside a site is not in them.

Uplink: the bytes the server received per site and round (its round report), so shared-a's
"A only" is measured, not assumed.

Resumable: results are written atomically after every run; a rerun skips saved runs.

Usage::

    python -m benchmarks.personalization --threads 1        # the full run (resumes)
    python -m benchmarks.personalization --quick            # a tiny run, personalization-quick.*
    python -m benchmarks.personalization --report-only
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import shutil
import time
import tomllib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from flwr.app import Message
from flwr.serverapp import Grid

from benchmarks.federations import (
    Federation,
    RunMeter,
    federation_shards,
    local_work_draw,
    task_pools,
)
from benchmarks.inprocess import FakeGrid, set_task_identity
from benchmarks.quality import CACHE_DIR, RESULTS_DIR, SEEN_TASKS
from benchmarks.quality_v2 import DEFAULT_HYPER, write_json
from benchmarks.regimes import RegimeConfig
from workload.tasks import TaskData, load_task

ROOT = Path(__file__).resolve().parents[1]
# Unit costs on the 2-core machine, idle, one thread (benchmarks.regimes.BUDGET_REASON): the
# estimate printed at start until this invocation has measured its own.
STEP_SECONDS = 0.57
EXAMPLE_SECONDS = 0.018


@dataclass(frozen=True)
class RunSpec:
    """One federated run per (federation, seed): a merge method and a personalisation mode."""

    name: str
    merge_method: str
    personalization: str


@dataclass(frozen=True)
class Arm:
    """A reported arm: the per-site scores ``field`` (``global`` or ``personal``) of ``run``."""

    name: str
    run: str
    field: str


RUNS = (
    RunSpec("fedavg", "fedavg", "local-finetune"),
    RunSpec("robustmerge", "robustmerge", "local-finetune"),
    RunSpec("shared-a", "fedavg", "shared-a"),
)
ARMS = (
    Arm("global fedavg", "fedavg", "global"),
    Arm("global robustmerge", "robustmerge", "global"),
    Arm("local-finetune (fedavg global)", "fedavg", "personal"),
    Arm("local-finetune (robustmerge global)", "robustmerge", "personal"),
    Arm("shared-a (FedSA-LoRA, fedavg A)", "shared-a", "personal"),
)
REFERENCE_ARM = "global fedavg"


def cross_silo_cells() -> tuple[tuple[str, int, tuple[int, ...]], ...]:
    """The regime map's cross-silo cells: (federation, local steps, rounds) of every
    ``RegimeConfig`` regime at its largest local steps (64)."""
    regimes = RegimeConfig().regimes
    steps = max(regime.steps for regime in regimes)
    return tuple((r.federation, r.steps, r.rounds) for r in regimes if r.steps == steps)


@dataclass(frozen=True)
class PersonalizationConfig:
    """Sizes of a run (the defaults are the full run)."""

    seen: tuple[str, ...] = SEEN_TASKS
    seeds: tuple[int, ...] = (0, 1, 2)
    federations: tuple[Federation, ...] = RegimeConfig().federations
    cells: tuple[tuple[str, int, tuple[int, ...]], ...] = field(default_factory=cross_silo_cells)
    pool_examples: int = 512
    local_batch_size: int = 8
    test_examples: int = 256
    max_length: int = 64
    learning_rate: float = 1e-3
    # The regime map's tuned choice at 7 sites x 64 steps for both FedAvg and RobustMerge, at 1
    # and 3 rounds (benchmarks/results/regimes.md, "Tuning so far"); 4 collapsed RobustMerge.
    server_lr: float = 2.0
    fuse_weight: float = DEFAULT_HYPER["fuse_weight"]
    keep_ratio: float = 0.2
    personalization_steps: int = 4
    runs: tuple[RunSpec, ...] = RUNS
    resamples: int = 2000
    tag: str = "full"

    @property
    def results_stem(self) -> str:
        """``personalization`` for the full run, ``personalization-<tag>`` otherwise."""
        return "personalization" if self.tag == "full" else f"personalization-{self.tag}"

    def federation(self, name: str) -> Federation:
        """The federation shape called ``name``."""
        return next(f for f in self.federations if f.name == name)

    def run_keys(self) -> list[tuple[str, int, int, tuple[int, ...], int, RunSpec]]:
        """Every run in order: (key, clients, steps, rounds cells, seed, spec)."""
        out = []
        for name, steps, rounds in self.cells:
            clients = self.federation(name).clients
            for seed in self.seeds:
                for spec in self.runs:
                    key = f"{name}x{steps}|{seed}|{spec.name}"
                    out.append((key, clients, steps, rounds, seed, spec))
        return out


QUICK = PersonalizationConfig(
    seen=("sentiment", "20ng"),
    seeds=(0, 1),
    federations=(Federation("2", 2), Federation("3", 3, alpha=0.5)),
    cells=(("2", 2, (1, 2)), ("3", 1, (1,))),
    pool_examples=48,
    local_batch_size=4,
    test_examples=12,
    max_length=32,
    personalization_steps=2,
    resamples=200,
    tag="quick",
)


# ----------------------------------------------------------------------------- site data


def site_test_data(shard: TaskData, test: TaskData, examples: int, *, seed: int) -> TaskData:
    """The site's held-out test data: ``examples`` examples of its task's test split with the
    shard's own label mix (class c gets ``round(examples * n_c / n)``, at least one for every
    class of the shard, as far as the split has them), drawn without replacement, seeded."""
    counts: dict[int, int] = {}
    for label in shard.labels:
        counts[label] = counts.get(label, 0) + 1
    by_class: dict[int, list[int]] = {}
    for position, label in enumerate(test.labels):
        by_class.setdefault(label, []).append(position)
    rng = random.Random(seed)
    picked: list[int] = []
    for label in sorted(counts):
        members = by_class.get(label, [])
        want = max(1, round(examples * counts[label] / len(shard)))
        picked.extend(rng.sample(members, min(want, len(members))))
    picked.sort()
    return TaskData(
        shard.name,
        [test.texts[i] for i in picked],
        [test.labels[i] for i in picked],
        list(test.label_names),
    )


def write_site_file(path: Path, data: TaskData) -> None:
    """``data`` as a site's JSONL data file (label = the readable class name, which
    ``load_data_file`` reads back to the same name)."""
    lines = (
        json.dumps({"text": text, "label": data.label_names[label]})
        for text, label in zip(data.texts, data.labels, strict=True)
    )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- one run


def app_run_config(
    config: PersonalizationConfig, spec: RunSpec, clients: int, steps: int, rounds: int, seed: int
) -> dict[str, Any]:
    """The app's run config (pyproject's ``[tool.flwr.app.config]``) with this run's settings."""
    with open(ROOT / "pyproject.toml", "rb") as stream:
        run_config: dict[str, Any] = dict(tomllib.load(stream)["tool"]["flwr"]["app"]["config"])
    run_config.update(
        {
            "num-server-rounds": rounds,
            "seed": seed,
            "merge-method": spec.merge_method,
            "merge-mode": "paper-exact",
            "keep-ratio": config.keep_ratio,
            "fuse-weight": config.fuse_weight,
            "server-lr": config.server_lr,
            "robust-aggregation": "none",
            "fraction-train": 1.0,
            "min-train-nodes": clients,
            "fraction-evaluate": 1.0,
            "min-evaluate-nodes": clients,
            "server-eval": False,
            "merge-device": "cpu",
            "learning-rate": config.learning_rate,
            "batch-size": config.local_batch_size,
            "local-epochs": 1,
            "max-length": config.max_length,
            "train-examples": steps * config.local_batch_size,
            "eval-examples": 1_000_000,  # every example of the site's test file
            "personalization": spec.personalization,
            "personalization-steps": config.personalization_steps,
            "seen-tasks": ",".join(config.seen),
        }
    )
    return run_config


def run_one(
    config: PersonalizationConfig,
    spec: RunSpec,
    federation: Federation,
    steps: int,
    cells: Sequence[int],
    seed: int,
    work_dir: Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """One federated run through the app's server strategy and ClientApp; the sites' evaluate
    replies after each round of ``cells``, and what the run cost."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from client.app import app as client_app
    from server.app import build_merge_strategy
    from server.config import ServerSettings
    from workload.model import LoraSettings, initial_adapter

    began = time.perf_counter()
    set_task_identity()
    pools = task_pools(config.seen, config.pool_examples, seed)
    shards = federation_shards(pools, federation, seed)
    tests = {task: load_task(task, "test") for task in config.seen}
    run_config = app_run_config(config, spec, len(shards), steps, max(cells), seed)
    strategy = build_merge_strategy(ServerSettings.from_run_config(run_config))
    global_adapter = initial_adapter(LoraSettings.for_global(run_config), seed=seed)
    shutil.rmtree(work_dir, ignore_errors=True)
    contexts: dict[int, Context] = {}
    sites = []
    for node, shard in enumerate(shards, start=1):
        folder = work_dir / f"site-{node}"
        folder.mkdir(parents=True)
        test = site_test_data(
            shard, tests[shard.name], config.test_examples, seed=seed * 1000 + node
        )
        write_site_file(folder / "test.jsonl", test)
        node_config: dict[str, bool | float | int | str] = {
            "partition-id": node - 1,
            "eval-data-path": str(folder / "test.jsonl"),
        }
        contexts[node] = Context(1, node, node_config, RecordDict(), run_config)
        sites.append(
            {
                "task": shard.name,
                "train_examples": len(shard),
                "test_examples": len(test),
                "classes": len(set(shard.labels)),
            }
        )
    nodes = sorted(contexts)
    meter = RunMeter()
    checkpoints: dict[str, dict[str, list[float | None]]] = {}
    grid = cast(Grid, FakeGrid(nodes))
    for server_round in range(1, max(cells) + 1):
        for node, shard in zip(nodes, shards, strict=True):
            draw = local_work_draw(
                shard,
                steps * config.local_batch_size,
                seed=seed,
                server_round=server_round,
                node=node,
            )
            path = work_dir / f"site-{node}" / f"train-{server_round}.jsonl"
            write_site_file(path, draw)
            contexts[node].node_config["data-path"] = str(path)
        arrays = ArrayRecord(dict(global_adapter))
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        replies = [client_app(m, contexts[m.metadata.dst_node_id]) for m in messages]
        record, _ = strategy.aggregate_train(server_round, replies)
        meter.round_hook(server_round, strategy.round_report(server_round))
        if record is not None:
            global_adapter = {
                k: v.to(torch.float32) for k, v in record.to_torch_state_dict().items()
            }
        if server_round not in cells:
            continue
        arrays = ArrayRecord(dict(global_adapter))
        asks = strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
        answers = {
            m.metadata.dst_node_id: client_app(m, contexts[m.metadata.dst_node_id]) for m in asks
        }
        strategy.aggregate_evaluate(server_round, list(answers.values()))  # logs per node
        scores = site_scores([answers[node] for node in nodes])
        checkpoints[str(server_round)] = scores
        log(
            f"  {spec.name} seed {seed} round {server_round}: mean over sites global "
            f"{_mean(scores['global']):.3f}, personal {_mean(scores['personal']):.3f}"
        )
    shutil.rmtree(work_dir, ignore_errors=True)
    return {
        "sites": sites,
        "checkpoints": checkpoints,
        "cost": meter.summary(global_adapter),
        "client_steps": len(nodes) * steps * max(cells),
        "seconds": round(time.perf_counter() - began, 1),
    }


def site_scores(replies: Sequence[Message]) -> dict[str, list[float | None]]:
    """The sites' evaluate replies, in node order: the global's accuracy, the personal
    adapter's (None when the reply has none) and the examples scored."""
    from protocol import wire

    metrics = [reply.content.metric_records[wire.METRICS] for reply in replies]

    def number(record: Mapping[str, Any], key: str) -> float | None:
        return float(record[key]) if key in record else None

    return {
        "global": [number(m, wire.EVAL_ACCURACY) for m in metrics],
        "personal": [number(m, wire.PERSONALIZED_ACCURACY) for m in metrics],
        "examples": [number(m, wire.NUM_EXAMPLES) for m in metrics],
    }


def _mean(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else float("nan")


# ----------------------------------------------------------------------------- the run


def run_cost(
    config: PersonalizationConfig, clients: int, steps: int, cells: Sequence[int]
) -> tuple[float, float]:
    """(client steps, evaluated examples) of one run: training, the personal copy's steps, and
    two scorings per site and checkpoint (global and personal)."""
    train = clients * steps * max(cells) + clients * config.personalization_steps * len(cells)
    examples = 2 * clients * config.test_examples * len(cells)
    return float(train), float(examples)


def estimate_seconds(
    config: PersonalizationConfig,
    todo: Sequence[tuple[int, int, tuple[int, ...]]],
    rate: float | None,
) -> float:
    """Seconds for the runs ``todo`` ((clients, steps, cells) each): at the unit costs, scaled by
    ``rate`` (measured seconds over estimated seconds so far; None: 1)."""
    total = 0.0
    for clients, steps, cells in todo:
        train, examples = run_cost(config, clients, steps, cells)
        total += train * STEP_SECONDS + examples * EXAMPLE_SECONDS
    return total * (rate if rate is not None else 1.0)


def open_results(config: PersonalizationConfig, json_path: Path, threads: int) -> dict[str, Any]:
    """The saved results of ``config`` (a mismatch is refused), or new ones with the machine
    and date."""
    wanted = json.loads(json.dumps(asdict(config)))
    if json_path.exists():
        results: dict[str, Any] = json.loads(json_path.read_text())
        if results["config"] != wanted:
            raise SystemExit(f"{json_path} was made with another configuration; move it away")
        return results
    return {
        "config": wanted,
        "run_id": uuid.uuid4().hex,
        "machine": f"{platform.node()} {platform.machine()}, torch {torch.__version__}, "
        f"{threads} thread(s) per process",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds": 0.0,
        "runs": {},
    }


def run_all(
    config: PersonalizationConfig,
    out_dir: Path,
    *,
    threads: int = 1,
    log: Callable[[str], None] = print,
    work_dir: Path = CACHE_DIR / "personalization",
) -> dict[str, Any]:
    """Every run of ``config`` not yet in the saved JSON, saving after each."""
    torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{config.results_stem}.json"
    results = open_results(config, json_path, threads)
    runs = results["runs"]
    plan = config.run_keys()
    todo = [(k, c, s, r) for k, c, s, r, _, _ in plan if k not in runs]
    estimate = estimate_seconds(config, [(c, s, r) for _, c, s, r in todo], None)
    log(
        f"{len(plan)} runs, {len(plan) - len(todo)} saved; estimated {estimate / 3600:.2f} h for "
        f"the {len(todo)} left ({STEP_SECONDS} s per client step, {1000 * EXAMPLE_SECONDS:.0f} ms "
        "per scored example, one thread, idle 2-core machine)"
    )
    spent, estimated = 0.0, 0.0
    for key, clients, steps, cells, seed, spec in plan:
        if key in runs:
            continue
        log(f"run {key}")
        record = run_one(
            config, spec, config.federation(key.split("x")[0]), steps, cells, seed, work_dir, log
        )
        runs[key] = record
        results["wall_seconds"] = round(float(results["wall_seconds"]) + record["seconds"], 1)
        write_json(json_path, results)
        spent += record["seconds"]
        estimated += estimate_seconds(config, [(clients, steps, cells)], None)
        left = [(c, s, r) for k, c, s, r, _, _ in plan if k not in runs]
        remaining = estimate_seconds(config, left, spent / estimated)
        log(
            f"[{spent:.0f}s] {key} saved ({record['seconds']:.0f}s); ~{remaining / 3600:.2f} h left"
        )
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line; run (resuming) and report, or only report."""
    from benchmarks.personalization_report import write_report

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny configuration")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--report-only", action="store_true", help="report from the saved JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be positive")
    config = QUICK if args.quick else PersonalizationConfig()
    stem = args.out_dir / config.results_stem
    if args.report_only:
        results = json.loads(stem.with_suffix(".json").read_text())
    else:
        results = run_all(config, args.out_dir, threads=args.threads)
    command = "python -m benchmarks.personalization" + (" --quick" if args.quick else "")
    write_report(results, config, stem.with_suffix(".md"), command)
    print(f"wrote {stem}.md/.json")


if __name__ == "__main__":
    main()
