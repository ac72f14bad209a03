"""Uplink bytes per client per round: dense fp32, dense fp16, and the sparse uplink.

Run ``python -m benchmarks.uplink_bytes`` (``--help`` for the options). The adapter is the
default workload's: all-MiniLM-L6-v2 with rank-8 LoRA on query and value (6 layers, 24 tensors
of 8 x 384 or 384 x 8, 73,728 entries), its round-0 global from
``workload.model.initial_adapter(LoraSettings(), seed=0)``. The client's trained adapter comes
from a real round of local training (``workload.training.train_lora`` on ``--examples`` examples
of ``--task``, as a simulated node trains) unless ``--random-delta`` asks for the global plus
Gaussian noise instead; the byte counts hardly depend on which (every delta entry is nonzero
either way; the sparse size depends only on n, the keep ratio and ties).

For each uplink it counts the reply's arrays two ways:

- payload: the bytes of the array data alone (n x 4 for dense fp32);
- ArrayRecord: ``ArrayRecord.count_bytes()``, what ``RoundReport.bytes_received`` and
  metrics.json report: the payload plus each array's NumPy header and key.

Sparse: the client's delta pruned at ``--keep-ratio`` (spec step 1, ties kept: n - k + 1 of n
entries survive), its nonzero values as float32 plus the smaller position encoding (bitmask or
escaped gaps, ``protocol.sparse_codec``), and s~ (r float32) per module. Target: at most 30 % of
dense fp32. The downlink stays the dense global adapter.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from benchmarks.merge_speed import cpu_model
from client.uplink import sparse_update
from protocol.sparse_codec import BITMASK_SUFFIX, GAPS_SUFFIX
from strategies.merging.robustmerge import RobustMerge
from workload.model import LoraSettings, build_lora_model, get_lora_state, initial_adapter

RESULTS = Path(__file__).resolve().parent / "results" / "uplink_bytes.md"
TARGET = 0.30


def trained_adapter(
    base: Mapping[str, torch.Tensor], args: argparse.Namespace
) -> dict[str, torch.Tensor]:
    """The client's adapter after one round of local training (or global + noise)."""
    if args.random_delta:
        generator = torch.Generator().manual_seed(args.seed)
        return {
            key: value + 1e-3 * torch.randn(value.shape, generator=generator)
            for key, value in base.items()
        }
    from workload.model import set_lora_state
    from workload.tasks import load_task
    from workload.training import TrainSettings, train_lora

    model = build_lora_model(LoraSettings(), seed=0)
    set_lora_state(model, base)
    data = load_task(args.task, "train", limit=args.examples, seed=args.seed)
    train_lora(model, data, TrainSettings(), seed=args.seed)
    return get_lora_state(model)


def payload(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(value.numel() * value.element_size() for value in tensors.values())


def measure(args: argparse.Namespace) -> list[str]:
    base = initial_adapter(LoraSettings(), seed=0)
    entries = sum(value.numel() for value in base.values())
    started = time.perf_counter()
    trained = trained_adapter(base, args)
    train_seconds = time.perf_counter() - started
    delta_source = (
        "global + N(0, 1e-3^2) noise (--random-delta)"
        if args.random_delta
        else f"one round of local training: {args.examples} examples of {args.task}, default "
        f"TrainSettings, seed {args.seed} ({train_seconds:.0f} s)"
    )
    dense32 = {key: trained[key] for key in base}
    dense16 = {key: value.to(torch.float16) for key, value in dense32.items()}
    method = RobustMerge(keep_ratio=args.keep_ratio, scale_quantile=args.scale_quantile)
    started = time.perf_counter()
    wire = sparse_update(trained, base, method)
    encode_ms = (time.perf_counter() - started) * 1e3
    kept = sum(v.numel() for k, v in wire.items() if k.endswith("::values"))
    bitmasks = sum(1 for key in wire if key.endswith(BITMASK_SUFFIX))
    gaps = sum(1 for key in wire if key.endswith(GAPS_SUFFIX))

    rows = [
        ("dense fp32", payload(dense32), ArrayRecord(dense32).count_bytes(), len(dense32)),
        ("dense fp16", payload(dense16), ArrayRecord(dense16).count_bytes(), len(dense16)),
        (
            f"sparse, keep ratio {args.keep_ratio:g}",
            payload(wire),
            ArrayRecord(wire).count_bytes(),
            len(wire),
        ),
    ]
    reference_payload, reference_record = rows[0][1], rows[0][2]
    lines = [
        f"# Uplink bytes per client per round, {datetime.date.today().isoformat()}",
        f"command: python -m benchmarks.uplink_bytes {' '.join(sys.argv[1:])}".rstrip(),
        f"machine: {cpu_model()} ({platform.machine()}, {os.cpu_count()} cores), "
        f"torch {torch.__version__}, python {platform.python_version()}",
        "adapter: all-MiniLM-L6-v2, LoRA r = 8 on query and value (6 layers): "
        f"{len(base)} tensors, {entries:,} entries; global = initial_adapter(LoraSettings(), "
        "seed=0)",
        f"client's trained adapter: {delta_source}",
        f"sparse: keep ratio {args.keep_ratio:g}, scale quantile {args.scale_quantile:g}; "
        f"{kept:,} of {entries:,} delta entries sent ({kept / entries:.2%}); positions: "
        f"{bitmasks} bitmask(s), {gaps} gap list(s); encoding took {encode_ms:.1f} ms",
        "",
        "| uplink | arrays | payload bytes | of dense fp32 | ArrayRecord bytes | of dense fp32 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, data_bytes, record_bytes, arrays in rows:
        lines.append(
            f"| {name} | {arrays} | {data_bytes:,} | {data_bytes / reference_payload:.1%} | "
            f"{record_bytes:,} | {record_bytes / reference_record:.1%} |"
        )
    sparse_ratio = rows[2][2] / reference_record
    lines += [
        "",
        "ArrayRecord bytes = payload + each array's NumPy header and key (what the strategy's "
        "bytes-received and metrics.json count).",
        f"Target: sparse <= {TARGET:.0%} of dense fp32 (ArrayRecord bytes): "
        f"{'met' if sparse_ratio <= TARGET else 'NOT met'} ({sparse_ratio:.1%}).",
        "Downlink: the dense fp32 global adapter, "
        f"{ArrayRecord(dict(base)).count_bytes():,} bytes per client per round.",
    ]
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--keep-ratio", type=float, default=0.2)
    parser.add_argument("--scale-quantile", type=float, default=0.2)
    parser.add_argument("--task", default="banking77", help="default-workload task to train on")
    parser.add_argument("--examples", type=int, default=64, help="training examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--random-delta", action="store_true", help="global + noise instead of training"
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help="markdown file to write ('-' for none)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    lines = measure(args)
    print("\n".join(lines))
    if str(args.output) != "-":
        args.output.write_text("\n".join(lines) + "\n")
        print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
