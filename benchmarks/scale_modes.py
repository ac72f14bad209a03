"""The scale benchmark per aggregation mode: round 1 and round 2 of each strategy configuration
(issue 25 item 5), measured as ``benchmarks.scale`` measures its stream (peak RSS growth over
the RSS just before the replies exist, in adapters; the round's wall time), each round in a
fresh subprocess.

A configuration is a name and the FedRobustMerge keyword arguments it stands for (``MODES``).
Streamed configurations (fedavg, RobustMerge paper-exact, ties, dare) fold each reply into
running sums as it arrives; buffered ones (svd, exact-mean, RobustMerge paper-equation, the
robust aggregations krum, median and centered-clip) keep ``buffer-replies`` (the run config's
default) replies in memory and spill the rest to a safetensors file each
(``strategies.reply_spill``), here in a temporary folder of the probe's own. Which one a round
did is read from its report (``RoundReport.streamed``), and so is how many replies spilled
(``RoundReport.spilled``). A buffered round of a product-space method still stacks one module
over all T replies at merge time: T x one module's bytes (times the method's own working
copies), the part of its peak that grows with T.

Round 1 has no screen history (the norm screen pools the round's own replies first); round 2
is given the update norms of ``HISTORY_REPLIES`` earlier replies, as ``scale``'s stream is.
Rows go to the results json under ``"strategy-modes"``, keyed ``"<mode> round <r> T=<T>"``;
rows already there are skipped (resume).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord

from benchmarks import scale
from benchmarks.inprocess import FakeGrid, set_task_identity
from strategies import FedRobustMerge
from strategies.robust.registry import RobustSettings
from strategies.strategy_settings import Defaults

# name -> FedRobustMerge keyword arguments ("robust": RobustSettings fields), JSON-able.
# The merge methods' rows run the norm screen, the defence they were measured with before the
# default became "auto" (centered clipping, a buffered round: the "default" and "centered-clip"
# rows), so the folding methods' rows keep measuring the streamed fold.
NORM = {"robust": {"aggregation": "norm"}}
MODES: dict[str, dict[str, Any]] = {
    "default": {},
    "norm": dict(NORM),
    "fedavg": {"merge_method": "fedavg", **NORM},
    "ties": {"merge_method": "ties", **NORM},
    "dare": {"merge_method": "dare", **NORM},
    "svd": {"merge_method": "svd", **NORM},
    "exact-mean": {"merge_method": "exact-mean", **NORM},
    "paper-equation": {"mode": "paper-equation", **NORM},
    "krum": {"robust": {"aggregation": "krum"}},
    "median": {"robust": {"aggregation": "median"}},
    "centered-clip": {"robust": {"aggregation": "centered-clip"}},
}
ROUNDS = (1, 2)
RESULTS_KEY = "strategy-modes"
DEFAULT_BUFFER = Defaults.buffer_replies


@dataclass(frozen=True)
class ModeConfig:
    """One measured round of strategy configuration ``mode``: round ``server_round`` (1: no
    screen history, 2: history) over ``clients`` replies of ``shape``."""

    mode: str
    server_round: int
    clients: int
    shape: scale.Shape
    seed: int = 0
    threads: int = 2
    buffer_replies: int = DEFAULT_BUFFER

    @property
    def name(self) -> str:
        """The key of this round under the json's ``"strategy-modes"``."""
        return f"{self.mode} round {self.server_round} T={self.clients}"

    def as_scale_config(self) -> scale.Config:
        """The ``scale.Config`` the watchdog reports against."""
        return scale.Config(self.mode, self.clients, self.shape, self.seed, self.threads)


def strategy_kwargs(mode: str, buffer_replies: int, spill_dir: Path | None) -> dict[str, Any]:
    """FedRobustMerge's keyword arguments for ``mode``."""
    kwargs = dict(MODES[mode])
    if "robust" in kwargs:
        kwargs["robust"] = RobustSettings(**kwargs["robust"])
    return {**kwargs, "buffer_replies": buffer_replies, "spill_dir": spill_dir}


def largest_module_bytes(shape: scale.Shape) -> int:
    """Bytes of the largest tensor of one adapter (what a buffered merge stacks over T)."""
    return max(rows * cols for _, (rows, cols) in shape.tensors()) * 4


