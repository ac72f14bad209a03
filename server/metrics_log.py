"""metrics.json and the accuracy plot of a run, rewritten atomically after every round."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from workload.atomic_files import write_bytes_atomic

METRICS_FILE = "metrics.json"
PLOT_FILE = "accuracy.png"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` atomically (``workload.atomic_files``)."""
    write_bytes_atomic(path, json.dumps(payload, indent=1, sort_keys=True).encode())


def write_metrics(
    run_dir: Path,
    summary: dict[str, Any],
    rounds: Sequence[dict[str, Any]],
    *,
    tracking: Mapping[str, Any] | None = None,
) -> Path:
    """metrics.json: the run's settings, one entry per round (0 = before training) and, when
    given, the experiment tracking's state (backend, failed calls; ``server.tracking``)."""
    path = run_dir / METRICS_FILE
    payload: dict[str, Any] = {"run": summary, "rounds": list(rounds)}
    if tracking is not None:
        payload["tracking"] = dict(tracking)
    write_json_atomic(path, payload)
    return path


def plot_accuracy(
    run_dir: Path,
    rounds: Sequence[dict[str, Any]],
    seen: Sequence[str],
    unseen: Sequence[str],
) -> Path | None:
    """PNG of server-side accuracy per task per round (solid: seen, dashed: unseen), and beside
    it the cumulative communication (MB of LoRA tensors down + up) when rounds record it."""
    points = [(r["server-round"], r["server-eval"]) for r in rounds if r.get("server-eval")]
    traffic = [
        (r["server-round"], r["communication"]["cumulative-bytes"] / 1e6)
        for r in rounds
        if r.get("communication")
    ]
    if not points and not traffic:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if traffic:
        figure, (axes, comm_axes) = plt.subplots(1, 2, figsize=(13, 5))
        uplink = rounds[-1].get("communication", {}).get("uplink", "dense")
        comm_axes.plot([0] + [x for x, _ in traffic], [0.0] + [y for _, y in traffic], "o-")
        comm_axes.set_xlabel("round")
        comm_axes.set_ylabel("cumulative communication (MB, down + up)")
        comm_axes.set_title(f"LoRA tensors exchanged (uplink: {uplink})")
        comm_axes.grid(alpha=0.3)
    else:
        figure, axes = plt.subplots(figsize=(8, 5))
    xs = [x for x, _ in points]
    for task in [*seen, *unseen]:
        ys = [evaluation.get(f"{task}-accuracy") for _, evaluation in points]
        if any(y is not None for y in ys):
            axes.plot(xs, ys, marker="o", linestyle="-" if task in seen else "--", label=task)
    for key, style in (("seen-accuracy", "k-"), ("unseen-accuracy", "k--")):
        ys = [evaluation.get(key) for _, evaluation in points]
        if any(y is not None for y in ys):
            axes.plot(xs, ys, style, linewidth=3, label=key.replace("-accuracy", " average"))
    axes.set_xlabel("round (0 = initial adapter)")
    axes.set_ylabel("accuracy")
    axes.set_title("Global adapter, server-side evaluation")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, ncol=2)
    path = run_dir / PLOT_FILE
    temp = run_dir / f".{PLOT_FILE}.tmp.png"
    figure.savefig(temp, dpi=110, bbox_inches="tight")
    plt.close(figure)
    os.replace(temp, path)
    return path
