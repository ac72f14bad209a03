"""The quality benchmark v2's report: comparisons to tuned FedAvg, Markdown tables, curve plots.

What and why
------------
Everything here is computed from the saved JSON alone (``benchmarks.quality_v2`` writes it after
every run), so the report of an interrupted run, or one resumed over several sessions, is the
same as if it had run in one go. For each stage and row, the seeds that both the row and the
reference have are compared with ``benchmarks.stats.bootstrap_interval``, separately over the
seen tasks and over the unseen tasks. The reference is tuned FedAvg at the same federation; the
reference rows and the one-shot merges are compared with tuned FedAvg at the first (default)
federation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from benchmarks.per_example import decode_flags
from benchmarks.stats import bootstrap_interval

if TYPE_CHECKING:
    from benchmarks.quality_v2 import V2Config

RunFlags = dict[int, dict[str, NDArray[np.bool_]]]


def stage_rows(results: Mapping[str, Any], stage: str) -> dict[str, RunFlags]:
    """Row -> seed -> task -> flags, for the saved runs of ``stage``."""
    out: dict[str, RunFlags] = {}
    for key, run in results["runs"].items():
        run_stage, row, seed = key.split("|")
        if run_stage == stage:
            flags = {t: decode_flags(f) for t, f in run["flags"].items()}
            out.setdefault(row, {})[int(seed)] = flags
    return out


def compare(
    row: RunFlags, reference: RunFlags, tasks: Sequence[str], resamples: int
) -> dict[str, Any] | None:
    """Mean accuracy of ``row`` over ``tasks`` and seeds, and its difference to ``reference``
    (bootstrap interval and verdict) on the seeds and tasks both have; None if they share none."""
    seeds = sorted(set(row) & set(reference))
    shared = [t for t in tasks if seeds and all(t in row[s] and t in reference[s] for s in seeds)]
    if not shared:
        return None
    interval = bootstrap_interval(
        [row[s] for s in seeds], [reference[s] for s in seeds], shared, resamples=resamples
    )
    accuracy = float(np.mean([row[s][t].mean() for s in seeds for t in shared]))
    return {"seeds": len(seeds), "accuracy": accuracy, "diff": interval.to_json()}


def comparisons(results: Mapping[str, Any], config: V2Config) -> dict[str, dict[str, Any]]:
    """Stage -> row -> {"seen": comparison, "unseen": comparison} (see the module docstring)."""
    from benchmarks.quality_v2 import REFERENCE_ROW

    seen, unseen = config.base.seen, config.base.unseen
    default_stage = f"fed-{config.federations[0].name}"
    out: dict[str, dict[str, Any]] = {}
    for stage in config.stages():
        if stage == "tune":
            continue
        rows = stage_rows(results, stage)
        ref_stage = stage if stage.startswith("fed-") else default_stage
        reference = stage_rows(results, ref_stage).get(REFERENCE_ROW)
        if reference is None:
            continue
        out[stage] = {
            row: {
                "seen": compare(flags, reference, seen, config.resamples),
                "unseen": compare(flags, reference, unseen, config.resamples),
            }
            for row, flags in rows.items()
        }
    return out


def mean_cost(results: Mapping[str, Any], stage: str, row: str) -> dict[str, float]:
    """The row's cost columns at ``stage``, averaged over its seeds."""
    costs = [
        run["cost"]
        for key, run in results["runs"].items()
        if key.startswith(f"{stage}|{row}|") and "cost" in run
    ]
    if not costs:
        return {}
    return {k: float(np.mean([c[k] for c in costs])) for k in costs[0]}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _diff_cells(comparison: Mapping[str, Any] | None) -> list[str]:
    if comparison is None:
        return ["-", "-", "-"]
    d = comparison["diff"]
    return [
        _pct(comparison["accuracy"]),
        f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]",
        d["verdict"],
    ]


