"""What folding one reply into a streamed round costs, against a plain running sum (issue 25).

Run ``python -m benchmarks.fold_speed`` (``--help`` for the options). A streamed round
(``strategies.merging.streaming``) folds each client's delta into order-independent exact sums
(``ExactSum``) as it arrives; this measures, in one process and interleaved in every repeat:

- ``plain running sum``: ``acc += delta`` key by key in float32, the least any fold costs (it is
  order-dependent and does no pruning);
- each fold (``round_fold``: fedavg's mean, RobustMerge paper-exact, TIES) over the same deltas.

The deltas are LLaMA-7B-shaped LoRA (``benchmarks.scale.Shape``: every projection of
``--layers`` layers, rank 16, float32), N(0, 1e-3^2) like the scale benchmark's. Each repeat
folds ``--replies`` deltas into a fold that already holds two (so that creating the sums is
not counted) and times the running sum of the same deltas beside it; the medians per reply and
their ratio are printed, with, for RobustMerge, where the time goes: steps 1-2 (pruning and
the scale), the exact sums, and the rest.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.merge_speed import cpu_model
from benchmarks.scale import NOISE_STD, Shape
from strategies.merging.exact_sum import ExactSum
from strategies.merging.lora_keys import parse_layout
from strategies.merging.registry import create_method
from strategies.merging.robustmerge import RobustMerge
from strategies.merging.streaming import RoundFold, round_fold

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "robustmerge": {"keep_ratio": 0.2},
    "ties": {"keep_ratio": 0.2},
    "dare": {"drop_rate": 0.5},
}
TARGET_RATIO = 3.0  # issue 25: a fold costs at most 3x a plain running sum per reply

Delta = dict[str, torch.Tensor]


def deltas(shape: Shape, count: int, seed: int) -> list[Delta]:
    """``count`` clients' deltas: N(0, NOISE_STD^2) per entry, seeded."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            key: torch.randn(size, generator=generator).mul_(NOISE_STD)
            for key, size in shape.tensors()
        }
        for _ in range(count)
    ]


def seconds(action: Callable[[], None]) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def running_sum(accumulator: Delta, replies: Sequence[Delta]) -> None:
    for reply in replies:
        for key, value in reply.items():
            accumulator[key].add_(value)


def fold_all(fold: RoundFold, replies: Sequence[Delta]) -> None:
    for reply in replies:
        fold.add(reply, 1.0)


def robustmerge_parts(replies: Sequence[Delta]) -> dict[str, Callable[[], None]]:
    """RobustMerge's fold split in two: steps 1-2 alone, and the exact sums of their output."""
    method = create_method("robustmerge", **METHODS["robustmerge"]).round_form()
    assert isinstance(method, RobustMerge)
    layout = parse_layout(list(replies[0]))
    pruned = []
    for reply in replies:
        for module in layout.modules:
            a, b = reply[module.a_key], reply[module.b_key]
            pruned.append((module, *method.prune_and_scale(a[None], b[None])))
    sums = {key: ExactSum(value.shape) for key, value in replies[0].items()}

    def prune() -> None:
        for reply in replies:
            for module in layout.modules:
                method.prune_and_scale(reply[module.a_key][None], reply[module.b_key][None])

    def exact_sums() -> None:
        for module, a, b, scale in pruned:
            sums[module.a_key].add(a[0])
            sums[module.b_key].add(b[0], scale[0].to(torch.float64))
            ExactSum(scale[0].shape).add(scale[0])

    return {"steps 1-2": prune, "exact sums": exact_sums}


