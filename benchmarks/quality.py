"""Quality benchmark: the paper's Table 2, federated, on the project's offline default workload.

What and why
------------
RobustMerge's paper (Table 2, LLaVA-1.5-7B, LoRA r=16) reports merged seen/unseen averages for
RobustMerge against Task Arithmetic, TIES, DARE and PCB. This script measures the same rows on
what our users run: all-MiniLM-L6-v2 + LoRA, label-name similarity scoring, one seen task per
client, unseen tasks that nothing trains on or is chosen with. Everything goes through the
project's own code: ``workload.training.train_lora`` / ``evaluate_lora`` for training and scoring,
``strategies.merge_lora`` for every one-shot merge, and ``strategies.FedRobustMerge`` (driven
in-process: configure_train, local training, reply Messages, aggregate_train) for the rounds.

Rows: zero-shot; individual (each task's own adapter on its own task); multi-task (one adapter
trained on every seen task, same number of optimizer steps in total as all individual adapters
together, tasks interleaved epoch by epoch since a task's label names define its classes);
one-shot merges of the individual adapters by every registered method; the ablation (prune only,
prune + scale, + cross-task normalisation = the engine's robustmerge); federated runs of R
rounds. Sweeps (one-shot keep-ratio x fuse-weight; federated fuse-weight x server-lr) are scored
on the seen tasks' dev splits only; every table reports test accuracy.

Individual adapters are cached as safetensors under ``benchmarks/.cache/`` (keyed by the
configuration) so a re-run skips their training; partial results are written to
``benchmarks/results/quality-v1*.json`` after each stage. Its headline was replaced by
``benchmarks.quality_v2`` (which owns ``benchmarks/results/quality.*``); this module stays the home
of the workload's training, scoring and in-process federated runs that v2 and the other quality
benchmarks drive.

Usage::

    python -m benchmarks.quality --quick        # 1 seed, 2 rounds, few examples (< 10 min)
    python -m benchmarks.quality                # v1's committed results (quality-v1.*)
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from benchmarks.inprocess import FakeGrid, set_task_identity, train_reply
from benchmarks.train_cache import TrainCache
from protocol import wire
from strategies.merging import available_methods, merge_lora, parse_layout
from strategies.merging.pruning import complementary_scale, prune_by_magnitude
from workload.model import (
    LoraSettings,
    build_lora_model,
    get_lora_state,
    initial_adapter,
    set_lora_state,
)
from workload.tasks import TaskData, load_task
from workload.training import TrainSettings, evaluate_lora, train_lora

Adapter = dict[str, torch.Tensor]
Scores = dict[str, float]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CACHE_DIR = Path(__file__).resolve().parent / ".cache" / "quality"
# The 7-task workload: one seen task per client.
SEEN_TASKS = ("banking77", "hwu64", "stackoverflow", "sentiment", "yahoo", "dbpedia", "20ng")
UNSEEN_TASKS = ("clinc150", "mcid")
# One-shot rows: (row name, registered method, hyperparameters). robustmerge uses the paper's
# lambda = 2; the other methods their registered defaults.
ONE_SHOT_ROWS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("robustmerge (paper-exact)", "robustmerge", {"mode": "paper-exact"}),
    ("robustmerge (paper-equation)", "robustmerge", {"mode": "paper-equation"}),
    ("fedavg", "fedavg", {}),
    ("task_arithmetic", "task_arithmetic", {}),
    ("ties", "ties", {}),
    ("dare", "dare", {}),
    ("svd", "svd", {}),
)


@dataclass(frozen=True)
class QualityConfig:
    """Sizes of one benchmark run (the defaults are the committed full run)."""

    seen: tuple[str, ...] = SEEN_TASKS
    unseen: tuple[str, ...] = UNSEEN_TASKS
    seeds: tuple[int, ...] = (0, 1, 2)
    train_examples: int = 256
    individual_epochs: int = 3
    eval_examples: int = 96
    dev_examples: int = 48
    rounds: int = 5
    fed_methods: tuple[str, ...] = ("robustmerge", "fedavg")
    fed_seeds: tuple[int, ...] = (0, 1, 2)
    keep_ratios: tuple[float, ...] = (0.1, 0.2, 0.5)
    oneshot_fuse_weights: tuple[float, ...] = (1.0, 2.0)
    fed_grid: tuple[tuple[float, float], ...] = ((1.0, 1.0), (2.0, 1.0), (2.0, 0.5), (1.0, 2.0))
    # FedAvg's server lr, swept like robustmerge's (a larger step is not an aggregation gain)
    fedavg_lrs: tuple[float, ...] = (1.0, 2.0, 4.0)
    sweep_rounds: int = 2
    batch_size: int = 32
    max_length: int = 64
    learning_rate: float = 1e-3
    tag: str = "full"

    def key(self) -> str:
        """A short hash of what the individual adapters depend on (the cache key)."""
        parts = (
            self.train_examples,
            self.individual_epochs,
            self.batch_size,
            self.max_length,
            self.learning_rate,
        )
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]

    @property
    def results_stem(self) -> str:
        """File name stem of this run's results: quality-v1 (the full run) or quality-v1-<tag>.
        The plain ``quality`` stem belongs to ``benchmarks.quality_v2``, which replaced this
        benchmark's headline."""
        return "quality-v1" if self.tag == "full" else f"quality-v1-{self.tag}"


