"""The regime map's report: per-cell comparisons to tuned FedAvg, heat maps, predictors, cost.

What and why
------------
Computed from the saved JSON alone (``benchmarks.regimes`` writes it after every tuned point and
every (cell, row, seed)), so a run interrupted or spread over sessions reports the same as one
run in one go, and a partial run reports the cells it has. In each cell (federation, local
steps, rounds) every row is compared with tuned FedAvg in the same cell on the seeds both have
(``benchmarks.quality_v2_report.compare``: paired bootstrap over test examples and seeds), over
the seen tasks and over the unseen tasks. The heat map shows, per federation, local steps x
rounds, the best non-FedAvg row's seen Δ (by its mean), marked where its interval excludes 0.
The predictors are each cell's per-round signals (``benchmarks.regime_signals``), averaged over
rows' rounds and seeds: they describe the clients' updates, which in round 1 are the same for
every row, and later depend on the global that each row produced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.per_example import decode_flags
from benchmarks.quality_v2_report import RunFlags, compare

if TYPE_CHECKING:
    from benchmarks.regimes import RegimeConfig

Cell = tuple[str, int, int]  # (federation, local steps, rounds)


def cell_runs(results: Mapping[str, Any]) -> dict[Cell, dict[str, RunFlags]]:
    """(federation, steps, rounds) -> row -> seed -> task -> flags, for the saved cell runs."""
    out: dict[Cell, dict[str, RunFlags]] = {}
    for key, run in results["runs"].items():
        regime, rounds, row, seed = key.split("|")
        if regime == "zero-shot":
            continue
        federation, steps = regime.split("x")
        flags = {t: decode_flags(f) for t, f in run["flags"].items()}
        cell = (federation, int(steps), int(rounds))
        out.setdefault(cell, {}).setdefault(row, {})[int(seed)] = flags
    return out


def zero_shot_runs(results: Mapping[str, Any]) -> RunFlags:
    """seed -> task -> flags of the zero-shot reference."""
    return {
        int(key.split("|")[3]): {t: decode_flags(f) for t, f in run["flags"].items()}
        for key, run in results["runs"].items()
        if key.startswith("zero-shot|")
    }


def comparisons(
    results: Mapping[str, Any], config: RegimeConfig
) -> dict[Cell, dict[str, dict[str, Any]]]:
    """Cell -> row -> {"seen": comparison, "unseen": comparison} against tuned FedAvg in the
    same cell, plus the row "zero-shot" (the base model) in every cell."""
    from benchmarks.regimes import REFERENCE_ROW

    seen, unseen = config.base.seen, config.base.unseen
    zero = zero_shot_runs(results)
    out: dict[Cell, dict[str, dict[str, Any]]] = {}
    for cell, rows in sorted(cell_runs(results).items()):
        reference = rows.get(REFERENCE_ROW)
        if reference is None:
            continue
        with_zero = {**rows, **({"zero-shot": zero} if zero else {})}
        out[cell] = {
            row: {
                "seen": compare(flags, reference, seen, config.resamples),
                "unseen": compare(flags, reference, unseen, config.resamples),
            }
            for row, flags in with_zero.items()
        }
    return out


def best_challenger(table: Mapping[str, Mapping[str, Any]]) -> tuple[str, Mapping[str, Any]] | None:
    """The non-FedAvg, non-zero-shot row with the highest mean seen Δ, and its comparison."""
    from benchmarks.regimes import REFERENCE_ROW

    candidates = [
        (row, cmp["seen"])
        for row, cmp in table.items()
        if row not in (REFERENCE_ROW, "zero-shot") and cmp["seen"] is not None
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda item: item[1]["diff"]["mean"])


def cell_signals(results: Mapping[str, Any], cell: Cell) -> dict[str, float]:
    """The cell's predictors: per-round signals averaged over its rows, seeds and rounds, round
    1 separately (where every row's clients start from the same global), and each row's mean
    step norm relative to FedAvg's."""
    from benchmarks.regimes import REFERENCE_ROW

    federation, steps, rounds = cell
    prefix = f"{federation}x{steps}|{rounds}|"
    by_row: dict[str, list[dict[str, float]]] = {}
    for key, run in results["runs"].items():
        if key.startswith(prefix) and "signals" in run:
            by_row.setdefault(key.split("|")[2], []).extend(run["signals"])
    every = [s for signals in by_row.values() for s in signals]
    if not every:
        return {}

    def mean(values: Sequence[float]) -> float:
        finite = [v for v in values if not math.isnan(v)]
        return float(np.mean(finite)) if finite else math.nan

    out = {
        "cosine": mean([s["cosine"] for s in every]),
        "cosine_round1": mean([s["cosine"] for s in every if s["round"] == 1]),
        "factorwise_gap": mean([s["factorwise_gap"] for s in every]),
    }
    reference = mean([s["step_norm"] for s in by_row.get(REFERENCE_ROW, [])])
    for row, signals in by_row.items():
        if row != REFERENCE_ROW and reference and not math.isnan(reference):
            out[f"step_norm_ratio:{row}"] = mean([s["step_norm"] for s in signals]) / reference
    return out


def cell_cost(results: Mapping[str, Any], cell: Cell) -> dict[str, float]:
    """Bytes up and down per client and round and merge seconds per round, averaged over the
    cell's runs; client seconds per client and round over every round of the regime (any
    rounds count) that trained afresh (a cached round costs nothing)."""
    federation, steps, rounds = cell
    prefix = f"{federation}x{steps}|{rounds}|"
    runs = [run for key, run in results["runs"].items() if key.startswith(prefix)]
    if not runs:
        return {}
    regime_records = [
        run for key, run in results["runs"].items() if key.startswith(f"{federation}x{steps}|")
    ] + [
        entry["record"]
        for name, points in results.get("tune_points", {}).items()
        if name.startswith(f"{federation}x{steps}|")
        for entry in points.values()
    ]
    fresh = [
        s["client_seconds"] / s["clients"]
        for record in regime_records
        for s in record["signals"]
        if s["cached_clients"] == 0 and s["clients"]
    ]
    return {
        "up_kib": float(np.mean([r["cost"]["bytes_up_per_client_round"] for r in runs])) / 1024,
        "down_kib": float(np.mean([r["cost"]["bytes_down_per_client_round"] for r in runs])) / 1024,
        "merge_ms": 1000 * float(np.mean([r["cost"]["merge_seconds_per_round"] for r in runs])),
        "client_s": float(np.mean(fresh)) if fresh else math.nan,
        "rounds": float(rounds),
    }


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _diff(comparison: Mapping[str, Any] | None) -> str:
    if comparison is None:
        return "-"
    d = comparison["diff"]
    verdict = "" if d["verdict"] == "tie" else f" **{d['verdict']}**"
    return (
        f"{_pct(comparison['accuracy'])} ({100 * d['mean']:+.1f} "
        f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]){verdict}"
    )


