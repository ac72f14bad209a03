"""Server cost as the federation grows: peak RSS and time of one round over T replies (issue 15).

What and why
------------
A server that merges T client adapters should not need T adapters of memory, nor wait for the
last reply before it starts working. This benchmark measures both for FedRobustMerge, against the
same strategy handed a list and against Flower's own FedAvg, so that the numbers say what the
design costs rather than what it is meant to cost.

Synthetic stage (default). Replies are shaped like a rank-16 LoRA on q, k, v, o, gate, up and down
of LLaMA-7B (32 layers, hidden 4096, intermediate 11008; about 160 MB of float32 per reply) under
PEFT's key names; ``--layers`` shrinks the depth (module shapes kept) and ``--hidden`` the width
(intermediate scaled alike) so that runs fit a small machine: memory is reported in units of one
adapter as well as in MB, which survives the shrink. Each reply is the global adapter plus small
Gaussian noise seeded by its node id. For every T (default 16, 128, 1024) and mode, one round runs
in a fresh subprocess:

- ``stream``: FedRobustMerge (default settings: RobustMerge paper-exact on the delta, the norm
  screen) is handed a generator that builds each reply only when the strategy asks for it. The
  screen is given a history of earlier rounds' update norms (those of replies from other nodes,
  built the same way) so that it has something to bound a reply against before the round's own
  statistics exist: this is round 2 of a run.
- ``stream-round1``: the same at the smallest T without that history (round 1 of a run).
- ``list``: FedRobustMerge handed a fully built list, as Flower's blocking ``send_and_receive``
  delivers replies (with the same screen history as the stream, so that only the hand-over
  differs).
- ``flower-fedavg``: ``flwr.serverapp.strategy.FedAvg.aggregate_train`` on a list.

``--modes`` also takes strategy configurations (``benchmarks.scale_modes``: default, fedavg, ties,
dare, svd, exact-mean, paper-equation, krum, median, centered-clip; ``all`` for every mode): each
runs round 1 (no screen history) and round 2 (history) over a lazy stream, streamed rounds folding
and buffered ones keeping ``--buffer`` (buffer-replies, default the run config's) replies in
memory and spilling the rest to a temporary folder; their rows go under the json's
``strategy-modes``.

Measured per round: the growth of the kernel's RSS high-water mark (VmHWM, reset just before the
replies exist, with the global adapter already built) over the RSS at that point, in MB and in
adapters; so a list's own replies count, as they do on a server that holds them. The wall time of
``aggregate_train``; for a stream the part of it spent building replies (a stand-in for the
network, subtracted in "strategy s"); and the time from the last reply handed over (the
generator's StopIteration) to the new global. A list is whole when the call starts, so its last
reply is handed over at the call. List modes whose predicted memory, (T + 3) adapters, exceeds
``--cap-gib`` are skipped and recorded as such; every probe also runs a watchdog that ends it,
recorded as "aborted", once its RSS grows past the cap: the machine is never driven into swap.

Simulation stage (``--simulation``). A real ``flwr run`` of this app through
``scripts/run_simulation.sh`` with ``--sim-clients`` simulated clients (default 256), fraction-train
0.25 and a small training budget; from the run's metrics.json and the clients' log lines it reports,
per round, the server's round time per sampled client, the merge's share, and what is left after
the clients' own training.

Results go to ``benchmarks/results/scale.{json,md,png}`` (``scale-quick.*`` for ``--quick``);
configurations already in the json are skipped (resume) unless ``--fresh``.

Usage::

    python -m benchmarks.scale --quick             # 2 layers of hidden 256, T = 4, 16 (< 2 min)
    python -m benchmarks.scale --layers 2          # full width, shallow: 10 MB replies
    python -m benchmarks.scale                     # LLaMA-7B r16, T = 16, 128, 1024 (long)
    python -m benchmarks.scale --simulation        # the Flower simulation stage only
    python -m benchmarks.scale --layers 2 --modes all --clients 16 128   # every mode, 2 rounds
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from benchmarks.inprocess import FakeGrid, set_task_identity, train_reply
from benchmarks.merge_speed import (
    LLAMA_7B_MODULES,
    _reset_peak_rss,
    _status_kib,
    cpu_model,
    lora_key,
)
from strategies import FedRobustMerge
from strategies.robust import RobustSettings
from strategies.strategy_settings import Defaults

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MB = 1e6
GIB = 1024**3

STREAM, ROUND1, LIST, FLOWER = "stream", "stream-round1", "list", "flower-fedavg"
MODES = (STREAM, LIST, FLOWER)
LIST_MODES = (LIST, FLOWER)
# Noise added to the global for each reply (standard deviation, per entry).
NOISE_STD = 1e-3
# Update norms of earlier rounds given to the screen in the stream mode.
HISTORY_REPLIES = 4
# Nodes whose replies stand for the earlier rounds (never among a round's 1..T).
HISTORY_NODE_BASE = 10**9
# The allocator setting of every probe: tensors above 64 KiB are mmapped, so freeing one returns
# its pages at once and RSS follows what is alive (glibc's adaptive threshold would keep them).
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# The target of issue 15: peak memory at the largest T within this many adapters of the smallest.
TARGET_ADAPTERS = 4.0

Adapter = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Shape:
    """The adapter: ``layers`` LLaMA decoder layers of width ``hidden``, LoRA rank ``rank``."""

    layers: int = 32
    hidden: int = 4096
    rank: int = 16

    @property
    def intermediate(self) -> int:
        """The MLP width, LLaMA-7B's 11008 scaled with ``hidden``."""
        return round(11008 * self.hidden / 4096)

    def modules(self) -> list[tuple[str, int, int]]:
        """(module path, d_in, d_out) of one layer, LLaMA-7B's scaled to this width."""
        width = {4096: self.hidden, 11008: self.intermediate}
        return [(name, width[d_in], width[d_out]) for name, d_in, d_out in LLAMA_7B_MODULES]

    def tensors(self) -> list[tuple[str, tuple[int, int]]]:
        """Every tensor's PEFT key and shape (A: rank x d_in, B: d_out x rank), in order."""
        return [
            (lora_key(layer, name, factor), shape)
            for layer in range(self.layers)
            for name, d_in, d_out in self.modules()
            for factor, shape in (("A", (self.rank, d_in)), ("B", (d_out, self.rank)))
        ]

    @property
    def adapter_bytes(self) -> int:
        """Bytes of one float32 adapter."""
        return sum(rows * cols for _, (rows, cols) in self.tensors()) * 4