def predicted_bytes(config: ModeConfig) -> int:
    """A buffered round's floor: ``buffer_replies`` replies, the global, a working copy and the
    new global, plus one module stacked over all T (a streamed round needs less)."""
    held = min(config.clients, config.buffer_replies) + 3
    return held * config.shape.adapter_bytes + config.clients * largest_module_bytes(config.shape)


def skip_reason(config: ModeConfig, cap: int) -> str | None:
    """Why ``config`` is not run (memory over the cap, or the spill over the free disk)."""
    predicted = predicted_bytes(config)
    if predicted > cap:
        return (
            f"predicted {predicted / scale.GIB:.1f} GiB (buffer + T x one module) exceeds the "
            f"cap of {cap / scale.GIB:.1f} GiB"
        )
    spill = max(0, config.clients - config.buffer_replies) * config.shape.adapter_bytes
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if spill > 0.8 * free:
        return f"a spill of {spill / scale.GIB:.1f} GiB would not fit the free disk"
    return None


def open_strategy(
    config: ModeConfig,
    global_adapter: Mapping[str, torch.Tensor],
    clients: int,
    history: Sequence[float],
    spill_dir: Path,
) -> FedRobustMerge:
    """FedRobustMerge of ``config.mode`` with round ``config.server_round`` open."""
    strategy = FedRobustMerge(
        device="cpu",
        min_train_nodes=clients,
        min_available_nodes=2,
        **strategy_kwargs(config.mode, config.buffer_replies, spill_dir),
    )
    if history:
        strategy.restore_robust_state({"norm-history": list(history)})
    grid = FakeGrid(list(range(1, clients + 1)))
    instructions = strategy.configure_train(
        config.server_round,
        ArrayRecord(dict(global_adapter)),
        ConfigRecord(),
        grid,  # type: ignore[arg-type]
    )
    del instructions
    return strategy


def _history(global_adapter: Mapping[str, torch.Tensor], count: int, seed: int) -> list[float]:
    return [
        scale.update_norm_of(global_adapter, scale.HISTORY_NODE_BASE + i, seed)
        for i in range(count)
    ]


def measure(config: ModeConfig, cap: int | None) -> dict[str, Any]:
    """One round of ``config`` in this process, its replies streamed from a lazy generator; the
    spill goes to a temporary folder removed afterwards. ``cap`` as ``scale.measure``'s."""
    torch.set_num_threads(config.threads)
    set_task_identity()
    with tempfile.TemporaryDirectory(prefix="scale-spill-") as folder:
        spill_dir = Path(folder)
        # Warm-up: the same configuration on a tiny adapter, past its buffer so it spills too.
        tiny = scale.Shape(layers=1, hidden=64, rank=config.shape.rank)
        tiny_global = scale.build_global(tiny, config.seed + 1)
        tiny_clients = config.buffer_replies + 2
        warm = open_strategy(
            config,
            tiny_global,
            tiny_clients,
            _history(tiny_global, 2, 0) if config.server_round > 1 else [],
            spill_dir,
        )
        warm.aggregate_train(
            config.server_round,
            (scale.build_reply(tiny_global, n, 0) for n in range(1, tiny_clients + 1)),
        )
        del warm

        shape, seed, clients = config.shape, config.seed, config.clients
        global_adapter = scale.build_global(shape, seed)
        history = _history(global_adapter, scale.HISTORY_REPLIES, seed)
        history = history if config.server_round > 1 else []
        strategy = open_strategy(config, global_adapter, clients, history, spill_dir)
        feed = scale.ReplyFeed(
            lambda node: scale.build_reply(global_adapter, node, seed), range(1, clients + 1)
        )
        call = scale.measured_call(
            config.as_scale_config(),
            feed,
            cap,
            feed.stream,
            lambda replies: strategy.aggregate_train(config.server_round, replies),
        )
    arrays, _ = call.value
    started, returned = call.started, call.returned
    assert arrays is not None, "the round produced no new global"
    report = strategy.round_report(config.server_round)
    growth = call.growth_bytes
    return {
        "mode": config.mode,
        "clients": clients,
        "server-round": config.server_round,
        "status": "ok",
        "kwargs": MODES[config.mode],
        "buffer-replies": config.buffer_replies,
        "screen-history": len(history),
        "peak-rss-growth-mb": growth / scale.MB,
        "peak-rss-growth-adapters": growth / shape.adapter_bytes,
        "round-seconds": returned - started,
        "reply-build-seconds": feed.build_seconds,
        "strategy-seconds": returned - started - feed.build_seconds,
        "last-reply-to-return-seconds": (
            returned - feed.exhausted_at if feed.exhausted_at is not None else None
        ),
        "replies-handed": feed.handed,
        "streamed": report.streamed,
        "spilled": report.spilled,
        "accepted": len(report.accepted_nodes),
        "rejected": len(report.rejected),
        "merge-seconds": report.merge_seconds,
        "fold-seconds": report.fold_seconds,
        "stacked-module-mb": clients * largest_module_bytes(shape) / scale.MB,
        "rss-method": call.rss_method,
    }


