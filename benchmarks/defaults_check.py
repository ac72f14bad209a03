"""Does the dev winner's server lr carry over to the app's own default client training?

What and why
------------
Issue 17 makes the app's defaults the method and hyperparameters that win on dev in the quality
benchmark v2 (``benchmarks.quality_v2``). That benchmark's clients take two local steps a round
(16 examples in batches of 8, learning rate 1e-3), so that 72 federated runs fit on 2 cores; the
app's default client trains ``train-examples`` = 512 examples in batches of 32 at 5e-4 (16
steps). A server lr tuned for a small client update may overshoot a larger one, so before it
becomes a default this check runs the dev winner (method, mode, fuse weight from the v2 results
file) with the app's own defaults for everything else (seen and unseen tasks, one client per
seen task, client training, ``num-server-rounds``), at the tuned server lr and at smaller
ones, scored after every round on the seen tasks' dev splits (and the unseen tasks' test).

Usage::

    python -m benchmarks.defaults_check --from benchmarks/results/quality.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.per_example import load_tracking_workload
from benchmarks.quality import RESULTS_DIR, QualityConfig, run_federated
from benchmarks.quality_v2 import ROUND_ROWS, write_json
from benchmarks.quality_v2_report import dev_ranking
from workload.config import Reader


def app_config(dev_examples: int, eval_examples: int) -> QualityConfig:
    """The benchmark sizes of the app's default run: an empty run config read as the app reads
    its own (every value the run-config schema's default)."""
    defaults = Reader({}, "the schema's defaults")
    return QualityConfig(
        seen=defaults.names("seen-tasks"),
        unseen=defaults.names("unseen-tasks"),
        train_examples=defaults.integer("train-examples"),
        batch_size=defaults.integer("batch-size"),
        max_length=defaults.integer("max-length"),
        learning_rate=defaults.number("learning-rate"),
        dev_examples=dev_examples,
        eval_examples=eval_examples,
        tag="defaults",
    )


def candidate_lrs(tuned: float) -> list[float]:
    """The tuned server lr, it divided by 4 while above 1, and 1 (the old default); ascending."""
    values = {tuned, 1.0}
    value = tuned
    while value / 4 > 1.0:
        value /= 4
        values.add(value)
    return sorted(values)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the check and write ``defaults.{md,json}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source", type=Path, required=True, help="v2 results JSON")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--dev-examples", type=int, default=100)
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    source: dict[str, Any] = json.loads(args.source.read_text())
    ranking = dev_ranking(source)
    if not ranking:
        raise SystemExit(f"{args.source} has no tuning results")
    row, dev_score, chosen = ranking[0]
    spec = ROUND_ROWS[row]
    config = app_config(args.dev_examples, args.eval_examples)
    rounds = Reader({}, "the schema's defaults").integer("num-server-rounds")
    work = load_tracking_workload(config, curve_examples=1)
    out: dict[str, Any] = {
        "winner": {"row": row, "dev": dev_score, "chosen": chosen},
        "config": {
            "seen": config.seen,
            "unseen": config.unseen,
            "train_examples": config.train_examples,
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            "rounds": rounds,
            "dev_examples": args.dev_examples,
            "eval_examples": args.eval_examples,
            "seed": args.seed,
        },
        "machine": f"{platform.node()} {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "runs": {},
    }
    began = time.perf_counter()
    for server_lr in candidate_lrs(chosen["server_lr"]):
        history = run_federated(
            work,
            method=spec.method,
            seed=args.seed,
            rounds=rounds,
            fuse_weight=chosen.get("fuse_weight", 2.0),
            server_lr=server_lr,
            split="dev",
            strategy_options=dict(spec.options),
            train_factors=spec.train_factors,
        )
        assert work.last_adapter is not None
        unseen = work.evaluate(work.last_adapter, "test", list(config.unseen))
        out["runs"][f"{server_lr:g}"] = {"dev_curve": history, "unseen_test": unseen}
        write_json(args.out_dir / "defaults.json", out)
    out["wall_seconds"] = round(time.perf_counter() - began, 1)
    write_json(args.out_dir / "defaults.json", out)
    (args.out_dir / "defaults.md").write_text(markdown(out))
    print(markdown(out))


def markdown(out: dict[str, Any]) -> str:
    """The check's table: dev seen average per round for each server lr."""
    winner, config = out["winner"], out["config"]
    hyper = ", ".join(f"{k} {v:g}" for k, v in winner["chosen"].items())
    lines = [
        "# Do the dev winner's hyperparameters carry over to the app's default run?",
        "",
        f"- winner on dev in the quality benchmark v2: {winner['row']} at {hyper}",
        f"- the app's default run otherwise: seen {', '.join(config['seen'])}; unseen "
        f"{', '.join(config['unseen'])}; one client per seen task; {config['train_examples']} "
        f"examples per client and round in batches of {config['batch_size']}, learning rate "
        f"{config['learning_rate']}; {config['rounds']} rounds; seed {config['seed']}",
        f"- scored on {config['dev_examples']} dev examples per seen task (unseen: "
        f"{config['eval_examples']} test examples per task); machine {out['machine']}; "
        f"{out['date']}",
        "",
        "| server lr | "
        + " | ".join(f"round {r + 1} seen dev" for r in range(config["rounds"]))
        + " | unseen test |",
        "|---" * (config["rounds"] + 2) + "|",
    ]
    for server_lr, run in out["runs"].items():
        cells = [f"{100 * s['seen-avg']:.1f}" for s in run["dev_curve"]]
        unseen = run["unseen_test"]
        unseen_avg = sum(unseen.values()) / len(unseen) if unseen else float("nan")
        lines.append(f"| {server_lr} | " + " | ".join(cells) + f" | {100 * unseen_avg:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