@dataclass(frozen=True)
class Config:
    """One measured round: ``mode`` over ``clients`` replies of ``shape``."""

    mode: str
    clients: int
    shape: Shape
    seed: int = 0
    threads: int = 2

    @property
    def name(self) -> str:
        """The key of this round in the results json."""
        return f"{self.mode} T={self.clients}"


def predicted_bytes(mode: str, clients: int, shape: Shape) -> int | None:
    """What a list mode will need at least: the replies, the new global and a working copy;
    None for the streaming modes, which are measured (the watchdog guards them)."""
    if mode not in LIST_MODES:
        return None
    return (clients + 3) * shape.adapter_bytes


def build_global(shape: Shape, seed: int) -> Adapter:
    """The global adapter: A uniform in +-1/sqrt(d_in) as PEFT initialises it, B drawn from
    N(0, 0.02^2) as a trained B is non-zero (so that the merge prunes real magnitudes)."""
    generator = torch.Generator().manual_seed(seed)
    adapter: Adapter = {}
    for key, (rows, cols) in shape.tensors():
        if ".lora_A." in key:
            bound = 1.0 / math.sqrt(cols)
            adapter[key] = torch.rand(rows, cols, generator=generator).mul_(2 * bound).sub_(bound)
        else:
            adapter[key] = torch.randn(rows, cols, generator=generator).mul_(0.02)
    return adapter