QUICK = QualityConfig(
    seen=("stackoverflow", "sentiment", "20ng"),
    unseen=("mcid",),
    seeds=(0,),
    train_examples=32,
    individual_epochs=2,
    eval_examples=24,
    dev_examples=16,
    rounds=2,
    fed_seeds=(0,),
    keep_ratios=(0.2, 0.5),
    oneshot_fuse_weights=(1.0, 2.0),
    fed_grid=((1.0, 1.0), (2.0, 1.0)),
    fedavg_lrs=(1.0, 2.0),
    sweep_rounds=1,
    tag="quick",
)


@dataclass
class Workload:
    """The loaded data and the model that every stage reuses (one model, adapters swapped)."""

    config: QualityConfig
    lora: LoraSettings
    train: TrainSettings
    model: torch.nn.Module
    test: dict[str, TaskData] = field(default_factory=dict)
    dev: dict[str, TaskData] = field(default_factory=dict)
    # Models at other LoRA ranks than ``lora.r`` (mixed-rank runs), built on first use.
    other_ranks: dict[int, torch.nn.Module] = field(default_factory=dict)

    def model_at_rank(self, rank: int) -> torch.nn.Module:
        """The model with LoRA at ``rank`` (same base weights, alpha / r kept: ``with_rank``);
        ``self.model`` at ``lora.r``, others built once and kept, so adapters of any rank in a
        mixed-rank run load into a model of their own shapes."""
        if rank == self.lora.r:
            return self.model
        if rank not in self.other_ranks:
            self.other_ranks[rank] = build_lora_model(self.lora.with_rank(rank), seed=0)
        return self.other_ranks[rank]

    def model_for(self, adapter: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        """The model whose LoRA shapes fit ``adapter`` (its rank read from a ``lora_A``)."""
        ranks = {int(v.shape[0]) for k, v in adapter.items() if ".lora_A." in k}
        if len(ranks) != 1:
            raise ValueError(f"expected one LoRA rank in the adapter, found {sorted(ranks)}")
        return self.model_at_rank(ranks.pop())

    def evaluate(
        self,
        adapter: Mapping[str, torch.Tensor],
        split: str = "test",
        tasks: Sequence[str] | None = None,
    ) -> Scores:
        """Accuracy of ``adapter`` on each task of ``split`` (seen + unseen unless ``tasks``)."""
        data = self.test if split == "test" else self.dev
        names = list(tasks) if tasks is not None else list(data)
        model = self.model_for(adapter)
        set_lora_state(model, adapter)
        return {name: evaluate_lora(model, data[name], self.train).accuracy for name in names}

    def train_from(
        self, adapter: Mapping[str, torch.Tensor], data: TaskData, *, epochs: int, seed: int
    ) -> Adapter:
        """``adapter`` trained on ``data`` for ``epochs`` local epochs (a copy; input kept)."""
        model = self.model_for(adapter)
        set_lora_state(model, adapter)
        train_lora(model, data, replace(self.train, local_epochs=epochs), seed=seed)
        return get_lora_state(model)


def workload_settings(config: QualityConfig) -> tuple[LoraSettings, TrainSettings]:
    """The LoRA and training settings every benchmark run of ``config`` uses."""
    train = TrainSettings(
        batch_size=config.batch_size,
        max_length=config.max_length,
        learning_rate=config.learning_rate,
    )
    return LoraSettings(), train


def load_workload(config: QualityConfig) -> Workload:
    """Build the model once and load the fixed evaluation subsets (test: all tasks; dev: seen)."""
    lora, train = workload_settings(config)
    work = Workload(config, lora, train, build_lora_model(lora, seed=0))
    for name in (*config.seen, *config.unseen):
        work.test[name] = load_task(name, "test", limit=config.eval_examples, seed=12345)
    for name in config.seen:
        work.dev[name] = load_task(name, "dev", limit=config.dev_examples, seed=12345)
    return work


def train_data(name: str, config: QualityConfig, seed: int, round_index: int = 0) -> TaskData:
    """A class-balanced training subset: a new draw per seed and per federated round."""
    return load_task(name, "train", limit=config.train_examples, seed=1000 * seed + round_index)


def node_train_data(
    node_tasks: Sequence[str], node: int, config: QualityConfig, seed: int, server_round: int
) -> TaskData:
    """Node ``node``'s (1-based) training data in a federated round: a fresh draw of its task
    per round; a task named twice in ``node_tasks`` gets a different draw per node."""
    name = node_tasks[node - 1]
    copy = node_tasks[: node - 1].count(name)
    return train_data(name, config, seed, server_round + 100 * copy)


def summarise(scores: Scores, config: QualityConfig) -> Scores:
    """Per-task accuracies plus ``seen-avg`` and ``unseen-avg`` (of the tasks present)."""
    out = dict(scores)
    seen = [scores[t] for t in config.seen if t in scores]
    unseen = [scores[t] for t in config.unseen if t in scores]
    if seen:
        out["seen-avg"] = sum(seen) / len(seen)
    if unseen:
        out["unseen-avg"] = sum(unseen) / len(unseen)
    return out


# ----------------------------------------------------------------------------- adapters


def individual_adapters(
    work: Workload, seed: int, log: Callable[[str], None], cache_dir: Path = CACHE_DIR
) -> list[Adapter]:
    """Each seen task's adapter, trained alone from the seed's initial adapter (cached)."""
    config = work.config
    folder = cache_dir / config.key() / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    start = initial_adapter(work.lora, seed=seed)
    adapters = []
    for name in config.seen:
        path = folder / f"{name}.safetensors"
        if path.exists():
            adapters.append(load_file(str(path)))
            continue
        began = time.perf_counter()
        adapter = work.train_from(
            start, train_data(name, config, seed), epochs=config.individual_epochs, seed=seed
        )
        save_file(adapter, str(path), metadata={"format": "pt"})
        adapters.append(adapter)
        log(f"  individual {name} seed {seed}: {time.perf_counter() - began:.1f}s")
    return adapters


def multitask_adapter(work: Workload, seed: int) -> Adapter:
    """One adapter over every seen task: per epoch, one pass over each task in turn.

    Same data and optimizer steps as all individual adapters together. Tasks are interleaved by
    epoch rather than mixed in one batch because each task's classes are its own label names.
    """
    config = work.config
    adapter = initial_adapter(work.lora, seed=seed)
    data = {name: train_data(name, config, seed) for name in config.seen}
    for epoch in range(config.individual_epochs):
        for name in config.seen:
            adapter = work.train_from(adapter, data[name], epochs=1, seed=seed * 100 + epoch)
    return adapter


def ablation_merge(
    adapters: Sequence[Adapter],
    *,
    keep_ratio: float,
    scale_quantile: float,
    fuse_weight: float,
    scale: bool,
) -> Adapter:
    """RobustMerge without cross-task normalisation, composed from the engine's own steps.

    ``scale=False``: prune only, A_m = lambda sum_t A^_t, B_m = lambda sum_t B^_t / T.
    ``scale=True``: prune + complementary scale, B_m = lambda sum_t s~_t B^_t / T. Dividing by T
    (not by sum_t s~_t, the full method) is what "no normalisation" means; with s = 1 both agree.
    """
    layout = parse_layout(adapters[0].keys())
    count = len(adapters)
    merged: Adapter = {}
    for module in layout.modules:
        a_stack = torch.stack([a[module.a_key] for a in adapters])
        b_stack = torch.stack([a[module.b_key] for a in adapters])
        a_pruned = prune_by_magnitude(a_stack, keep_ratio)
        b_pruned = prune_by_magnitude(b_stack, keep_ratio)
        if scale:
            s = complementary_scale(a_stack, a_pruned, scale_quantile)
        else:
            s = torch.ones(a_stack.shape[:2])
        merged[module.a_key] = fuse_weight * a_pruned.sum(dim=0)
        merged[module.b_key] = fuse_weight * torch.einsum("ti,toi->oi", s, b_pruned) / count
    return {key: merged[key] for key in adapters[0]}


# ----------------------------------------------------------------------------- federated


def run_federated(
    work: Workload,
    *,
    method: str,
    seed: int,
    rounds: int,
    fuse_weight: float,
    server_lr: float,
    split: str,
    tasks: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    client_tasks: Sequence[str] | None = None,
    strategy_options: Mapping[str, Any] | None = None,
    data_hook: Callable[[int, TaskData], TaskData] | None = None,
    reply_hook: Callable[[int, Adapter, Adapter], Adapter] | None = None,
    train_factors: str | None = None,
    client_ranks: Sequence[int] | None = None,
    round_hook: Callable[[int, Any], None] | None = None,
    local_batch_size: int | None = None,
    train_cache: TrainCache | None = None,
) -> list[Scores]:
    """R rounds of FedRobustMerge in-process, one client per seen task; scores after each round.

    Each round: configure_train snapshots the global; every client loads it, trains one local
    epoch on a fresh subset of its task, and replies; aggregate_train merges the deltas
    (merge-target "delta", the app's default) and applies the server step.

    ``client_tasks`` gives node i + 1 its task (default: one node per seen task; a task named
    twice gets a different data draw per node). ``strategy_options`` go to FedRobustMerge (e.g.
    ``robust``). The attack benchmark's hooks: ``data_hook(node, data)`` changes a node's
    training data, ``reply_hook(node, global, trained)`` the adapter it replies with.
    ``train_factors`` is the clients' run-config ``train-factors`` (``"ab"``, or ``"b"`` for
    FFA-LoRA: every lora_A frozen); ``None`` keeps ``work.train``'s (``"ab"`` by default).
    ``local_batch_size`` is the clients' ``batch-size`` (``None``: ``work.train``'s), so a
    round can take several local steps on a small per-round draw.

    Per-client data (e.g. the Dirichlet shards of ``benchmarks.partitioning``): name each node's
    task in ``client_tasks`` and return the node's own data from ``data_hook``, which replaces
    the round's draw; ``benchmarks.partitioning.shard_data_hook`` builds such a hook.

    ``strategy_options`` may also override the sampling (``fraction_train`` and
    ``min_train_nodes``: partial participation). ``client_ranks`` (the run-config
    ``client-ranks``: node i + 1 trains rank ``client_ranks[i % len]``) makes a mixed-rank run
    as the app runs it: the global starts at the largest rank, each node starts from
    ``client.app.site_start`` (the global truncated to its rank, the client's own code) and
    replies at its rank with ``lora-rank``. ``round_hook`` gets (round, the strategy's
    ``RoundReport``) after each merge (merge time, site ranks, truncation errors, bytes
    received). ``train_cache`` (``TrainCache``) reuses a client's training when the same start,
    data, settings and seed come again (every run of one seed starts from the same global, so
    its round 1 is the same for every method and step size).
    """
    from flwr.app import ArrayRecord, ConfigRecord

    from client.app import site_start
    from strategies import FedRobustMerge
    from strategies.robust import RobustSettings

    set_task_identity()
    config = work.config
    local = replace(work.train, local_epochs=1)
    if train_factors is not None:
        local = replace(local, train_factors=train_factors)
    if local_batch_size is not None:
        local = replace(local, batch_size=local_batch_size)
    node_tasks = list(client_tasks) if client_tasks is not None else list(config.seen)
    nodes = list(range(1, len(node_tasks) + 1))
    # The quality, regime, rank and personalisation rows were all measured with the norm screen
    # (the default before "auto"): kept unless a caller (the attack benchmarks) picks a defence,
    # so rows measured before and after the change compare like with like.
    options: dict[str, Any] = {
        "fraction_train": 1.0,
        "min_train_nodes": len(nodes),
        "robust": RobustSettings("norm"),
    }
    options.update(strategy_options or {})
    strategy = FedRobustMerge(
        fraction_evaluate=0.0,
        min_evaluate_nodes=0,
        min_available_nodes=len(nodes),
        merge_method=method,
        fuse_weight=fuse_weight,
        server_lr=server_lr,
        device="cpu",
        diagnostics_modules=0,
        seed=seed,
        **options,
    )
    node_ranks = {
        node: int(client_ranks[(node - 1) % len(client_ranks)]) if client_ranks else work.lora.r
        for node in nodes
    }
    global_adapter = initial_adapter(work.lora.with_rank(max(node_ranks.values())), seed=seed)
    history = []
    for server_round in range(1, rounds + 1):
        began = time.perf_counter()
        messages = list(
            strategy.configure_train(
                server_round,
                ArrayRecord(dict(global_adapter)),
                ConfigRecord(),
                FakeGrid(nodes),  # type: ignore[arg-type]
            )
        )
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            data = node_train_data(node_tasks, node, config, seed, server_round)
            if data_hook is not None:
                data = data_hook(node, data)
            start = dict(message.content.array_records["arrays"].to_torch_state_dict())
            if client_ranks:
                start = site_start(start, work.lora.with_rank(node_ranks[node]))
            train_seed = seed * 100 + server_round
            cached = train_cache.get(start, data, local, train_seed) if train_cache else None
            if cached is None:
                model = work.model_for(start)
                set_lora_state(model, start)
                result = train_lora(model, data, local, seed=train_seed)
                trained = get_lora_state(model)
                if train_cache is not None:
                    train_cache.put(start, data, local, train_seed, trained, result)
            else:
                trained, result = cached
            if reply_hook is not None:
                trained = reply_hook(node, start, trained)
            rank = node_ranks[node] if client_ranks else None
            metrics = {wire.TRAIN_LOSS: result.mean_loss}
            if rank is not None:
                metrics[wire.LORA_RANK] = rank
            arrays = ArrayRecord({k: v.contiguous() for k, v in trained.items()})
            replies.append(train_reply(node, arrays, result.num_examples, **metrics))
        record, _ = strategy.aggregate_train(server_round, replies)
        if round_hook is not None:
            round_hook(server_round, strategy.round_report(server_round))
        if record is not None:
            global_adapter = {
                k: v.to(torch.float32) for k, v in record.to_torch_state_dict().items()
            }
        scores = summarise(work.evaluate(global_adapter, split, tasks), config)
        history.append(scores)
        log(
            f"  fed {method} lambda={fuse_weight} eta={server_lr} seed {seed} round "
            f"{server_round}: seen {scores.get('seen-avg', float('nan')):.3f} "
            f"({time.perf_counter() - began:.0f}s)"
        )
    return history


# ----------------------------------------------------------------------------- the run


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def aggregate_rows(per_seed: Mapping[str, Sequence[Scores]]) -> dict[str, dict[str, list[float]]]:
    """Row -> column -> [mean, std] over seeds (columns every seed has)."""
    table: dict[str, dict[str, list[float]]] = {}
    for row, runs in per_seed.items():
        columns = set.intersection(*(set(run) for run in runs)) if runs else set()
        table[row] = {c: list(_mean_std([run[c] for run in runs])) for c in sorted(columns)}
    return table


def run_benchmark(
    config: QualityConfig,
    out_dir: Path = RESULTS_DIR,
    log: Callable[[str], None] = print,
    cache_dir: Path = CACHE_DIR,
) -> dict[str, Any]:
    """Run every stage, saving ``quality[-tag].json`` after each; returns the results dict."""
    torch.set_num_threads(2)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "config": asdict(config),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip()
        + f", torch {torch.__version__}, {torch.get_num_threads()} threads",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "per_seed": {},
        "stages": {},
    }
    per_seed: dict[str, list[Scores]] = results["per_seed"]
    json_path = out_dir / f"{config.results_stem}.json"
    save = stage_saver(results, json_path, log)

    work = load_workload(config)
    save("load")
    first = config.seeds[0]

    # Sweep for the one-shot robustmerge merge (dev of seen tasks, first seed).
    adapters0 = individual_adapters(work, first, log, cache_dir)
    sweep: dict[str, float] = {}
    for keep in config.keep_ratios:
        for fuse in config.oneshot_fuse_weights:
            merged = merge_lora(
                adapters0, "robustmerge", device="cpu", keep_ratio=keep, fuse_weight=fuse
            )
            dev = summarise(work.evaluate(merged, "dev"), config)
            sweep[f"{keep}|{fuse}"] = dev["seen-avg"]
            log(f"  one-shot sweep keep={keep} lambda={fuse}: dev seen {dev['seen-avg']:.3f}")
    best_keep, best_fuse = (float(x) for x in max(sweep, key=lambda k: sweep[k]).split("|"))
    results["oneshot_sweep"] = {"dev_seen_avg": sweep, "chosen": [best_keep, best_fuse]}
    save("one-shot sweep")

    for seed in config.seeds:
        adapters = individual_adapters(work, seed, log, cache_dir)
        per_seed.setdefault("zero-shot", []).append(
            summarise(work.evaluate(initial_adapter(work.lora, seed=seed)), config)
        )
        individual: Scores = {}
        for name, adapter in zip(config.seen, adapters, strict=True):
            individual.update(work.evaluate(adapter, "test", [name]))
        per_seed.setdefault("individual", []).append(summarise(individual, config))
        save(f"seed {seed}: zero-shot, individual")
        per_seed.setdefault("multi-task", []).append(
            summarise(work.evaluate(multitask_adapter(work, seed)), config)
        )
        save(f"seed {seed}: multi-task")
        for row, method, hp in ONE_SHOT_ROWS:
            merged = merge_lora(adapters, method, device="cpu", **hp)
            per_seed.setdefault(f"one-shot {row}", []).append(
                summarise(work.evaluate(merged), config)
            )
        merged = merge_lora(
            adapters, "robustmerge", device="cpu", keep_ratio=best_keep, fuse_weight=best_fuse
        )
        per_seed.setdefault(
            f"one-shot robustmerge (swept: keep {best_keep}, lambda {best_fuse})", []
        ).append(summarise(work.evaluate(merged), config))
        save(f"seed {seed}: one-shot merges")
        for row, use_scale in (("prune only", False), ("prune + scale", True)):
            merged = ablation_merge(
                adapters, keep_ratio=0.2, scale_quantile=0.2, fuse_weight=2.0, scale=use_scale
            )
            per_seed.setdefault(f"ablation: {row}", []).append(
                summarise(work.evaluate(merged), config)
            )
        per_seed.setdefault("ablation: + normalisation (= robustmerge)", []).append(
            per_seed["one-shot robustmerge (paper-exact)"][-1]
        )
        save(f"seed {seed}: ablation")

    # Federated sweep: fuse weight x server lr for robustmerge in rounds (dev, first seed).
    fed_sweep: dict[str, float] = {}
    for fuse, lr in config.fed_grid:
        history = run_federated(
            work,
            method="robustmerge",
            seed=first,
            rounds=config.sweep_rounds,
            fuse_weight=fuse,
            server_lr=lr,
            split="dev",
            log=log,
        )
        fed_sweep[f"{fuse}|{lr}"] = history[-1]["seen-avg"]
    fed_fuse, fed_lr = (float(x) for x in max(fed_sweep, key=lambda k: fed_sweep[k]).split("|"))
    results["fed_sweep"] = {
        "dev_seen_avg": fed_sweep,
        "chosen": [fed_fuse, fed_lr],
        "rounds": config.sweep_rounds,
    }
    save("federated sweep")

    curves: dict[str, list[list[Scores]]] = {}
    results["fed_curves"] = curves
    for method in config.fed_methods:
        settings = [(fed_fuse, fed_lr)] if method == "robustmerge" else [(1.0, 1.0)]
        for fuse, lr in settings:
            label = (
                f"federated {method} (lambda {fuse}, eta {lr})"
                if method == "robustmerge"
                else f"federated {method}"
            )
            for seed in config.fed_seeds:
                history = run_federated(
                    work,
                    method=method,
                    seed=seed,
                    rounds=config.rounds,
                    fuse_weight=fuse,
                    server_lr=lr,
                    split="test",
                    log=log,
                )
                curves.setdefault(label, []).append(history)
                per_seed.setdefault(f"{label}, round {config.rounds}", []).append(history[-1])
                save(f"{label} seed {seed}")
    fedavg_lr_stage(work, results, log, save)  # its last save stamps the total wall time
    return results