def markdown(results: Mapping[str, Any], config: RegimeConfig, command: str) -> str:
    """The report as Markdown."""
    table = comparisons(results, config)
    base = config.base
    lines = [
        f"# Quality v3: the regime map ({config.tag})",
        "",
        f"- command: `{command}`",
        f"- machine: {results['machine']}",
        f"- started: {results['date']}; wall time so far "
        f"{results.get('wall_seconds', 0) / 3600:.2f} h",
        f"- seen tasks: {', '.join(base.seen)}; unseen: {', '.join(base.unseen)}",
        f"- test examples per task: up to {base.eval_examples}; dev per seen task: "
        f"{base.dev_examples}; local pool per seen task: {config.pool_examples}; local batch "
        f"{config.local_batch_size}, learning rate {base.learning_rate}; seeds {config.seeds}",
        "",
        "Each cell: accuracy (%) over seeds and tasks, and in brackets Δ to tuned FedAvg in the "
        "same cell (points) with its 95 % paired bootstrap interval; **win** / **loss** only "
        "where the interval excludes 0. Rows tuned per cell on dev (server lr; keep ratio for "
        "RobustMerge).",
    ]
    planned = {(r.federation, r.steps, n) for r in config.regimes for n in r.rounds}
    missing = sorted(planned - set(table))
    if missing:
        lines += [
            "",
            "Cells planned but not measured yet: "
            + ", ".join(f"{f} clients x {s} steps x {n} rounds" for f, s, n in missing)
            + ".",
        ]
    if config.skipped:
        lines += ["", "Cells left out of the plan:"]
        lines += [
            f"- {c.federation} clients, {c.steps} steps, {c.rounds} rounds: {c.reason}"
            for c in config.skipped
        ]
    for cell, rows in table.items():
        federation, steps, rounds = cell
        signals = cell_signals(results, cell)
        cost = cell_cost(results, cell)
        lines += [
            "",
            f"## {federation} clients, {steps} local steps, {rounds} round(s)",
            "",
            "| row | seeds | seen (Δ) | unseen (Δ) | setting |",
            "|---|---|---|---|---|",
        ]
        for row, cmp in rows.items():
            seeds = (cmp["seen"] or cmp["unseen"] or {}).get("seeds", 0)
            hyper = _setting(results, cell, row)
            lines.append(
                f"| {row} | {seeds} | {_diff(cmp['seen'])} | {_diff(cmp['unseen'])} | {hyper} |"
            )
        if signals:
            ratios = ", ".join(
                f"{k.split(':', 1)[1]} {v:.2f}"
                for k, v in signals.items()
                if k.startswith("step_norm_ratio:")
            )
            lines += [
                "",
                f"Predictors: clients' update cosine {signals['cosine']:.3f} (round 1: "
                f"{signals['cosine_round1']:.3f}), factor-wise gap "
                f"{signals['factorwise_gap']:.3f}; step norm relative to FedAvg: {ratios}.",
            ]
        if cost:
            lines.append(
                f"Cost: {cost['up_kib']:.0f} KiB up and {cost['down_kib']:.0f} KiB down per "
                f"client and round ({cost['rounds'] * cost['up_kib']:.0f} KiB up per client in "
                f"all), merge {cost['merge_ms']:.1f} ms per round, client training "
                f"{cost['client_s']:.1f} s per client and round."
            )
    lines += _heat_lines(table, config)
    lines += tuning_lines(results)
    cache = results.get("train_cache")
    if cache:
        lines += [
            "",
            f"Training cache (last invocation): {cache['hits']} client rounds reused, "
            f"{cache['misses']} trained.",
        ]
    return "\n".join(lines) + "\n"