def reply_tensors(
    global_adapter: Mapping[str, torch.Tensor], node: int, seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Node ``node``'s trained adapter, one tensor at a time: the global plus N(0, NOISE_STD^2)
    noise from a generator seeded by (seed, node), so every run builds the same replies."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + node + 1)
    for key, value in global_adapter.items():
        noise = torch.randn(value.shape, generator=generator).mul_(NOISE_STD)
        yield key, noise.add_(value)


def build_reply(global_adapter: Mapping[str, torch.Tensor], node: int, seed: int) -> Any:
    """Node ``node``'s train reply Message, its tensors in wire form (each float32 tensor is
    serialised as it is drawn, so building a reply never holds two copies of it)."""
    arrays = ArrayRecord(
        {key: Array(value) for key, value in reply_tensors(global_adapter, node, seed)}
    )
    return train_reply(node, arrays)


def update_norm_of(global_adapter: Mapping[str, torch.Tensor], node: int, seed: int) -> float:
    """||reply - global||, Frobenius over every tensor (what the screen computes), in float64."""
    squared = 0.0
    for key, value in reply_tensors(global_adapter, node, seed):
        squared += float((value - global_adapter[key]).to(torch.float64).square().sum())
    return math.sqrt(squared)


class ReplyFeed:
    """The replies of one round, handed over one at a time and timed.

    ``stream`` builds each reply only when the consumer asks for the next one and keeps no
    reference once it is handed over; ``handed`` counts them, ``build_seconds`` sums the time
    spent building them, and ``exhausted_at`` (``time.perf_counter``) is when the consumer asked
    past the last one (the generator's StopIteration).
    """

    def __init__(self, make: Callable[[int], Any], nodes: Sequence[int]) -> None:
        self.make = make
        self.nodes = list(nodes)
        self.handed = 0
        self.build_seconds = 0.0
        self.exhausted_at: float | None = None

    def stream(self) -> Iterator[Any]:
        """Build, hand over, forget; one reply at a time."""
        for node in self.nodes:
            started = time.perf_counter()
            message = self.make(node)
            self.build_seconds += time.perf_counter() - started
            self.handed += 1
            yield message
            del message
        self.exhausted_at = time.perf_counter()

    def build_all(self) -> list[Any]:
        """Every reply, built now (what a list-handed strategy receives)."""
        started = time.perf_counter()
        messages = []
        for node in self.nodes:
            messages.append(self.make(node))
            self.handed += 1
        self.build_seconds = time.perf_counter() - started
        return messages


def _abort(result: Mapping[str, Any]) -> None:
    """Print the probe's "aborted" result line and end the process at once (no unwinding: the
    round in progress would keep allocating)."""
    print(json.dumps(result), flush=True)
    os._exit(3)


class Watchdog:
    """Ends this process, after printing an "aborted" result line, once its RSS has grown more
    than ``cap`` bytes above ``baseline_kib``: a probe of a design that buffers every reply must
    not drive the machine into swap or the OOM killer. ``abort`` receives the result (tests
    record it instead of exiting)."""

    def __init__(
        self,
        config: Config,
        feed: ReplyFeed,
        baseline_kib: int,
        cap: int,
        abort: Callable[[Mapping[str, Any]], None] = _abort,
    ) -> None:
        self.config, self.feed, self.baseline_kib, self.cap = config, feed, baseline_kib, cap
        self.abort = abort
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        """Poll every 20 ms from a daemon thread."""
        self.thread.start()

    def stop(self) -> None:
        """The round finished: stop polling."""
        self.done.set()
        self.thread.join()

    def _watch(self) -> None:
        while not self.done.wait(0.02):
            growth = ((_status_kib("VmRSS") or 0) - self.baseline_kib) * 1024
            if growth > self.cap:
                self.abort(
                    {
                        **_identity(self.config),
                        "status": "aborted",
                        "reason": (
                            f"RSS grew past the cap ({self.cap / GIB:.1f} GiB) after "
                            f"{self.feed.handed} of {self.config.clients} replies were handed "
                            "over"
                        ),
                        "replies-handed-at-abort": self.feed.handed,
                    }
                )
                return


def _identity(config: Config) -> dict[str, Any]:
    return {"mode": config.mode, "clients": config.clients}


def open_round(
    mode: str,
    global_adapter: Mapping[str, torch.Tensor],
    clients: int,
    server_round: int,
    history: Sequence[float],
) -> Any:
    """The strategy of ``mode`` with round ``server_round`` open on ``global_adapter`` (our
    strategy's screen given ``history``); Flower's FedAvg needs no configure_train."""
    if mode == FLOWER:
        return FedAvg(min_train_nodes=clients, min_available_nodes=clients)
    strategy = FedRobustMerge(  # the streamed fold: the norm screen (what "auto" runs sparse)
        device="cpu",
        min_train_nodes=clients,
        min_available_nodes=2,
        robust=RobustSettings("norm"),
    )
    if history:
        strategy.restore_robust_state({"norm-history": list(history)})
    grid = FakeGrid(list(range(1, clients + 1)))
    instructions = strategy.configure_train(
        server_round,
        ArrayRecord(dict(global_adapter)),
        ConfigRecord(),
        grid,  # type: ignore[arg-type]
    )
    del instructions
    return strategy


def warm_up(config: Config) -> None:
    """One throwaway round of the same mode on a tiny adapter (1 layer of hidden 64, 2 replies),
    so that lazy imports, thread pools and allocator arenas exist before the measurement, as they
    do on a server that has run before; otherwise they are charged to the round."""
    tiny = Shape(layers=1, hidden=64, rank=config.shape.rank)
    global_adapter = build_global(tiny, config.seed + 1)
    history = [update_norm_of(global_adapter, HISTORY_NODE_BASE + i, 0) for i in range(2)]
    strategy = open_round(config.mode, global_adapter, 2, 2, history)
    replies = (build_reply(global_adapter, node, 0) for node in (1, 2))
    strategy.aggregate_train(2, replies if config.mode not in LIST_MODES else list(replies))


Value = TypeVar("Value")


@dataclass(frozen=True)
class MeasuredCall(Generic[Value]):
    """What ``measured_call`` saw of one call: its value, when it started and returned
    (``time.perf_counter``), the peak RSS growth over the RSS just before it, and how that
    growth was read."""

    value: Value
    started: float
    returned: float
    growth_bytes: int
    rss_method: str


def measured_call(
    config: Config,
    feed: ReplyFeed,
    cap: int | None,
    replies: Callable[[], Any],
    call: Callable[[Any], Value],
) -> MeasuredCall[Value]:
    """``call(replies())`` with the peak RSS growth both cause (a list of replies built by
    ``replies`` counts; the timing starts after it): the kernel's high-water mark reset (where
    Linux allows) after a collection, a watchdog ending the process past ``cap`` bytes of
    growth (None: no watchdog), the high-water mark read when ``call`` returns."""
    gc.collect()
    reset = _reset_peak_rss()
    baseline = _status_kib("VmRSS") or 0
    hwm_before = _status_kib("VmHWM") or 0
    watchdog = Watchdog(config, feed, baseline, cap) if cap is not None else None
    if watchdog is not None:
        watchdog.start()
    handed = replies()
    started = time.perf_counter()
    value = call(handed)
    returned = time.perf_counter()
    del handed
    peak = _status_kib("VmHWM") or 0
    if watchdog is not None:
        watchdog.stop()
    growth_kib = peak - (baseline if reset else max(baseline, hwm_before))
    return MeasuredCall(
        value,
        started,
        returned,
        max(growth_kib, 0) * 1024,
        "VmHWM reset before the replies exist, minus VmRSS then"
        if reset
        else "VmHWM after minus max(VmRSS, VmHWM) before (no reset: a lower bound)",
    )


def measure(config: Config, cap: int | None) -> dict[str, Any]:
    """Run one round of ``config`` in this process and return its measurements.

    ``cap``: bytes of RSS growth at which a watchdog ends the process (None: no watchdog, for
    in-process runs on tiny shapes).
    """
    torch.set_num_threads(config.threads)
    set_task_identity()
    warm_up(config)
    shape, seed, clients = config.shape, config.seed, config.clients
    global_adapter = build_global(shape, seed)
    history = (
        [
            update_norm_of(global_adapter, HISTORY_NODE_BASE + i, seed)
            for i in range(HISTORY_REPLIES)
        ]
        if config.mode in (STREAM, LIST)
        else []
    )
    server_round = 2 if history else 1
    strategy = open_round(config.mode, global_adapter, clients, server_round, history)
    feed = ReplyFeed(lambda node: build_reply(global_adapter, node, seed), range(1, clients + 1))

    call = measured_call(
        config,
        feed,
        cap,
        feed.build_all if config.mode in LIST_MODES else feed.stream,
        lambda replies: strategy.aggregate_train(server_round, replies),
    )
    arrays, metrics = call.value
    started, returned, growth = call.started, call.returned, call.growth_bytes
    assert arrays is not None, "the round produced no new global"

    # A list is whole when the call starts: its last reply is handed over at the call.
    last_handed = started if config.mode in LIST_MODES else feed.exhausted_at
    inside = feed.build_seconds if config.mode not in LIST_MODES else 0.0
    result: dict[str, Any] = {
        **_identity(config),
        "status": "ok",
        "server-round": server_round,
        "screen-history": len(history),
        "peak-rss-growth-mb": growth / MB,
        "peak-rss-growth-adapters": growth / shape.adapter_bytes,
        "round-seconds": returned - started,
        "reply-build-seconds": feed.build_seconds,
        "reply-build-inside-round": config.mode not in LIST_MODES,
        "strategy-seconds": returned - started - inside,
        "last-reply-to-return-seconds": (
            returned - last_handed if last_handed is not None else None
        ),
        "replies-handed": feed.handed,
        "rss-method": call.rss_method,
    }
    if isinstance(strategy, FedRobustMerge):
        report = strategy.round_report(server_round)
        result["accepted"] = len(report.accepted_nodes)
        result["rejected"] = len(report.rejected)
        result["merge-seconds"] = report.merge_seconds
        result["norm-bound"] = report.norm_bound.bound if report.norm_bound else None
    else:
        result["accepted"] = clients if metrics is not None else 0
        result["rejected"] = 0
    return result


def probe_command(config: Config, cap: int) -> list[str]:
    """The subprocess that measures ``config`` on its own (``--probe``)."""
    payload = json.dumps({**asdict(config), "cap": cap})
    return [sys.executable, "-m", "benchmarks.scale", "--probe", payload]


def run_probe(
    config: Config, cap: int, timeout: float, command: list[str] | None = None
) -> dict[str, Any]:
    """Measure ``config`` in a fresh subprocess (its own allocator and high-water mark);
    ``command``: another probe's command line (``scale_modes``), ``config`` naming it."""
    try:
        completed = subprocess.run(
            command or probe_command(config, cap),
            cwd=ROOT,
            env={**os.environ, **PROBE_ENV},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {**_identity(config), "status": "failed", "reason": f"timed out after {timeout} s"}
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if lines:
        return dict(json.loads(lines[-1]))
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
    return {
        **_identity(config),
        "status": "failed",
        "reason": f"exit code {completed.returncode}: {' | '.join(tail)}",
    }


def plan(args: argparse.Namespace, shape: Shape) -> list[Config]:
    """Every configuration of the synthetic stage, smallest T first."""
    configs = []
    for clients in sorted(args.clients):
        for mode in (m for m in args.modes if m in MODES):
            configs.append(Config(mode, clients, shape, args.seed, args.threads))
        if clients == min(args.clients) and STREAM in args.modes:
            configs.append(Config(ROUND1, clients, shape, args.seed, args.threads))
    return configs


def skip_reason(config: Config, cap: int) -> str | None:
    """Why ``config`` is not run (its predicted memory exceeds the cap), or None."""
    predicted = predicted_bytes(config.mode, config.clients, config.shape)
    if predicted is not None and predicted > cap:
        return (
            f"predicted {predicted / GIB:.1f} GiB ((T + 3) adapters of "
            f"{config.shape.adapter_bytes / MB:.1f} MB) exceeds the cap of {cap / GIB:.1f} GiB"
        )
    return None


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    import flwr

    return {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": getattr(flwr, "__version__", "unknown"),
    }


def load_results(path: Path, shape: Shape, fresh: bool) -> dict[str, Any]:
    """The json so far (resume), or a fresh one; refuses to mix results of another shape."""
    if path.exists() and not fresh:
        data: dict[str, Any] = json.loads(path.read_text())
        saved = data.get("shape", {})
        if (saved.get("layers"), saved.get("hidden"), saved.get("rank")) != (
            shape.layers,
            shape.hidden,
            shape.rank,
        ):
            raise SystemExit(
                f"{path} holds results for another shape ({data['shape']}); "
                "pass --fresh to start over, or --output-dir for a new folder"
            )
        data.setdefault("results", {})
        return data
    return {"benchmark": "scale", "results": {}}


def shape_record(shape: Shape) -> dict[str, Any]:
    """The json's description of the adapter."""
    return {
        "layers": shape.layers,
        "hidden": shape.hidden,
        "intermediate": shape.intermediate,
        "rank": shape.rank,
        "modules": [name for name, _, _ in LLAMA_7B_MODULES],
        "adapter-bytes": shape.adapter_bytes,
        "adapter-mb": shape.adapter_bytes / MB,
    }


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Atomically (write, then rename), so an interrupted run keeps what it had."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".json.tmp")
    scratch.write_text(json.dumps(data, indent=2) + "\n")
    scratch.replace(path)


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def target_verdict(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Whether the stream's peak at the largest T is within TARGET_ADAPTERS of its peak at the
    smallest T, from the measured rows (or why it cannot be said)."""
    measured = {
        row["clients"]: row["peak-rss-growth-adapters"]
        for row in results.values()
        if row["mode"] == STREAM and row.get("status") == "ok"
    }
    streamed = [row for row in results.values() if row["mode"] == STREAM]
    if not streamed:
        return "not measured (no stream rows)"
    largest = max(row["clients"] for row in streamed)
    smallest = min(row["clients"] for row in streamed)
    if largest == smallest:
        return "not measured (one T only)"
    if largest not in measured:
        status = next(r for r in streamed if r["clients"] == largest)
        return f"not met: the stream at T = {largest} did not finish ({status.get('reason', '')})"
    if smallest not in measured:
        return f"not measured: the stream at T = {smallest} did not finish"
    gap = measured[largest] - measured[smallest]
    verdict = "met" if gap <= TARGET_ADAPTERS else "not met"
    return (
        f"{verdict}: peak growth at T = {largest} is {gap:+.1f} adapters from T = {smallest} "
        f"(target: within {TARGET_ADAPTERS:g})"
    )


def ratio_rows(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Per T, the peak growth (adapters) of each mode side by side, and list / stream."""
    by_t: dict[int, dict[str, Mapping[str, Any]]] = {}
    for row in results.values():
        by_t.setdefault(int(row["clients"]), {})[str(row["mode"])] = row
    lines = [
        "| T | stream (adapters) | list (adapters) | Flower FedAvg (adapters) | "
        "list / stream | FedAvg / stream |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for clients in sorted(by_t):
        rows = by_t[clients]
        cells = []
        values: dict[str, float | None] = {}
        for mode in MODES:
            values[mode] = None
            if mode not in rows:
                cells.append("-")
            elif rows[mode].get("status") != "ok":
                cells.append(str(rows[mode].get("status")))
            else:
                values[mode] = float(rows[mode]["peak-rss-growth-adapters"])
                cells.append(f"{values[mode]:.1f}")
        ours = values[STREAM]
        ratios = [
            f"{other / ours:.1f}x" if other is not None and ours else "-"
            for other in (values[LIST], values[FLOWER])
        ]
        lines.append(f"| {clients} | " + " | ".join(cells + ratios) + " |")
    return lines


def render_markdown(data: Mapping[str, Any]) -> str:
    """scale.md: how it was measured, the table, the side-by-side ratios, a short reading."""
    shape = data["shape"]
    results: dict[str, dict[str, Any]] = data["results"]
    host = data.get("machine", {})
    lines = [
        "# Server memory and time as the number of clients grows (issue 15)",
        "",
        f"Measured {data.get('date', '')} on {data.get('machine-note', 'this machine')}: "
        f"{host.get('cpu', '?')} ({host.get('arch', '?')}, {host.get('cores', '?')} cores), "
        f"torch {host.get('torch', '?')}, flwr {host.get('flwr', '?')}. "
        f"Command: `{data.get('command', 'python -m benchmarks.scale')}`.",
        "",
        f"Replies: LLaMA-7B-shaped LoRA, {shape['layers']} layers, hidden {shape['hidden']}, "
        f"intermediate {shape['intermediate']}, rank {shape['rank']}, float32: one adapter = "
        f"{shape['adapter-mb']:.1f} MB. Each round runs in a fresh process; peak RSS growth is "
        "the high-water mark above the RSS just before the replies exist (the global already "
        'built), so a list\'s own replies count. "strategy s" leaves out the time a stream '
        'spends building replies; "last reply -> global" is from the stream\'s last reply '
        "(for a list: the call) to the new global.",
        "",
        "| T | mode | round | peak RSS growth (MB) | (adapters) | round s | strategy s | "
        "last reply -> global s | accepted | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {mode: i for i, mode in enumerate((STREAM, ROUND1, LIST, FLOWER))}
    for row in sorted(results.values(), key=lambda r: (r["clients"], order.get(r["mode"], 9))):
        ok = row.get("status") == "ok"
        status = "ok" if ok else f"{row.get('status')}: {row.get('reason', '')}"
        label = {1: "1 (no history)", 2: "2 (history)"}.get(row.get("server-round", 0), "-")
        if row["mode"] == FLOWER:
            label = "-"
        lines.append(
            f"| {row['clients']} | {row['mode']} | {label if ok else '-'} | "
            f"{_fmt(row.get('peak-rss-growth-mb')) if ok else '-'} | "
            f"{_fmt(row.get('peak-rss-growth-adapters')) if ok else '-'} | "
            f"{_fmt(row.get('round-seconds'), 2) if ok else '-'} | "
            f"{_fmt(row.get('strategy-seconds'), 2) if ok else '-'} | "
            f"{_fmt(row.get('last-reply-to-return-seconds'), 3) if ok else '-'} | "
            f"{_fmt(row.get('accepted')) if ok else '-'} | {status} |"
        )
    lines += ["", "Peak RSS growth side by side (adapters):", "", *ratio_rows(results), ""]
    lines += ["## Reading", "", *reading(results), ""]
    from benchmarks import scale_modes

    lines += scale_modes.render(data)
    simulation = data.get("simulation")
    if simulation:
        lines += render_simulation(simulation)
    return "\n".join(lines)


def reading(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A few sentences computed from the rows: the target, the slopes, the tail."""
    out = [
        f"- Target (peak at the largest T within {TARGET_ADAPTERS:g} adapters of the "
        f"smallest, stream): {target_verdict(results)}."
    ]
    for mode in (STREAM, LIST, FLOWER):
        rows = sorted(
            (r for r in results.values() if r["mode"] == mode and r.get("status") == "ok"),
            key=lambda r: r["clients"],
        )
        if len(rows) >= 2:
            first, last = rows[0], rows[-1]
            slope = (last["peak-rss-growth-adapters"] - first["peak-rss-growth-adapters"]) / (
                last["clients"] - first["clients"]
            )
            out.append(
                f"- {mode}: {first['peak-rss-growth-adapters']:.1f} adapters at T = "
                f"{first['clients']}, {last['peak-rss-growth-adapters']:.1f} at T = "
                f"{last['clients']}: {slope:.2f} adapters per extra client."
            )
    tails = [r for r in results.values() if r["mode"] == STREAM and r.get("status") == "ok"]
    for row in sorted(tails, key=lambda r: r["clients"]):
        tail, total = row.get("last-reply-to-return-seconds"), row.get("round-seconds")
        if tail is not None and total:
            out.append(
                f"- stream, T = {row['clients']}: {tail:.3f} s of the round's {total:.2f} s come "
                f"after the last reply ({100 * tail / total:.0f}%)."
            )
    skipped = [r for r in results.values() if r.get("status") in ("skipped", "aborted")]
    for row in sorted(skipped, key=lambda r: (r["clients"], r["mode"])):
        out.append(f"- {row['mode']} at T = {row['clients']}: {row['status']} ({row['reason']}).")
    return out


def render_simulation(simulation: Mapping[str, Any]) -> list[str]:
    """The simulation stage's section of scale.md."""
    lines = [
        "## Flower simulation",
        "",
        f"`flwr run` through scripts/run_simulation.sh: {simulation['clients']} simulated "
        f"clients, fraction-train {simulation['fraction-train']}, "
        f"{simulation['num-server-rounds']} rounds, "
        f"overrides `{simulation['overrides']}`; {simulation.get('wall-seconds', 0):.0f} s in "
        f"all. Status: {simulation['status']}.",
    ]
    if simulation.get("note"):
        lines += ["", simulation["note"]]
    lines += [
        "",
        "| round | sampled | accepted | round s | merge s | clients' training s (sum) | "
        "round s per client | merge ms per client | rest per client s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in simulation.get("rounds", []):
        lines.append(
            f"| {row['round']} | {row['sampled']} | {row['accepted']} | "
            f"{row['seconds']:.1f} | {row['merge-seconds']:.3f} | "
            f"{_fmt(row.get('client-train-seconds'))} | {row['seconds-per-client']:.3f} | "
            f"{1000 * row['merge-seconds-per-client']:.2f} | "
            f"{_fmt(row.get('rest-per-client-seconds'), 3)} |"
        )
    lines += [
        "",
        '"rest per client" = (round s - merge s - clients\' training s / parallel actors) / '
        "sampled: Flower's message passing, the ClientApp's start-up and (de)serialisation, "
        "an estimate that assumes the actors never idle. Round 1 includes the actors' start.",
        "",
    ]
    return lines


def write_plot(path: Path, data: Mapping[str, Any]) -> bool:
    """scale.png: peak RSS growth (adapters) against T, log x, one line per mode; False when
    there is nothing measured to plot or matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results = data["results"]
    if not any(row.get("status") == "ok" for row in results.values()):
        return False
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    styles = {STREAM: "o-", LIST: "s--", FLOWER: "^:", ROUND1: "D"}
    for mode in (STREAM, LIST, FLOWER, ROUND1):
        rows = sorted(
            (r for r in results.values() if r["mode"] == mode and r.get("status") == "ok"),
            key=lambda r: r["clients"],
        )
        if rows:
            axes.plot(
                [r["clients"] for r in rows],
                [r["peak-rss-growth-adapters"] for r in rows],
                styles[mode],
                label=mode if mode != ROUND1 else "stream, round 1 (no screen history)",
            )
    axes.set_xscale("log", base=2)
    axes.set_xlabel("replies per round (T)")
    axes.set_ylabel("peak RSS growth (adapters)")
    shape = data["shape"]
    axes.set_title(
        f"One round, {shape['layers']} layers x hidden {shape['hidden']}, r{shape['rank']} "
        f"({shape['adapter-mb']:.1f} MB per adapter)",
        fontsize=9,
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


# ---------------------------------------------------------------- simulation stage

CLIENT_LINE = re.compile(r"client: round (\d+), .*?, (\d+) examples, train-loss \S+, ([\d.]+) s")


def client_train_seconds(log_text: str) -> dict[int, float]:
    """Sum of the clients' training seconds per round, from their log lines (Ray's log
    deduplication must be off: RAY_DEDUP_LOGS=0)."""
    totals: dict[int, float] = {}
    for match in CLIENT_LINE.finditer(log_text):
        server_round = int(match[1])
        totals[server_round] = totals.get(server_round, 0.0) + float(match[3])
    return totals


def simulation_rounds(
    metrics: Mapping[str, Any], train_seconds: Mapping[int, float], actors: int
) -> list[dict[str, Any]]:
    """Per round of metrics.json: time per client, the merge's share, the rest."""
    rows = []
    for entry in metrics.get("rounds", []):
        server_round = int(entry.get("server-round", 0))
        if server_round == 0 or "seconds" not in entry:
            continue
        sampled = int(entry.get("clients-sampled", 0))
        accepted = int(entry.get("train", {}).get("clients-accepted", 0))
        merge = float(entry.get("merge", {}).get("merge-seconds") or 0.0)
        seconds = float(entry["seconds"])
        train = train_seconds.get(server_round)
        rest = (
            (seconds - merge - train / actors) / sampled if train is not None and sampled else None
        )
        rows.append(
            {
                "round": server_round,
                "sampled": sampled,
                "accepted": accepted,
                "seconds": seconds,
                "merge-seconds": merge,
                "client-train-seconds": train,
                "seconds-per-client": seconds / sampled if sampled else 0.0,
                "merge-seconds-per-client": merge / accepted if accepted else 0.0,
                "rest-per-client-seconds": rest,
            }
        )
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stop_superlink(control_port: int) -> None:
    """Stop the local SuperLink that ``flwr run`` started for this stage: the one listening on
    this stage's own control port, by its pid."""
    found = subprocess.run(
        ["pgrep", "-f", f"flower-superlink.*--control-api-address 127.0.0.1:{control_port}"],
        capture_output=True,
        text=True,
        check=False,
    )
    for pid in (int(p) for p in found.stdout.split()):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue


def run_simulation(args: argparse.Namespace) -> dict[str, Any]:
    """The simulation stage: one ``flwr run`` of this app, its metrics.json and log read back."""
    workdir = Path(tempfile.mkdtemp(prefix="scale-sim-"))
    out = workdir / "run"
    overrides = (
        f"num-server-rounds={args.sim_rounds} fraction-train={args.sim_fraction} "
        f"min-train-nodes=2 train-examples={args.sim_examples} eval-examples={args.sim_examples} "
        f"max-length=16 batch-size=8 server-eval=false fraction-evaluate=0.0 "
        f"output-dir='{out}' {args.sim_overrides}"
    ).strip()
    control = _free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(workdir / "flwr-home"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
        "NUM_SUPERNODES": str(args.sim_clients),
        "RAY_DEDUP_LOGS": "0",
    }
    command = ["bash", str(ROOT / "scripts" / "run_simulation.sh"), "-c", overrides]
    print(f"simulation: {shlex.join(command)} (NUM_SUPERNODES={args.sim_clients})", flush=True)
    started = time.perf_counter()
    status = "ok"
    with subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            log_text, _ = process.communicate(timeout=args.sim_timeout)
            if process.returncode != 0:
                status = f"failed (exit code {process.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            log_text, _ = process.communicate()
            status = f"timed out after {args.sim_timeout:.0f} s"
        finally:
            _stop_superlink(control)
    wall = time.perf_counter() - started
    (workdir / "simulation.log").write_text(log_text)
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    actors = max(1, os.cpu_count() or 1)
    record: dict[str, Any] = {
        "clients": args.sim_clients,
        "fraction-train": args.sim_fraction,
        "rounds": simulation_rounds(metrics, client_train_seconds(log_text), actors),
        "overrides": overrides.replace(str(out), "<tmp>"),
        "wall-seconds": wall,
        "parallel-actors": actors,
        "status": status,
        "log": str(workdir / "simulation.log"),
    }
    record["num-server-rounds"] = args.sim_rounds
    if status == "ok" and not args.keep_sim_dir:
        shutil.rmtree(out, ignore_errors=True)
    return record


# ---------------------------------------------------------------- driver


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--layers", type=int, help="decoder layers (default 32; --quick: 2)")
    parser.add_argument("--hidden", type=int, help="hidden width (default 4096; --quick: 256)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--clients", type=int, nargs="+", help="T values (default 16 128 1024; --quick: 4 16)"
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=[*MODES, *strategy_modes(), "all"],
        default=list(MODES),
        help="stream/list/flower-fedavg rows, and/or strategy configurations (scale_modes."
        "MODES: round 1 and round 2 each); 'all': every one",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        nargs="+",
        choices=(1, 2),
        default=[1, 2],
        help="rounds of the strategy configurations (1: no screen history, 2: history)",
    )
    parser.add_argument(
        "--buffer",
        type=int,
        default=Defaults.buffer_replies,
        help="buffer-replies of the strategy configurations",
    )
    parser.add_argument("--cap-gib", type=float, default=8.0, help="memory cap per probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per probe")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per probe")
    parser.add_argument("--quick", action="store_true", help="2 layers, hidden 256, T = 4, 16")
    parser.add_argument("--fresh", action="store_true", help="ignore results already written")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process, no watchdog (tests, tiny shapes): peaks are less clean",
    )
    parser.add_argument("--machine-note", default="", help="e.g. '2-vCPU x86_64 cloud VM'")
    parser.add_argument("--simulation", action="store_true", help="run the simulation stage")
    parser.add_argument("--sim-clients", type=int, default=256)
    parser.add_argument("--sim-rounds", type=int, default=3)
    parser.add_argument("--sim-fraction", type=float, default=0.25)
    parser.add_argument("--sim-examples", type=int, default=8, help="train/eval examples")
    parser.add_argument("--sim-overrides", default="", help="further run-config overrides")
    parser.add_argument("--sim-timeout", type=float, default=3600.0)
    parser.add_argument("--keep-sim-dir", action="store_true")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if "all" in args.modes:
        args.modes = [*MODES, *strategy_modes()]
    layers, hidden, clients = (2, 256, [4, 16]) if args.quick else (32, 4096, [16, 128, 1024])
    args.layers = args.layers or layers
    args.hidden = args.hidden or hidden
    args.clients = args.clients or clients
    return args


def strategy_modes() -> list[str]:
    """The strategy configurations' names (``scale_modes.MODES``)."""
    from benchmarks import scale_modes

    return list(scale_modes.MODES)


def probe_main(payload: str) -> int:
    """Subprocess side of ``run_probe``: measure one config, print one JSON line."""
    spec = json.loads(payload)
    cap = int(spec.pop("cap"))
    config = Config(**{**spec, "shape": Shape(**spec["shape"])})
    print(json.dumps(measure(config, cap)), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected stage, write scale.{json,md,png}, print the side-by-side table."""
    args = parse_args(argv)
    if args.probe is not None:
        return probe_main(args.probe)
    shape = Shape(args.layers, args.hidden, args.rank)
    stem = "scale-quick" if args.quick else "scale"
    json_path = args.output_dir / f"{stem}.json"
    data = load_results(json_path, shape, args.fresh)
    data.update(
        {
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "machine-note": args.machine_note or data.get("machine-note", ""),
            "shape": shape_record(shape),
            "settings": {
                "cap-bytes": int(args.cap_gib * GIB),
                "seed": args.seed,
                "threads": args.threads,
                "noise-std": NOISE_STD,
                "screen-history-replies": HISTORY_REPLIES,
                "buffer-replies": args.buffer,
                "allocator": "in-process" if args.in_process else PROBE_ENV,
            },
            "command": "python -m benchmarks.scale " + shlex.join(list(argv or sys.argv[1:])),
        }
    )
    cap = int(args.cap_gib * GIB)
    if args.simulation:
        data["simulation"] = run_simulation(args)
        write_json(json_path, data)
    else:
        for config in plan(args, shape):
            if config.name in data["results"]:
                print(f"{config.name}: already in {json_path.name}, skipped", flush=True)
                continue
            reason = skip_reason(config, cap)
            if reason is not None:
                result = {**_identity(config), "status": "skipped", "reason": reason}
            elif args.in_process:
                result = measure(config, None)
            else:
                result = run_probe(config, cap, args.timeout)
            data["results"][config.name] = result
            write_json(json_path, data)
            print(f"{config.name}: {_summary(result)}", flush=True)
        from benchmarks import scale_modes

        scale_modes.run(args, data, json_path, cap, shape)
    markdown = render_markdown(data)
    (args.output_dir / f"{stem}.md").write_text(markdown + "\n")
    write_plot(args.output_dir / f"{stem}.png", data)
    print()
    print("\n".join(ratio_rows(data["results"])))
    print()
    print("\n".join(reading(data["results"])))
    return 0


def _summary(result: Mapping[str, Any]) -> str:
    if result.get("status") != "ok":
        return f"{result.get('status')}: {result.get('reason')}"
    tail = result.get("last-reply-to-return-seconds")
    return (
        f"peak +{result['peak-rss-growth-mb']:.1f} MB = "
        f"{result['peak-rss-growth-adapters']:.1f} adapters, round "
        f"{result['round-seconds']:.2f} s (strategy {result['strategy-seconds']:.2f} s), "
        f"last reply -> global {_fmt(tail, 3)} s, accepted {result.get('accepted')}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