def fedavg_lr_stage(
    work: Workload,
    results: dict[str, Any],
    log: Callable[[str], None],
    save: Callable[[str], None],
) -> None:
    """FedAvg with its server lr swept on dev (first seed), then run on test like robustmerge.

    RobustMerge's merged delta is larger than FedAvg's mean (lambda on both factors, A summed
    over clients), so over rounds it takes larger steps; this row tells a better aggregation
    from a larger step.
    """
    config = work.config
    sweep: dict[str, float] = {}
    for lr in config.fedavg_lrs:
        history = run_federated(
            work,
            method="fedavg",
            seed=config.seeds[0],
            rounds=config.sweep_rounds,
            fuse_weight=1.0,
            server_lr=lr,
            split="dev",
            log=log,
        )
        sweep[str(lr)] = history[-1]["seen-avg"]
    chosen = float(max(sweep, key=lambda k: sweep[k]))
    results["fedavg_sweep"] = {"dev_seen_avg": sweep, "chosen": chosen}
    save("fedavg server-lr sweep")
    label = f"federated fedavg (eta {chosen}, swept)"
    curves: dict[str, list[list[Scores]]] = results.setdefault("fed_curves", {})
    per_seed: dict[str, list[Scores]] = results["per_seed"]
    for seed in config.fed_seeds:
        history = run_federated(
            work,
            method="fedavg",
            seed=seed,
            rounds=config.rounds,
            fuse_weight=1.0,
            server_lr=chosen,
            split="test",
            log=log,
        )
        curves.setdefault(label, []).append(history)
        per_seed.setdefault(f"{label}, round {config.rounds}", []).append(history[-1])
        save(f"{label} seed {seed}")


