"""Mixed LoRA ranks (issue 16): sites at ranks 4/8/16 against equal ranks and zero-padding.

    python -m benchmarks.rank_quality            # the committed run (1 seed, 5 rounds, 7 clients)
    python -m benchmarks.rank_quality --quick    # a smoke run (3 clients, 2 rounds)

What and why
------------
Sites that cannot afford the federation's rank train a lower one (run-config ``client-ranks``).
This measures what that costs, on the quality benchmark's default workload (one seen task per
client, ``benchmarks.quality``): seen and unseen test accuracy after each of R rounds, for

- mixed ranks: client i at ``(4, 8, 16)[i mod 3]``, merged by a product-space method the app
  allows for mixed ranks (``strategies.combinations.mixed_rank_refusal`` is checked at start-up:
  svd/FlexLoRA, and RobustMerge paper-equation) through the real ``FedRobustMerge`` driven
  in-process (``benchmarks.quality.run_federated`` with ``client_ranks``: each client starts from
  ``client.app.site_start``, the global truncated to its rank, and replies with ``lora-rank``);
- every client at rank 8, and every client at rank 16, by the same method;
- zero-padding (HetLoRA-style) of the same mixed clients. The strategy refuses factor-wise
  merges of mixed ranks, so this row runs outside it: each round every client starts from the
  leading r_t directions of the global (``sliced_adapter``, HetLoRA's rule), trains exactly as
  in the other rows (same data draws, seeds and local settings), and the server applies
  ``strategies.merging.rank_rounds.merge_zero_padded`` to every module (``zero_padded_round``),
  weighted by num-examples like fedavg.

Per row it also records what each site started from (its truncation error: the relative
Frobenius distance of the adapter it trained from to the global, over every module), the
reply bytes per rank, and the wall time. Results go to ``benchmarks/results/ranks[-quick].json``
after every row, so an interrupted run resumes with the same command (rows already saved are
skipped); ``ranks[-quick].md`` is rewritten from the JSON each time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality import (
    QUICK as QUALITY_QUICK,
)
from benchmarks.quality import (
    RESULTS_DIR,
    QualityConfig,
    Scores,
    Workload,
    load_workload,
    node_train_data,
    run_federated,
    summarise,
)
from strategies.combinations import mixed_rank_refusal
from strategies.merging import parse_layout
from strategies.merging.lowrank import low_rank_energy
from strategies.merging.rank_rounds import merge_zero_padded
from strategies.merging.ranks import slice_to_rank
from strategies.robust import RobustSettings
from workload.model import get_lora_state, initial_adapter, set_lora_state
from workload.training import train_lora

Adapter = dict[str, torch.Tensor]

MIXED = (4, 8, 16)
ZERO_PADDING = "zero-padding"


@dataclass(frozen=True)
class RankRow:
    """One row: the clients' ranks (client i trains ``ranks[i % len]``) and how they merge.

    ``method`` is a registered merge method run by ``FedRobustMerge`` (``mode`` its merge-mode),
    or ``"zero-padding"`` for the HetLoRA baseline driven outside the strategy.
    """

    key: str
    label: str
    ranks: tuple[int, ...]
    method: str
    mode: str = "paper-exact"
    fuse_weight: float = 2.0
    server_lr: float = 1.0


# In the order they run: the required rows first (svd, then zero-padding), paper-equation after.
ROWS: tuple[RankRow, ...] = (
    RankRow("mixed-svd", "mixed 4/8/16, svd (FlexLoRA)", MIXED, "svd"),
    RankRow("r8-svd", "all rank 8, svd", (8,), "svd"),
    RankRow("r16-svd", "all rank 16, svd", (16,), "svd"),
    RankRow("mixed-zero-padding", "mixed 4/8/16, zero-padding (HetLoRA)", MIXED, ZERO_PADDING),
    RankRow(
        "mixed-paper-equation",
        "mixed 4/8/16, robustmerge paper-equation",
        MIXED,
        "robustmerge",
        mode="paper-equation",
    ),
    RankRow(
        "r8-paper-equation",
        "all rank 8, robustmerge paper-equation",
        (8,),
        "robustmerge",
        mode="paper-equation",
    ),
    RankRow(
        "r16-paper-equation",
        "all rank 16, robustmerge paper-equation",
        (16,),
        "robustmerge",
        mode="paper-equation",
    ),
)

CONFIG = QualityConfig(seeds=(0,), fed_seeds=(0,), rounds=5, tag="ranks")
QUICK = replace(QUALITY_QUICK, rounds=2, train_examples=16, eval_examples=16, tag="ranks-quick")


def results_stem(config: QualityConfig) -> str:
    """``ranks`` for the committed run, ``ranks-quick`` for ``--quick``."""
    return "ranks" if config.tag == "ranks" else config.tag


def node_rank(ranks: Sequence[int], node: int) -> int:
    """The rank of node ``node`` (1-based, partition node - 1): run-config ``client-ranks``'s
    rule, entry (partition mod len)."""
    return int(ranks[(node - 1) % len(ranks)])


def row_refusal(row: RankRow) -> str | None:
    """Why the app would refuse ``row``'s settings for its ranks (None when it runs them): the
    same check the server makes at start-up; zero-padding is not an app setting (see the
    module docstring), so it has none."""
    if row.method == ZERO_PADDING or len(set(row.ranks)) == 1:
        return None
    return mixed_rank_refusal(
        row.method, row.mode, "delta", "dense", RobustSettings().resolve(mixes_ranks=True)
    )


# ----------------------------------------------------------------------------- pure helpers


def adapter_bytes(adapter: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors an adapter puts on the wire (their raw data, as fp32 replies)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in adapter.values())


def sliced_adapter(tensors: Mapping[str, torch.Tensor], rank: int) -> tuple[Adapter, float]:
    """The adapter a zero-padding (HetLoRA) site of ``rank`` starts from: every module's leading
    ``rank`` directions (``ranks.slice_to_rank``; zero-padded above the global's rank), and the
    relative error ||W - B_k A_k||_F / ||W||_F over every module (0 when W = 0).

    Unlike ``ranks.adapter_at_rank`` this is not the best rank-``rank`` approximation once the
    global is not a balanced factorisation, which zero-padded averaging does not keep.
    """
    layout = parse_layout(tensors.keys())
    out: Adapter = {}
    dropped = total = 0.0
    for module in layout.modules:
        a, b = tensors[module.a_key].float(), tensors[module.b_key].float()
        b_k, a_k = slice_to_rank(b, a, rank)
        out[module.a_key], out[module.b_key] = a_k.contiguous(), b_k.contiguous()
        total += low_rank_energy(b, a)
        dropped += max(low_rank_energy(torch.cat([b, -b_k], 1), torch.cat([a, a_k], 0)), 0.0)
    for key in layout.other_keys:
        out[key] = tensors[key].float()
    error = (dropped / total) ** 0.5 if total > 0.0 else 0.0
    return {key: out[key] for key in tensors}, error


def zero_padded_round(
    base: Mapping[str, torch.Tensor],
    clients: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    server_lr: float = 1.0,
) -> tuple[Adapter, float]:
    """The new global after one zero-padding round (``rank_rounds.merge_zero_padded`` per module, at
    the global's rank), and its relative gap from the exact mean of the clients' true updates
    over every module, sqrt(sum gap^2 / sum ||P||^2) (what the product-space methods would
    step to before their truncation). Non-LoRA keys stay as in ``base``."""
    layout = parse_layout(base.keys())
    out: Adapter = {}
    gap = total = 0.0
    rank = max(int(base[module.a_key].shape[0]) for module in layout.modules)
    for module in layout.modules:
        result = merge_zero_padded(
            base[module.a_key],
            base[module.b_key],
            [client[module.a_key] for client in clients],
            [client[module.b_key] for client in clients],
            weights,
            server_lr=server_lr,
            rank=rank,
            labels=list(range(len(clients))),
        )
        out[module.a_key], out[module.b_key] = result.a, result.b
        gap += result.dropped_energy
        total += result.total_energy
    for key in layout.other_keys:
        out[key] = base[key].float().clone()
    return {key: out[key] for key in base}, (gap / total) ** 0.5 if total > 0.0 else 0.0


# ----------------------------------------------------------------------------- runs


@dataclass
class RowTrace:
    """What a row records beside its accuracies: per round, each node's rank, the truncation
    error of what it started from, its reply bytes; and the server's per-round errors."""

    site_ranks: dict[str, int]
    truncation_errors: list[dict[str, float]]
    reply_bytes: dict[str, int]
    merge_errors: list[float | None]


def run_row(
    work: Workload, row: RankRow, seed: int, log: Callable[[str], None] = print
) -> tuple[list[Scores], RowTrace]:
    """``row`` for ``work.config.rounds`` rounds; test scores after each round, and its trace."""
    config = work.config
    nodes = list(range(1, len(config.seen) + 1))
    trace = RowTrace(
        site_ranks={str(node): node_rank(row.ranks, node) for node in nodes},
        truncation_errors=[],
        reply_bytes={},
        merge_errors=[],
    )
    if row.method == ZERO_PADDING:
        return run_zero_padded(work, row, seed, trace, log), trace

    def on_reply(node: int, start: Adapter, trained: Adapter) -> Adapter:
        trace.reply_bytes[str(node)] = adapter_bytes(trained)
        return trained

    def on_round(server_round: int, report: Any) -> None:
        errors = {str(node): float(e) for node, e in report.site_truncation_errors.items()}
        trace.truncation_errors.append(errors)
        trace.merge_errors.append(report.relative_error)

    history = run_federated(
        work,
        method=row.method,
        seed=seed,
        rounds=config.rounds,
        fuse_weight=row.fuse_weight,
        server_lr=row.server_lr,
        split="test",
        log=log,
        strategy_options={"mode": row.mode} if row.method == "robustmerge" else None,
        reply_hook=on_reply,
        client_ranks=row.ranks,
        round_hook=on_round,
    )
    return history, trace


def run_zero_padded(
    work: Workload, row: RankRow, seed: int, trace: RowTrace, log: Callable[[str], None]
) -> list[Scores]:
    """The zero-padding baseline, R rounds in-process (see the module docstring): the same
    clients, data draws, training seeds and local settings as ``run_federated``'s rows."""
    config = work.config
    local = replace(work.train, local_epochs=1)
    nodes = list(range(1, len(config.seen) + 1))
    ranks = {node: node_rank(row.ranks, node) for node in nodes}
    global_adapter = initial_adapter(work.lora.with_rank(max(ranks.values())), seed=seed)
    history: list[Scores] = []
    for server_round in range(1, config.rounds + 1):
        began = time.perf_counter()
        trained: list[Adapter] = []
        weights: list[float] = []
        errors: dict[str, float] = {}
        for node in nodes:
            data = node_train_data(config.seen, node, config, seed, server_round)
            start, errors[str(node)] = sliced_adapter(global_adapter, ranks[node])
            model = work.model_for(start)
            set_lora_state(model, start)
            result = train_lora(model, data, local, seed=seed * 100 + server_round)
            trained.append(get_lora_state(model))
            trace.reply_bytes[str(node)] = adapter_bytes(trained[-1])
            weights.append(float(result.num_examples))
        global_adapter, gap = zero_padded_round(
            global_adapter, trained, weights, server_lr=row.server_lr
        )
        trace.truncation_errors.append(errors)
        trace.merge_errors.append(gap)
        scores = summarise(work.evaluate(global_adapter, "test"), config)
        history.append(scores)
        log(
            f"  zero-padding seed {seed} round {server_round}: seen "
            f"{scores.get('seen-avg', float('nan')):.3f} gap {gap:.3f} "
            f"({time.perf_counter() - began:.0f}s)"
        )
    return history


def machine() -> str:
    """The machine, in words: vCPUs, architecture, whether a hypervisor is present, GPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    vm = " VM" if " hypervisor" in flags else ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()}-vCPU {platform.machine()}{vm}, {gpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s)"
    )


def run(
    config: QualityConfig,
    out_dir: Path,
    rows: Sequence[RankRow] = ROWS,
    log: Callable[[str], None] = print,
    command: str = "python -m benchmarks.rank_quality",
    threads: int = 2,
) -> dict[str, Any]:
    """Every row of ``rows`` not yet saved in ``out_dir``'s JSON; saves JSON and Markdown after
    each. A saved run of other sizes is refused (delete it, or use another ``--out-dir``).
    ``threads``: torch's CPU threads (2 on an idle 2-core machine; 1 when other jobs share the
    cores, where two threads mostly wait for each other)."""
    torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{results_stem(config)}.json"
    wanted = json.loads(json.dumps(asdict(config)))
    results: dict[str, Any] = json.loads(json_path.read_text()) if json_path.exists() else {}
    if results and results.get("config") != wanted:
        raise SystemExit(
            f"{json_path} holds a run of other sizes; delete it or pass another --out-dir"
        )
    results.setdefault("config", wanted)
    results.setdefault("rows", {})
    results["machine"] = machine()
    for row in rows:
        refusal = row_refusal(row)
        if refusal is not None:
            raise SystemExit(f"row {row.key}: the app refuses these settings: {refusal}")
    results["zero-padding-in-app"] = mixed_rank_refusal(
        "fedavg", "paper-exact", "delta", "dense", RobustSettings().resolve(mixes_ranks=True)
    )
    todo = [row for row in rows if row.key not in results["rows"]]
    if not todo:
        return results
    work = load_workload(config)
    seed = config.fed_seeds[0]
    results["adapter-bytes-per-rank"] = {
        str(rank): adapter_bytes(initial_adapter(work.lora.with_rank(rank), seed=seed))
        for rank in sorted({r for row in ROWS for r in row.ranks})
    }
    for row in todo:
        began = time.perf_counter()
        log(f"row {row.key}: {row.label}")
        history, trace = run_row(work, row, seed, log)
        results["rows"][row.key] = {
            "label": row.label,
            "ranks": list(row.ranks),
            "method": row.method,
            "mode": row.mode if row.method == "robustmerge" else None,
            "fuse_weight": row.fuse_weight if row.method == "robustmerge" else None,
            "server_lr": row.server_lr,
            "seed": seed,
            "history": history,
            "trace": asdict(trace),
            "seconds": round(time.perf_counter() - began, 1),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        }
        json_path.write_text(json.dumps(results, indent=1))
        (out_dir / f"{results_stem(config)}.md").write_text(markdown(results, command))
        log(f"row {row.key} done in {results['rows'][row.key]['seconds']:.0f}s")
    return results


# ----------------------------------------------------------------------------- reporting


def errors_by_rank(row: Mapping[str, Any]) -> dict[int, list[float]]:
    """Per rank, the mean truncation error of its sites in each round (rounds in order)."""
    trace = row["trace"]
    out: dict[int, list[float]] = {}
    for rank in sorted(set(trace["site_ranks"].values())):
        nodes = [node for node, r in trace["site_ranks"].items() if r == rank]
        for errors in trace["truncation_errors"]:
            values = [errors[node] for node in nodes if node in errors]
            out.setdefault(rank, []).append(sum(values) / len(values) if values else float("nan"))
    return out


def by_site_group(results: Mapping[str, Any], row: Mapping[str, Any]) -> dict[int, float]:
    """``row``'s final accuracy averaged over the seen tasks of the sites that train each rank
    in the mixed rows (client i: ``MIXED[i % 3]``), so every row, equal ranks included, is
    read on the same groups of tasks: where a mixed federation loses, and whose task pays."""
    seen = results["config"]["seen"]
    final = row["history"][-1]
    groups: dict[int, list[float]] = {}
    for node, task in enumerate(seen, start=1):
        if task in final:
            groups.setdefault(node_rank(MIXED, node), []).append(float(final[task]))
    return {rank: sum(v) / len(v) for rank, v in sorted(groups.items())}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _final(row: Mapping[str, Any], column: str) -> float:
    return float(row["history"][-1][column])


def comparisons(results: Mapping[str, Any]) -> list[str]:
    """Sentences comparing the final round of the saved rows (points of accuracy), for the rows
    present: mixed against rank 16 and rank 8 of the same method, and zero-padding against svd."""
    rows = results["rows"]
    pairs = [
        ("mixed-svd", "r16-svd"),
        ("mixed-svd", "r8-svd"),
        ("mixed-svd", "mixed-zero-padding"),
        ("mixed-paper-equation", "r16-paper-equation"),
        ("mixed-paper-equation", "r8-paper-equation"),
        ("mixed-paper-equation", "mixed-zero-padding"),
    ]
    lines = []
    for first, second in pairs:
        if first in rows and second in rows:
            seen = 100 * (_final(rows[first], "seen-avg") - _final(rows[second], "seen-avg"))
            unseen = 100 * (_final(rows[first], "unseen-avg") - _final(rows[second], "unseen-avg"))
            lines.append(
                f"- {rows[first]['label']} minus {rows[second]['label']}, final round: seen "
                f"{seen:+.1f} points, unseen {unseen:+.1f} points."
            )
    return lines


def markdown(results: Mapping[str, Any], command: str = "python -m benchmarks.rank_quality") -> str:
    """The results as Markdown: accuracy per round, truncation errors per rank, bytes per rank,
    and the computed comparisons (with the size of one test example, the noise floor)."""
    config = results["config"]
    rounds = int(config["rounds"])
    rows: Mapping[str, Any] = results["rows"]
    seen_count = len(config["seen"])
    lines = [
        f"# Mixed LoRA ranks: quality ({config['tag']})",
        "",
        f"- command: `{command}` (resumes: rows already saved are skipped)",
        f"- machine: {results.get('machine', '?')}",
        f"- workload: {seen_count} clients, one seen task each ({', '.join(config['seen'])}); "
        f"unseen {', '.join(config['unseen'])}; {config['train_examples']} train examples per "
        f"client per round, 1 local epoch, batch {config['batch_size']}, learning rate "
        f"{config['learning_rate']}; {config['eval_examples']} test examples per task; "
        f"{rounds} rounds; 1 seed. MiniLM-L6 + LoRA on query/value, alpha / r = 2 at every rank.",
        "- mixed ranks: client i trains rank (4, 8, 16)[i mod 3]; the global is held at 16.",
        "- zero-padding is not an app setting (the app refuses factor-wise merges of mixed "
        "ranks); its row runs the same clients in-process with `rank_rounds.merge_zero_padded`, "
        "each client starting from the global's leading r_t directions (HetLoRA).",
        "",
        "Test accuracy (%), seen average / unseen average, after each round:",
        "",
        "| row | " + " | ".join(f"round {r + 1}" for r in range(rounds)) + " | wall |",
        "|---|" + "---|" * rounds + "---|",
    ]
    for row in rows.values():
        cells = [f"{_pct(s['seen-avg'])} / {_pct(s['unseen-avg'])}" for s in row["history"]]
        cells += ["-"] * (rounds - len(cells))
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {row['seconds']:.0f} s |")
    tasks = [*config["seen"], *config["unseen"]]
    lines += [
        "",
        "Final round, per task (%):",
        "",
        "| row | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for row in rows.values():
        final = row["history"][-1]
        lines.append(
            f"| {row['label']} | "
            + " | ".join(_pct(final[t]) if t in final else "-" for t in tasks)
            + " |"
        )
    group_ranks = sorted(set(MIXED))
    lines += [
        "",
        "Final seen accuracy (%) on the tasks of the sites that train rank 4, 8 and 16 in the "
        "mixed rows (the same tasks in every row):",
        "",
        "| row | " + " | ".join(f"rank-{r} sites' tasks" for r in group_ranks) + " |",
        "|---|" + "---|" * len(group_ranks),
    ]
    for row in rows.values():
        groups = by_site_group(results, row)
        cells = [_pct(groups[r]) if r in groups else "-" for r in group_ranks]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Truncation error of what each site started from (mean over that rank's sites, %; "
        "||W_G - B_k A_k||_F / ||W_G||_F over every module), per round. Rank 16 (the global's) "
        "is 0 by construction:",
        "",
        "| row | rank | " + " | ".join(f"round {r + 1}" for r in range(rounds)) + " |",
        "|---|---|" + "---|" * rounds,
    ]
    for row in rows.values():
        if len(set(row["ranks"])) == 1:
            continue
        for rank, values in errors_by_rank(row).items():
            lines.append(
                f"| {row['label']} | {rank} | "
                + " | ".join(f"{100 * v:.2f}" for v in values)
                + " |"
            )
    lines += [
        "",
        "Server side, per round (%): the new global's relative distance from the full-rank "
        "P = B_G A_G + eta M. Product-space rows: M is the method's merged update and the "
        "distance is the truncation of P back to the global's rank (the row's largest); "
        "zero-padding: M is the exact mean of the true updates, so the distance is how far "
        "factor-wise averaging of padded factors lands from it:",
        "",
        "| row | " + " | ".join(f"round {r + 1}" for r in range(rounds)) + " |",
        "|---|" + "---|" * rounds,
    ]
    for row in rows.values():
        merge_errors = row["trace"].get("merge_errors", [])
        cells = ["-" if e is None else f"{100 * e:.2f}" for e in merge_errors]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    per_rank = results.get("adapter-bytes-per-rank", {})
    if per_rank:
        largest = max(per_rank, key=lambda k: int(k))
        lines += [
            "",
            "Reply size per site per round (fp32 LoRA tensors, measured on the adapters):",
            "",
            "| rank | bytes | of rank " + largest + " |",
            "|---|---|---|",
        ]
        for rank, size in sorted(per_rank.items(), key=lambda item: int(item[0])):
            lines.append(f"| {rank} | {size:,} | {size / per_rank[largest]:.2f} |")
    compared = comparisons(results)
    if compared:
        example = 100 / int(config["eval_examples"])
        lines += [
            "",
            "## Reading",
            "",
            f"One test example is {example:.1f} points on its task and {example / seen_count:.2f} "
            f"on the {seen_count}-task seen average; with one seed, gaps of a point or two are "
            "within the noise of the data draw.",
            "",
            *compared,
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, run the rows not yet saved, write the JSON and Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 clients, 2 rounds, few examples")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--rows",
        default="",
        help=f"comma-separated row keys (default: all): {', '.join(r.key for r in ROWS)}",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the Markdown from the saved JSON"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (1 on a shared machine)"
    )
    args = parser.parse_args(argv)
    config = QUICK if args.quick else CONFIG
    command = "python -m benchmarks.rank_quality" + (" --quick" if args.quick else "")
    if args.threads != 2:
        command += f" --threads {args.threads}"
    stem = args.out_dir / results_stem(config)
    if args.report_only:
        saved = json.loads(stem.with_suffix(".json").read_text())
        stem.with_suffix(".md").write_text(markdown(saved, command))
        return
    keys = [key for key in args.rows.split(",") if key]
    unknown = sorted(set(keys) - {row.key for row in ROWS})
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(r.key for r in ROWS)}")
    rows = [row for row in ROWS if not keys or row.key in keys]
    results = run(config, args.out_dir, rows, command=command, threads=args.threads)
    stem.with_suffix(".md").write_text(markdown(results, command))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