def probe_command(config: ModeConfig, cap: int) -> list[str]:
    """The subprocess that measures ``config`` on its own."""
    payload = json.dumps({**asdict(config), "cap": cap})
    return [sys.executable, "-m", "benchmarks.scale_modes", "--probe", payload]


def probe_main(payload: str) -> int:
    """Subprocess side: measure one config, print one JSON line."""
    spec = json.loads(payload)
    cap = int(spec.pop("cap"))
    config = ModeConfig(**{**spec, "shape": scale.Shape(**spec["shape"])})
    print(json.dumps(measure(config, cap)), flush=True)
    return 0


def plan(args: argparse.Namespace, shape: scale.Shape) -> list[ModeConfig]:
    """The strategy configurations of ``args.modes``, smallest T first, round 2 before 1."""
    names = [mode for mode in args.modes if mode in MODES]
    return [
        ModeConfig(name, server_round, clients, shape, args.seed, args.threads, args.buffer)
        for clients in sorted(args.clients)
        for server_round in sorted(args.rounds, reverse=True)
        for name in names
    ]


def run(
    args: argparse.Namespace, data: dict[str, Any], json_path: Path, cap: int, shape: scale.Shape
) -> None:
    """Measure every planned configuration not yet in ``data`` (resume), writing as it goes."""
    rows: dict[str, Any] = data.setdefault(RESULTS_KEY, {})
    for config in plan(args, shape):
        if config.name in rows:
            print(f"{config.name}: already in {json_path.name}, skipped", flush=True)
            continue
        identity = {
            "mode": config.mode,
            "clients": config.clients,
            "server-round": config.server_round,
        }
        reason = skip_reason(config, cap)
        if reason is not None:
            result: dict[str, Any] = {**identity, "status": "skipped", "reason": reason}
        elif args.in_process:
            result = measure(config, None)
        else:
            result = {
                **identity,
                **scale.run_probe(
                    config.as_scale_config(), cap, args.timeout, probe_command(config, cap)
                ),
            }
        rows[config.name] = result
        scale.write_json(json_path, data)
        print(f"{config.name}: {summary(result)}", flush=True)


def summary(result: Mapping[str, Any]) -> str:
    """One line of a measured row."""
    if result.get("status") != "ok":
        return f"{result.get('status')}: {result.get('reason')}"
    return (
        f"peak +{result['peak-rss-growth-adapters']:.1f} adapters, round "
        f"{result['round-seconds']:.2f} s, {'streamed' if result['streamed'] else 'buffered'}"
        f", spilled {result['spilled']}, accepted {result['accepted']}"
    )