def stage_saver(
    results: dict[str, Any],
    json_path: Path,
    log: Callable[[str], None],
    *,
    earlier_seconds: float = 0.0,
) -> Callable[[str], None]:
    """``save(stage)``: stamp the stage's time (counting ``earlier_seconds`` of an earlier
    run), refresh the table and write the JSON, so an interrupted run keeps what it did."""
    started = time.perf_counter()

    def save(stage: str) -> None:
        elapsed = round(earlier_seconds + time.perf_counter() - started, 1)
        results["stages"][stage] = elapsed
        results["table"] = aggregate_rows(results["per_seed"])
        results["wall_seconds"] = elapsed
        json_path.write_text(json.dumps(results, indent=1))
        log(f"[{elapsed:.0f}s] {stage} done")

    return save


def extend_saved_run(
    config: QualityConfig, out_dir: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """Add the stages a saved run of ``config`` lacks (today: the FedAvg server-lr stage)."""
    json_path = out_dir / f"{config.results_stem}.json"
    results: dict[str, Any] = json.loads(json_path.read_text())
    saved = results["config"]
    for name, value in asdict(config).items():
        if name in saved and name != "fedavg_lrs" and saved[name] != json.loads(json.dumps(value)):
            raise SystemExit(f"the saved run has {name} = {saved[name]!r}, not {value!r}")
    results["config"] = asdict(config)
    torch.set_num_threads(2)
    save = stage_saver(results, json_path, log, earlier_seconds=float(results["wall_seconds"]))
    if "fedavg_sweep" not in results:
        fedavg_lr_stage(load_workload(config), results, log, save)
    return results


# ----------------------------------------------------------------------------- reporting


def _cell(values: Sequence[float] | None) -> str:
    if values is None:
        return "-"
    mean, std = values
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def markdown(results: Mapping[str, Any], command: str) -> str:
    """The results tables (accuracy in %, mean ± std over seeds) as Markdown."""
    config = results["config"]
    tasks = [*config["seen"], *config["unseen"]]
    head = ["row", "seeds", *tasks, "seen avg", "unseen avg"]
    lines = [
        f"# Quality benchmark ({config['tag']})",
        "",
        f"- command: `{command}`",
        f"- machine: {results['machine']}",
        f"- date: {results['date']}",
        f"- wall time: {results['wall_seconds'] / 60:.1f} min",
        f"- sizes: {config['train_examples']} train examples per task (per round in the "
        f"federated runs), {config['individual_epochs']} epochs for individual/multi-task, "
        f"{config['eval_examples']} test examples per task, {config['dev_examples']} dev "
        f"examples per seen task for the sweeps; {config['rounds']} federated rounds; batch "
        f"{config['batch_size']}, learning rate {config['learning_rate']}, max length "
        f"{config['max_length']}.",
        "",
        "Test accuracy (%), mean ± standard deviation over seeds. Seen tasks are the clients' "
        "tasks; unseen tasks were never trained on nor used to choose anything.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row, columns in results["table"].items():
        n = len(results["per_seed"][row])
        cells = [_cell(columns.get(t)) for t in [*tasks, "seen-avg", "unseen-avg"]]
        lines.append(f"| {row} | {n} | " + " | ".join(cells) + " |")
    if "oneshot_sweep" in results:
        lines += [
            "",
            "## One-shot sweep (robustmerge, dev of seen tasks, first seed)",
            "",
            "| keep ratio | fuse weight | dev seen avg |",
            "|---|---|---|",
        ]
        for key, value in results["oneshot_sweep"]["dev_seen_avg"].items():
            keep, fuse = key.split("|")
            lines.append(f"| {keep} | {fuse} | {100 * value:.1f} |")
        lines.append(
            f"\nChosen: keep ratio {results['oneshot_sweep']['chosen'][0]}, fuse weight "
            f"{results['oneshot_sweep']['chosen'][1]}."
        )
    if "fed_sweep" in results:
        sweep = results["fed_sweep"]
        lines += [
            "",
            f"## Federated sweep (robustmerge on deltas, {sweep['rounds']} rounds, dev "
            "of seen tasks, first seed)",
            "",
            "| fuse weight | server lr | dev seen avg |",
            "|---|---|---|",
        ]
        for key, value in sweep["dev_seen_avg"].items():
            fuse, lr = key.split("|")
            lines.append(f"| {fuse} | {lr} | {100 * value:.1f} |")
        lines.append(f"\nChosen: fuse weight {sweep['chosen'][0]}, server lr {sweep['chosen'][1]}.")
    if "fedavg_sweep" in results:
        lines += [
            "",
            f"## FedAvg server-lr sweep ({config['sweep_rounds']} rounds, dev of seen tasks, "
            "first seed)",
            "",
            "| server lr | dev seen avg |",
            "|---|---|",
        ]
        for lr, value in results["fedavg_sweep"]["dev_seen_avg"].items():
            lines.append(f"| {lr} | {100 * value:.1f} |")
        lines.append(f"\nChosen: server lr {results['fedavg_sweep']['chosen']}.")
    if results.get("fed_curves"):
        lines += [
            "",
            "## Federated runs: test seen / unseen average per round (mean over seeds)",
            "",
            "| run | " + " | ".join(f"round {r + 1}" for r in range(config["rounds"])) + " |",
            "|---|" + "---|" * config["rounds"],
        ]
        for label, runs in results["fed_curves"].items():
            cells = []
            for r in range(min(len(h) for h in runs)):
                seen = sum(h[r]["seen-avg"] for h in runs) / len(runs)
                unseen = sum(h[r]["unseen-avg"] for h in runs) / len(runs)
                cells.append(f"{100 * seen:.1f} / {100 * unseen:.1f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], path: Path) -> None:
    """Seen vs unseen average per row (left), and seen/unseen per round of each run (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 6))
    markers = "osv^DPX*<>hpd8H"
    for index, (row, columns) in enumerate(results["table"].items()):
        if "seen-avg" in columns and "unseen-avg" in columns:
            left.errorbar(
                100 * columns["seen-avg"][0],
                100 * columns["unseen-avg"][0],
                xerr=100 * columns["seen-avg"][1],
                yerr=100 * columns["unseen-avg"][1],
                fmt=markers[index % len(markers)],
                label=row,
            )
    left.set_xlabel("seen-task average accuracy (%)")
    left.set_ylabel("unseen-task average accuracy (%)")
    left.set_title("test accuracy per row (mean ± std over seeds)")
    left.legend(fontsize=6, loc="best")
    for label, runs in results.get("fed_curves", {}).items():
        rounds = min(len(h) for h in runs)
        xs = list(range(1, rounds + 1))
        for column, style in (("seen-avg", "-o"), ("unseen-avg", "--x")):
            ys = [100 * sum(h[r][column] for h in runs) / len(runs) for r in range(rounds)]
            right.plot(xs, ys, style, label=f"{label} {column}")
    right.set_xlabel("round")
    right.set_ylabel("test accuracy (%)")
    right.set_title("federated runs (mean over seeds)")
    right.legend(fontsize=6, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, run, write the Markdown, JSON and PNG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, few examples")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the Markdown and PNG from the saved JSON (e.g. of an interrupted run)",
    )
    parser.add_argument(
        "--extend",
        action="store_true",
        help="add the stages a saved run lacks (e.g. one made before they existed) and report",
    )
    args = parser.parse_args(argv)
    config = QUICK if args.quick else QualityConfig()
    stem = args.out_dir / config.results_stem
    command = "python -m benchmarks.quality" + (" --quick" if args.quick else "")
    if args.extend:
        extended = extend_saved_run(config, args.out_dir, print)
        command += " && " + command + " --extend"
        stem.with_suffix(".md").write_text(markdown(extended, command))
        plot(extended, stem.with_suffix(".png"))
        return
    if args.report_only:
        saved = json.loads(stem.with_suffix(".json").read_text())
        stem.with_suffix(".md").write_text(markdown(saved, command))
        plot(saved, stem.with_suffix(".png"))
        return
    unknown = set(m for _, m, _ in ONE_SHOT_ROWS) - set(available_methods())
    if unknown:
        raise SystemExit(f"methods not registered: {sorted(unknown)}")
    results = run_benchmark(config, args.out_dir)
    stem.with_suffix(".md").write_text(markdown(results, command))
    plot(results, stem.with_suffix(".png"))
    print(f"done in {results['wall_seconds'] / 60:.1f} min; wrote {args.out_dir}")


if __name__ == "__main__":
    main()
