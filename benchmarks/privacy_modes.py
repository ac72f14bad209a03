"""Privacy and communication modes side by side: real `flwr run` simulations of the default
workload, one per mode, same seed and sizes; bytes per client per round, final accuracy, wall
time and its overhead over the dense run.

    python -m benchmarks.privacy_modes                 # every mode (about 3 min each on 2 cores)
    python -m benchmarks.privacy_modes --modes dense,sparse

Each run goes through ``scripts/run_simulation.sh`` (offline, private FLWR_HOME, SuperLink
stopped afterwards) with its outputs under a temporary root; the table is built from each run's
metrics.json and written to ``benchmarks/results/privacy_modes.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
LOG_DIR = Path(__file__).resolve().parent / ".cache" / "privacy_modes"
# Sizes shared by every mode: the default 4 clients and tasks, fewer rounds and examples.
COMMON = {
    "num-server-rounds": 3,
    "train-examples": 256,
    "eval-examples": 128,
    "seed": 0,
}
MODES: dict[str, dict[str, Any]] = {
    "dense": {},
    "sparse": {"uplink": "sparse"},
    "dp-server-clipping": {
        "dp": "server-clipping",
        "dp-clipping-norm": 0.3,
        "dp-noise-multiplier": 0.01,
    },
    "dp-client-clipping": {
        "dp": "client-clipping",
        "dp-clipping-norm": 0.3,
        "dp-noise-multiplier": 0.01,
    },
    "secure-aggregation": {"secure-aggregation": True},
}


def run_config_arg(values: Mapping[str, Any]) -> str:
    """``flwr run --run-config`` syntax: space-separated TOML assignments."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def run_mode(name: str, overrides: Mapping[str, Any], root: Path, log_dir: Path) -> dict[str, Any]:
    """One simulation; returns its metrics.json plus wall time."""
    config = {**COMMON, **overrides, "output-dir": f"privacy-{name}"}
    env = dict(os.environ, ROBUSTMERGE_FL_OUTPUT_ROOT=str(root))
    command = ["bash", "scripts/run_simulation.sh", "--run-config", run_config_arg(config)]
    started = time.perf_counter()
    with (log_dir / f"{name}.log").open("w") as stream:
        completed = subprocess.run(
            command, cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT, check=False
        )
    wall = time.perf_counter() - started
    metrics_path = root / f"privacy-{name}" / "metrics.json"
    if completed.returncode != 0 or not metrics_path.exists():
        raise RuntimeError(f"mode {name}: run failed (exit {completed.returncode}); see its log")
    metrics: dict[str, Any] = json.loads(metrics_path.read_text())
    metrics["wall-seconds"] = wall
    metrics["run-config-overrides"] = config
    return metrics


def summarise(name: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Bytes per client per round (up, down), final accuracies, wall time."""
    rounds = [r for r in metrics["rounds"] if r.get("server-round", 0) > 0]
    ups: list[float] = []
    downs: list[float] = []
    for entry in rounds:
        traffic = entry.get("communication", {})
        up = traffic.get("train-up-bytes", {})
        down = traffic.get("train-down-bytes", {})
        ups.extend(v for v in up.values() if v > 0)
        downs.extend(down.values())
    final = metrics["rounds"][-1].get("server-eval", {})
    start = metrics["rounds"][0].get("server-eval", {})
    return {
        "mode": name,
        "up-bytes-per-client-round": sum(ups) / len(ups) if ups else None,
        "down-bytes-per-client-round": sum(downs) / len(downs) if downs else None,
        "cumulative-bytes": rounds[-1].get("communication", {}).get("cumulative-bytes"),
        "seen-start": start.get("seen-accuracy"),
        "unseen-start": start.get("unseen-accuracy"),
        "seen-final": final.get("seen-accuracy"),
        "unseen-final": final.get("unseen-accuracy"),
        "wall-seconds": metrics["wall-seconds"],
    }


def markdown(rows: Sequence[Mapping[str, Any]], command: str) -> str:
    """The results table with machine, date and command."""
    dense = next((r for r in rows if r["mode"] == "dense"), None)

    def mb(value: float | None) -> str:
        return "-" if value is None else f"{value / 1e6:.3f}"

    def ratio(row: Mapping[str, Any], key: str) -> str:
        if dense is None or not dense.get(key) or row.get(key) is None:
            return "-"
        return f"{row[key] / dense[key]:.2f}"

    def acc(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [
        "# Privacy and communication modes (default workload, real `flwr run` simulations)",
        "",
        f"- command: `{command}`",
        f"- machine: {platform.node() or 'vm'} {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- sizes (all modes): {run_config_arg(COMMON)}; the app's 4 default clients",
        "",
        "| mode | uplink MB / client / round | vs dense | downlink MB / client / round "
        "| seen acc (start -> final) | unseen acc (start -> final) | wall s | vs dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {mb(row['up-bytes-per-client-round'])} "
            f"| {ratio(row, 'up-bytes-per-client-round')} "
            f"| {mb(row['down-bytes-per-client-round'])} "
            f"| {acc(row['seen-start'])} -> {acc(row['seen-final'])} "
            f"| {acc(row['unseen-start'])} -> {acc(row['unseen-final'])} "
            f"| {row['wall-seconds']:.0f} | {ratio(row, 'wall-seconds')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the chosen modes and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.modes.split(",") if name.strip()]
    unknown = sorted(set(names) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; known: {', '.join(MODES)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="privacy-modes-") as temp:
        root = Path(temp)
        for name in names:
            print(f"mode {name} ...", flush=True)
            LOG_DIR.mkdir(parents=True, exist_ok=True)
            metrics = run_mode(name, MODES[name], root, LOG_DIR)
            rows.append(summarise(name, metrics))
            print(json.dumps(rows[-1]), flush=True)
    command = "python -m benchmarks.privacy_modes" + (
        f" --modes {args.modes}" if args.modes != ",".join(MODES) else ""
    )
    (args.out_dir / "privacy_modes.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out_dir / "privacy_modes.md").write_text(markdown(rows, command))
    print(markdown(rows, command))


if __name__ == "__main__":
    main(sys.argv[1:])