def render(data: Mapping[str, Any]) -> list[str]:
    """scale.md's section: mode x T x round; empty when nothing was measured."""
    rows: Mapping[str, Mapping[str, Any]] = data.get(RESULTS_KEY, {})
    if not rows:
        return []
    order = {name: i for i, name in enumerate(MODES)}
    shape = data["shape"]
    module_mb = (
        max(
            rows_ * cols
            for _, (rows_, cols) in scale.Shape(
                shape["layers"], shape["hidden"], shape["rank"]
            ).tensors()
        )
        * 4
        / scale.MB
    )
    lines = [
        "## Every aggregation mode, round 1 and round 2 (issue 25)",
        "",
        "Each row: one round of FedRobustMerge with the named configuration over a lazy stream "
        "of T replies, in a fresh process. Round 1 has no screen history, round 2 the update "
        'norms of earlier rounds. "handling": from the round\'s report, streamed (folded as '
        "replies arrive) or buffered; a buffered round keeps buffer-replies replies in memory "
        "and spills the rest to disk (a temporary folder per probe), and at merge time still "
        f"stacks one module over all T replies (up to T x {module_mb:.2f} MB here, "
        '"stacked module"): the part of its peak that grows with T.',
        "",
        "| mode | T | round | peak RSS growth (MB) | (adapters) | round s | strategy s | "
        "handling | spilled | stacked module (MB) | accepted | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in sorted(
        rows.values(),
        key=lambda r: (order.get(r["mode"], 99), r["clients"], r.get("server-round", 0)),
    ):
        ok = row.get("status") == "ok"
        status = "ok" if ok else f"{row.get('status')}: {row.get('reason', '')}"
        handling = "-"
        if ok:
            handling = "streamed" if row["streamed"] else "buffered"
        lines.append(
            f"| {row['mode']} | {row['clients']} | {row.get('server-round', '-')} | "
            f"{scale._fmt(row.get('peak-rss-growth-mb')) if ok else '-'} | "
            f"{scale._fmt(row.get('peak-rss-growth-adapters')) if ok else '-'} | "
            f"{scale._fmt(row.get('round-seconds'), 2) if ok else '-'} | "
            f"{scale._fmt(row.get('strategy-seconds'), 2) if ok else '-'} | {handling} | "
            f"{scale._fmt(row.get('spilled')) if ok else '-'} | "
            f"{scale._fmt(row.get('stacked-module-mb')) if ok else '-'} | "
            f"{scale._fmt(row.get('accepted')) if ok else '-'} | {status} |"
        )
    missing = missing_rows(data)
    lines += ["", *reading(rows)]
    if missing:
        lines += [
            "",
            "Not measured yet (mode x T x round of the planned grid without a row): "
            + ", ".join(missing)
            + ".",
        ]
    return [*lines, ""]


def missing_rows(data: Mapping[str, Any]) -> list[str]:
    """Rows of the grid (every mode, both rounds, at each T any row has) not in the json."""
    rows: Mapping[str, Any] = data.get(RESULTS_KEY, {})
    counts = sorted({int(r["clients"]) for r in rows.values()})
    return [
        f"{mode} round {server_round} T={clients}"
        for clients in counts
        for server_round in ROUNDS
        for mode in MODES
        if f"{mode} round {server_round} T={clients}" not in rows
    ]


def reading(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Per mode and round: the growth from the smallest to the largest measured T."""
    out = []
    for mode in MODES:
        for server_round in ROUNDS:
            measured = sorted(
                (
                    r
                    for r in rows.values()
                    if r["mode"] == mode
                    and r.get("server-round") == server_round
                    and r.get("status") == "ok"
                ),
                key=lambda r: r["clients"],
            )
            if len(measured) < 2:
                continue
            first, last = measured[0], measured[-1]
            gap = last["peak-rss-growth-adapters"] - first["peak-rss-growth-adapters"]
            per_adapter = first["peak-rss-growth-mb"] / first["peak-rss-growth-adapters"]
            stack = (last["stacked-module-mb"] - first["stacked-module-mb"]) / per_adapter
            kind = "streamed" if last["streamed"] else f"buffered, {last['spilled']} spilled"
            out.append(
                f"- {mode}, round {server_round} ({kind} at T = {last['clients']}): "
                f"{first['peak-rss-growth-adapters']:.1f} adapters at T = {first['clients']}, "
                f"{last['peak-rss-growth-adapters']:.1f} at T = {last['clients']} "
                f"({gap:+.1f}"
                + (
                    f"; its module stack at merge time grows by {stack:+.1f})."
                    if kind[0] == "b"
                    else ")."
                )
            )
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        raise SystemExit(probe_main(sys.argv[2]))
    raise SystemExit(scale.main(sys.argv[1:]))