def markdown(results: Mapping[str, Any], config: V2Config, command: str) -> str:
    """The report (see the module docstring) as Markdown."""
    table = comparisons(results, config)
    base = config.base
    lines = [
        f"# Quality benchmark v2 ({config.tag})",
        "",
        f"- command: `{command}`",
        f"- machine: {results['machine']}",
        f"- date: {results['date']}",
        f"- wall time: {results.get('wall_seconds', 0.0) / 60:.1f} min",
        f"- seen tasks: {', '.join(base.seen)}; unseen: {', '.join(base.unseen)}",
        f"- test examples per task: up to {base.eval_examples}; dev per seen task: "
        f"{base.dev_examples}; local pool per seen task: {config.pool_examples}; seeds: "
        f"{len(config.seeds)}; max length {base.max_length}, learning rate "
        f"{base.learning_rate}; each round a client trains on up to {config.round_examples} "
        f"examples of its shard in batches of {config.local_batch_size}",
        "",
        "Accuracy (%) is the mean over seeds and tasks. Δ is the difference to tuned FedAvg "
        "(FedIT) at the same federation, in points, with its 95 % paired bootstrap interval over "
        "test examples and seeds; win / loss only when the interval excludes 0.",
    ]
    lines += summary_lines(results, config, table)
    for federation in config.federations:
        stage = f"fed-{federation.name}"
        if stage not in table:
            continue
        lines += [
            "",
            f"## {federation.clients} clients ({federation.participation:.0%} per round, "
            f"{federation.rounds} rounds"
            + (f", Dirichlet alpha {federation.alpha}" if federation.clients > 7 else "")
            + ")",
            "",
            "| row | seeds | seen | Δ seen | seen verdict | unseen | Δ unseen | unseen verdict "
            "| up KiB/client/round | down KiB/client/round | merge ms/round |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row, cmp in table[stage].items():
            seeds = (cmp["seen"] or cmp["unseen"] or {}).get("seeds", 0)
            cost = mean_cost(results, stage, row)
            cost_cells = (
                [
                    f"{cost['bytes_up_per_client_round'] / 1024:.0f}",
                    f"{cost['bytes_down_per_client_round'] / 1024:.0f}",
                    f"{1000 * cost['merge_seconds_per_round']:.1f}",
                ]
                if cost
                else ["-", "-", "-"]
            )
            lines.append(
                f"| {row} | {seeds} | "
                + " | ".join(_diff_cells(cmp["seen"]) + _diff_cells(cmp["unseen"]) + cost_cells)
                + " |"
            )
    for stage, title in (("references", "Reference rows"), ("one-shot", "One-shot merges")):
        if stage not in table:
            continue
        lines += [
            "",
            f"## {title} (Δ to tuned FedAvg at {config.federations[0].clients} clients)",
            "",
            "| row | seeds | seen | Δ seen | seen verdict | unseen | Δ unseen | unseen verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row, cmp in table[stage].items():
            seeds = (cmp["seen"] or cmp["unseen"] or {}).get("seeds", 0)
            cells = _diff_cells(cmp["seen"]) + _diff_cells(cmp["unseen"])
            lines.append(f"| {row} | {seeds} | " + " | ".join(cells) + " |")
    lines += _tuning_lines(results, config)
    lines += _cost_notes(results)
    return "\n".join(lines) + "\n"


def dev_ranking(results: Mapping[str, Any]) -> list[tuple[str, float, dict[str, float]]]:
    """Tuned rows by their best dev score, best first: (row, score, chosen hyperparameters).

    The winner is what the app's defaults follow (the issue: the method and hyperparameters
    that win on dev at the default federation)."""
    ranked = [
        (row, float(record["best_score"]), dict(record["chosen"]))
        for row, record in results["tuning"].items()
    ]
    return sorted(ranked, key=lambda item: -item[1])


def summary_lines(
    results: Mapping[str, Any], config: V2Config, table: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """The headline: the dev winner, then per federation the rows whose seen-task (then
    unseen-task) accuracy beats or trails tuned FedAvg (interval excluding 0) and how many tie,
    and whether the curves had flattened."""
    from benchmarks.quality_v2 import REFERENCE_ROW

    lines = ["", "## Summary", ""]
    ranking = dev_ranking(results)
    if ranking:
        row, score, chosen = ranking[0]
        hyper = ", ".join(f"{k} {v:g}" for k, v in chosen.items())
        runner_up = f"; next: {ranking[1][0]} ({_pct(ranking[1][1])})" if len(ranking) > 1 else ""
        lines.append(
            f"- Best on dev (tuning, {config.federation(config.tune_federation).clients} "
            f"clients): **{row}** at {hyper}, {_pct(score)}{runner_up}."
        )
    for federation in config.federations:
        stage = f"fed-{federation.name}"
        if stage not in table:
            continue
        for part in ("seen", "unseen"):
            verdicts: dict[str, list[str]] = {"win": [], "loss": [], "tie": []}
            for row, cmp in table[stage].items():
                if cmp[part] is not None and row != REFERENCE_ROW:
                    d = cmp[part]["diff"]
                    verdicts[d["verdict"]].append(f"{row} ({100 * d['mean']:+.1f})")
            lines.append(
                ("- " if part == "seen" else "  ")
                + f"{federation.clients} clients, {part} tasks vs tuned FedAvg: "
                f"wins: {', '.join(verdicts['win']) or 'none'}; "
                f"losses: {', '.join(verdicts['loss']) or 'none'}; "
                f"{len(verdicts['tie'])} tie."
            )
        moves = late_moves(curves(results, stage), CURVE_WINDOW)
        if moves:
            low, high = min(moves.values()), max(moves.values())
            lines.append(
                f"  Curves over the last {CURVE_WINDOW} rounds (seen, mean of seeds): "
                f"{100 * low:+.1f} to {100 * high:+.1f} points across rows"
                + (" (still moving)." if max(abs(low), abs(high)) >= FLAT_POINTS else " (flat).")
            )
    return lines


# A curve is called flat when no row's seen accuracy moved by this much (a fraction) over the
# last CURVE_WINDOW rounds.
CURVE_WINDOW = 3
FLAT_POINTS = 0.01


def late_moves(
    row_curves: Mapping[str, Sequence[tuple[float, float]]], window: int
) -> dict[str, float]:
    """Row -> change of its seen curve over the last ``window`` rounds (rows with more rounds
    than ``window``)."""
    return {
        row: points[-1][0] - points[-1 - window][0]
        for row, points in row_curves.items()
        if len(points) > window
    }


def _tuning_lines(results: Mapping[str, Any], config: V2Config) -> list[str]:
    """The grids, evaluations and choices of the tuning stage."""
    if not results["tuning"]:
        return []
    lines = [
        "",
        f"## Tuning (dev of seen tasks, {config.tune_rounds} rounds at "
        f"{config.federation(config.tune_federation).clients} clients, seed {config.tune_seed})",
        "",
        "| row | final grids | evaluations | chosen | best dev | cap hit |",
        "|---|---|---|---|---|---|",
    ]
    for row, record in results["tuning"].items():
        grids = "; ".join(
            f"{name}: {', '.join(f'{v:g}' for v in values)}"
            for name, values in record["grids"].items()
        )
        chosen = ", ".join(f"{k} {v:g}" for k, v in record["chosen"].items())
        caps = ", ".join(f"{k} ({side})" for k, side in record["cap_hit"].items()) or "no"
        lines.append(
            f"| {row} | {grids} | {record['evaluations']} | {chosen} | "
            f"{_pct(record['best_score'])} | {caps} |"
        )
    untuned = [r for r in config.rows if r not in results["tuning"]]
    if untuned:
        lines.append(f"\nNot tuned (strategy defaults): {', '.join(untuned)}.")
    return lines


def _cost_notes(results: Mapping[str, Any]) -> list[str]:
    """What travels: measured uplink bytes against the B factors' share (FFA-LoRA)."""
    lines: list[str] = []
    for key, run in results["runs"].items():
        if "|FFA-LoRA|" in key and "cost" in run:
            cost = run["cost"]
            lines += [
                "",
                "FFA-LoRA: clients send every LoRA tensor today, frozen lora_A included "
                f"({cost['bytes_up_per_client_round'] / 1024:.0f} KiB per client and round "
                f"measured); sending only the trained lora_B would be "
                f"{cost['b_bytes'] / 1024:.0f} KiB.",
            ]
            break
    estimate = results.get("full_run_estimate")
    if estimate:
        seconds = estimate["seconds"]
        lines += [
            "",
            f"Full-run estimate from this run's unit costs "
            f"({estimate['train_seconds_per_example']:.3f} s per trained example, "
            f"{1000 * estimate['eval_seconds_per_example']:.1f} ms per evaluated example): "
            f"{seconds['total'] / 3600:.2f} h ("
            + ", ".join(f"{k} {v / 60:.0f} min" for k, v in seconds.items() if k != "total")
            + ").",
        ]
    return lines


def curves(results: Mapping[str, Any], stage: str) -> dict[str, list[tuple[float, float]]]:
    """Row -> per round (seen avg, unseen avg), mean over its seeds (rounds all seeds have)."""
    runs: dict[str, list[list[dict[str, float]]]] = {}
    for key, run in results["runs"].items():
        run_stage, row, _ = key.split("|")
        if run_stage == stage and "curve" in run:
            runs.setdefault(row, []).append(run["curve"])
    out: dict[str, list[tuple[float, float]]] = {}
    for row, histories in runs.items():
        rounds = min(len(h) for h in histories)
        out[row] = [
            (
                float(np.mean([h[r].get("seen-avg", math.nan) for h in histories])),
                float(np.mean([h[r].get("unseen-avg", math.nan) for h in histories])),
            )
            for r in range(rounds)
        ]
    return out


def plot(results: Mapping[str, Any], config: V2Config, path: Path) -> None:
    """Per-round accuracy per row: one column per federation, seen tasks on top, unseen below,
    one legend for all panels (a row keeps its colour everywhere; tuned FedAvg, the reference,
    in black)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from benchmarks.quality_v2 import REFERENCE_ROW

    others = [row for row in config.rows if row != REFERENCE_ROW]
    colours = {row: f"C{index % 10}" for index, row in enumerate(others)}
    colours[REFERENCE_ROW] = "black"
    count = len(config.federations)
    figure, axes = plt.subplots(2, count, figsize=(5.5 * count, 8), squeeze=False, sharex="col")
    for column, federation in enumerate(config.federations):
        row_curves = curves(results, f"fed-{federation.name}")
        for part, title in enumerate(("seen tasks", "unseen tasks")):
            axis = axes[part][column]
            for row, points in row_curves.items():
                xs = list(range(1, len(points) + 1))
                axis.plot(
                    xs,
                    [100 * p[part] for p in points],
                    "-o",
                    ms=3,
                    color=colours.get(row),
                    label=row,
                )
            axis.set_title(
                f"{federation.clients} clients ({federation.participation:.0%} per round): {title}",
                fontsize=9,
            )
            axis.set_ylabel(f"accuracy (%), {config.curve_examples} examples per task", fontsize=8)
            axis.grid(alpha=0.3)
        axes[1][column].set_xlabel("round")
    handles = [
        Line2D([], [], color=colour, marker="o", ms=3, label=row) for row, colour in colours.items()
    ]
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(results: Mapping[str, Any], config: V2Config, stem: Path, command: str) -> None:
    """Write ``<stem>.md`` and ``<stem>.png``."""
    stem.with_suffix(".md").write_text(markdown(results, config, command))
    plot(results, config, stem.with_suffix(".png"))