def measure(shape: Shape, replies: int, repeats: int, seed: int) -> dict[str, Any]:
    """Per method: median seconds per reply of the fold and of the plain running sum."""
    batch = deltas(shape, replies + 2, seed)
    warm, timed = batch[:2], batch[2:]
    keys = list(batch[0])
    results: dict[str, Any] = {}
    for name, hyperparameters in METHODS.items():
        method = create_method(name, **hyperparameters).round_form()
        fold = round_fold(method, keys)
        assert fold is not None, f"{name} has no fold"
        fold_all(fold, warm)
        accumulator = {key: torch.zeros_like(value) for key, value in batch[0].items()}
        parts = robustmerge_parts(timed) if name == "robustmerge" else {}
        samples: dict[str, list[float]] = {"plain": [], "fold": [], **{p: [] for p in parts}}
        for _ in range(repeats):
            samples["plain"].append(seconds(functools.partial(running_sum, accumulator, timed)))
            samples["fold"].append(seconds(functools.partial(fold_all, fold, timed)))
            for part, action in parts.items():
                samples[part].append(seconds(action))
        per_reply = {k: statistics.median(v) / replies for k, v in samples.items()}
        per_reply["ratio"] = per_reply["fold"] / per_reply["plain"]
        results[name] = per_reply
        print(f"{name}: {_row(per_reply)}", flush=True)
    return results


def _row(per_reply: Mapping[str, float]) -> str:
    return ", ".join(
        f"{k} {v:.2f}x" if k == "ratio" else f"{k} {v * 1e3:.1f} ms" for k, v in per_reply.items()
    )


def markdown(data: Mapping[str, Any]) -> str:
    """The results as the committed report."""
    shape = data["shape"]
    lines = [
        "# Folding one reply into a streamed round, against a plain running sum (issue 25)",
        "",
        f"Measured {data['date']} on {data['machine_note']}: {data['machine']['cpu']}, "
        f"torch {data['machine']['torch']}, {data['threads']} thread(s). Command: "
        f"`{data['command']}`.",
        "",
        f"Deltas: LLaMA-7B-shaped LoRA, {shape['layers']} layers, rank {shape['rank']}, float32 "
        f"({data['adapter_mb']:.1f} MB a reply); {data['replies']} replies per repeat, "
        f"{data['repeats']} repeats interleaved, medians per reply.",
        "",
        "| fold | plain running sum (ms / reply) | fold (ms / reply) | fold / plain | target |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in data["results"].items():
        verdict = "met" if row["ratio"] <= TARGET_RATIO else "not met"
        lines.append(
            f"| {name} | {row['plain'] * 1e3:.1f} | {row['fold'] * 1e3:.1f} | "
            f"{row['ratio']:.1f}x | <= {TARGET_RATIO:.0f}x: {verdict} |"
        )
    robust = data["results"].get("robustmerge", {})
    if "steps 1-2" in robust:
        rest = robust["fold"] - robust["steps 1-2"] - robust["exact sums"]
        lines += [
            "",
            "Where RobustMerge's fold spends a reply (ms): steps 1-2 (pruning, the scale) "
            f"{robust['steps 1-2'] * 1e3:.1f}, the exact sums {robust['exact sums'] * 1e3:.1f}, "
            f"the rest (casts, reshapes, bookkeeping) {rest * 1e3:.1f}.",
        ]
    lines += ["", *data.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096, help="LLaMA-7B's width: 4096")
    parser.add_argument("--replies", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--machine-note", default=platform.node())
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "fold_speed_cpu")
    parser.add_argument("--note", action="append", default=[], help="a line for the report")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = Shape(layers=args.layers, hidden=args.hidden)
    results = measure(shape, args.replies, args.repeats, args.seed)
    data = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": cpu_model(), "torch": torch.__version__},
        "machine_note": args.machine_note,
        "threads": args.threads,
        "command": " ".join(["python -m benchmarks.fold_speed", *(argv or sys.argv[1:])]),
        "shape": {"layers": shape.layers, "hidden": shape.hidden, "rank": shape.rank},
        "adapter_mb": shape.adapter_bytes / 1e6,
        "replies": args.replies,
        "repeats": args.repeats,
        "results": results,
        "notes": args.note,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(data))
    print(f"wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