def tuning_lines(results: Mapping[str, Any]) -> list[str]:
    """Every tuned point so far with its mean seen dev accuracy at each rounds cell it reached,
    and the choice per cell where a (regime, row) has finished tuning."""
    points = results.get("tune_points", {})
    if not points:
        return []
    lines = ["", "## Tuning so far (tuning seed, mean seen dev accuracy %)", ""]
    for name, entries in points.items():
        regime, row = name.split("|", 1)
        scored = []
        for entry in entries.values():
            hyper = entry["hyper"]
            label = f"lr {hyper['server_lr']:g}"
            if "robustmerge" in row:
                label += f", keep {hyper['keep_ratio']:g}"
            dev = ", ".join(
                f"{r} rnd {100 * v:.1f}"
                for r, v in sorted(entry["dev"].items(), key=lambda x: int(x[0]))
            )
            scored.append(f"{label}: {dev}")
        chosen = results.get("tuning", {}).get(name, {}).get("chosen")
        verdict = (
            "; chosen: "
            + ", ".join(
                f"{r} rnd lr {h['server_lr']:g}"
                for r, h in sorted(chosen.items(), key=lambda x: int(x[0]))
            )
            if chosen
            else " (tuning not finished)"
        )
        lines.append(f"- {regime}, {row}: " + "; ".join(scored) + verdict)
    return lines


