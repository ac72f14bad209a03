"""The personalisation benchmark's report (``benchmarks.personalization``): per arm and cell,
the mean over sites of per-site accuracy, its paired bootstrap interval against the global
FedAvg adapter, and the uplink bytes per site and round of each mode."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.stats import Interval, bootstrap_interval

if TYPE_CHECKING:
    from benchmarks.personalization import PersonalizationConfig

SITES = "sites"  # the one "task" of the bootstrap: its "examples" are the sites


def arm_scores(
    runs: Mapping[str, Any], cell: str, seeds: Sequence[int], run: str, field: str, rounds: int
) -> dict[int, list[float]]:
    """Seed -> per-site accuracy of ``run``'s ``field`` after ``rounds`` rounds in ``cell``
    (seeds whose run is saved and has every site's score)."""
    out = {}
    for seed in seeds:
        record = runs.get(f"{cell}|{seed}|{run}")
        if record is None:
            continue
        scores = record["checkpoints"].get(str(rounds), {}).get(field)
        if scores and all(s is not None for s in scores):
            out[seed] = [float(s) for s in scores]
    return out


def compare(
    row: Mapping[int, list[float]], reference: Mapping[int, list[float]], resamples: int
) -> Interval | None:
    """The mean per-site difference of ``row`` to ``reference`` over the seeds both have, with
    the paired bootstrap interval (seeds and sites resampled, ``benchmarks.stats``)."""
    seeds = sorted(set(row) & set(reference))
    if not seeds:
        return None
    return bootstrap_interval(
        [{SITES: np.asarray(row[s])} for s in seeds],
        [{SITES: np.asarray(reference[s])} for s in seeds],
        [SITES],
        resamples=resamples,
    )


def summarise(results: Mapping[str, Any], config: PersonalizationConfig) -> list[dict[str, Any]]:
    """One row per (cell, rounds, arm): mean accuracy, seeds, the interval to the reference."""
    from benchmarks.personalization import ARMS, REFERENCE_ARM

    runs = results["runs"]
    arms = {arm.name: arm for arm in ARMS}
    rows = []
    for federation, steps, cells in config.cells:
        cell = f"{federation}x{steps}"
        for rounds in cells:
            scores = {
                name: arm_scores(runs, cell, config.seeds, arm.run, arm.field, rounds)
                for name, arm in arms.items()
            }
            reference = scores[REFERENCE_ARM]
            for name, per_seed in scores.items():
                if not per_seed:
                    continue
                values = [v for seed in sorted(per_seed) for v in per_seed[seed]]
                interval = (
                    None
                    if name == REFERENCE_ARM
                    else compare(per_seed, reference, config.resamples)
                )
                rows.append(
                    {
                        "cell": cell,
                        "rounds": rounds,
                        "arm": name,
                        "seeds": len(per_seed),
                        "mean": sum(values) / len(values),
                        "interval": interval.to_json() if interval is not None else None,
                    }
                )
    return rows


def uplink(results: Mapping[str, Any], config: PersonalizationConfig) -> list[dict[str, Any]]:
    """Per (cell, run): the mean bytes up and down per site and round, over the saved seeds."""
    rows = []
    for federation, steps, _ in config.cells:
        cell = f"{federation}x{steps}"
        for spec in config.runs:
            costs = [
                results["runs"][key]["cost"]
                for key in (f"{cell}|{seed}|{spec.name}" for seed in config.seeds)
                if key in results["runs"]
            ]
            if not costs:
                continue
            up = sum(c["bytes_up_per_client_round"] for c in costs) / len(costs)
            down = sum(c["bytes_down_per_client_round"] for c in costs) / len(costs)
            rows.append(
                {
                    "cell": cell,
                    "run": spec.name,
                    "personalization": spec.personalization,
                    "bytes_up": up,
                    "bytes_down": down,
                }
            )
    return rows


def markdown(results: Mapping[str, Any], config: PersonalizationConfig, command: str) -> str:
    """The report."""
    lines = [
        "# Personalised federations (issue 27)",
        "",
        f"`{command}`; {results['machine']}; started {results['date']}; "
        f"{float(results['wall_seconds']) / 3600:.2f} h of runs; "
        f"{len(results['runs'])} of {len(config.run_keys())} runs saved.",
        "",
        "Each site is scored on its own held-out test data (its task's test split drawn with its "
        "own label mix; a site's classes are those in its files, as for a real site's data "
        "files). Scores are the sites' own evaluate replies (`eval-accuracy` for the global, "
        "`personalized-accuracy` for the personal adapter) from the app's ClientApp, driven "
        "in-process with the app's server strategy. Mean: over sites and seeds of per-site "
        "accuracy. Interval: 95 % paired bootstrap of the difference to the global FedAvg "
        "adapter, resampling seeds and sites (paired by site and seed); test-example noise "
        f"within a site is not in it. Local-finetune: {config.personalization_steps} local steps "
        f"of batch {config.local_batch_size}. Server lr {config.server_lr:g}, fuse weight "
        f"{config.fuse_weight:g}, keep ratio {config.keep_ratio:g} (not tuned).",
        "",
        "| cell | rounds | arm | seeds | mean acc. | diff. to global fedavg [95 % CI] | verdict |",
        "|---|---:|---|---:|---:|---|---|",
    ]
    for row in summarise(results, config):
        interval = row["interval"]
        diff, verdict = "(reference)", ""
        if interval is not None:
            diff = f"{interval['mean']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"
            verdict = str(interval["verdict"])
        lines.append(
            f"| {row['cell']} | {row['rounds']} | {row['arm']} | {row['seeds']} | "
            f"{row['mean']:.3f} | {diff} | {verdict} |"
        )
    lines += [
        "",
        "## Uplink per site and round",
        "",
        "Bytes the server received (its round report), and the global sent down.",
        "",
        "| cell | run | personalization | bytes up | bytes down | up / down |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in uplink(results, config):
        lines.append(
            f"| {row['cell']} | {row['run']} | {row['personalization']} | {row['bytes_up']:,.0f} "
            f"| {row['bytes_down']:,.0f} | {row['bytes_up'] / row['bytes_down']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(
    results: Mapping[str, Any], config: PersonalizationConfig, path: Path, command: str
) -> None:
    """Write the markdown report to ``path``."""
    path.write_text(markdown(results, config, command), encoding="utf-8")