def _setting(results: Mapping[str, Any], cell: Cell, row: str) -> str:
    federation, steps, rounds = cell
    for key, run in results["runs"].items():
        if key.startswith(f"{federation}x{steps}|{rounds}|{row}|") and "hyper" in run:
            hyper = run["hyper"]
            parts = [f"lr {hyper['server_lr']:g}"]
            if "robustmerge" in row:
                parts.append(f"keep {hyper['keep_ratio']:g}")
            return ", ".join(parts)
    return ""


def _heat_lines(
    table: Mapping[Cell, Mapping[str, Mapping[str, Any]]], config: RegimeConfig
) -> list[str]:
    """The heat maps as text: per federation, the best challenger's seen Δ per (steps,
    rounds)."""
    lines: list[str] = []
    for federation in config.federations:
        cells = {c: t for c, t in table.items() if c[0] == federation.name}
        if not cells:
            continue
        steps = sorted({c[1] for c in cells}, reverse=True)
        rounds = sorted({c[2] for c in cells})
        lines += [
            "",
            f"## Best non-FedAvg row, seen Δ: {federation.name} clients",
            "",
            "| local steps | " + " | ".join(f"{r} round(s)" for r in rounds) + " |",
            "|---|" + "---|" * len(rounds),
        ]
        for s in steps:
            entries = []
            for r in rounds:
                best = best_challenger(cells.get((federation.name, s, r), {}))
                if best is None:
                    entries.append("-")
                    continue
                row, cmp = best
                d = cmp["diff"]
                mark = "" if d["verdict"] == "tie" else f" {d['verdict']}"
                entries.append(f"{100 * d['mean']:+.1f}{mark} ({row})")
            lines.append(f"| {s} | " + " | ".join(entries) + " |")
    return lines


def plot(results: Mapping[str, Any], config: RegimeConfig, path: Path) -> None:
    """One heat map per federation: local steps (rows) x rounds (columns), colour the best
    challenger's seen Δ to tuned FedAvg (points), '*' where its interval excludes 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = comparisons(results, config)
    count = len(config.federations)
    figure, axes = plt.subplots(1, count, figsize=(5.2 * count, 4.2), squeeze=False)
    steps = sorted({r.steps for r in config.regimes}, reverse=True)
    rounds = sorted({n for r in config.regimes for n in r.rounds})
    image = None
    for column, federation in enumerate(config.federations):
        axis = axes[0][column]
        grid = np.full((len(steps), len(rounds)), np.nan)
        for i, s in enumerate(steps):
            for j, r in enumerate(rounds):
                best = best_challenger(table.get((federation.name, s, r), {}))
                if best is None:
                    continue
                d = best[1]["diff"]
                grid[i, j] = 100 * d["mean"]
                star = "*" if d["verdict"] != "tie" else ""
                axis.text(
                    j,
                    i,
                    f"{grid[i, j]:+.1f}{star}\n{best[0][:14]}",
                    ha="center",
                    va="center",
                    fontsize=7,
                )
        image = axis.imshow(grid, cmap="RdBu", vmin=-5, vmax=5)
        axis.set_xticks(range(len(rounds)), [str(r) for r in rounds])
        axis.set_yticks(range(len(steps)), [str(s) for s in steps])
        axis.set_xlabel("rounds")
        axis.set_ylabel("local steps per round")
        axis.set_title(
            f"{federation.clients} clients: best row's seen Δ to tuned FedAvg", fontsize=9
        )
    if image is not None:
        figure.colorbar(image, ax=axes[0].tolist(), label="points (* interval excludes 0)")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(
    results: Mapping[str, Any], config: RegimeConfig, stem: Path, command: str
) -> None:
    """Write ``<stem>.md`` and ``<stem>.png``."""
    stem.with_suffix(".md").write_text(markdown(results, config, command))
    plot(results, config, stem.with_suffix(".png"))
