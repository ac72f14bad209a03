"""Peak memory of one FedRobustMerge round over T replies of LLaMA-7B-shaped LoRA adapters.

Run ``python -m benchmarks.strategy_memory`` (``--clients 16 --layers 32`` by default: 16 replies
of ~40M parameters each). The replies are built as Flower ArrayRecords (their wire form), then
``FedRobustMerge.aggregate_train`` checks, merges (RobustMerge on deltas) and applies the server
step. Printed side by side, measured in this one process with the kernel's RSS high-water mark
reset before the round:

- the bytes of the replies themselves and of the global adapter;
- the round's extra peak RSS beyond them;
- what holding one decoded copy of every reply would cost (the naive design), and one module
  stacked over the T replies (the design target: about two of these).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from benchmarks.inprocess import FakeGrid, set_task_identity, train_reply
from benchmarks.merge_speed import _reset_peak_rss, _status_kib, build_adapters, cpu_model
from strategies import FedRobustMerge
from strategies.robust import RobustSettings

MIB = 1024.0 * 1024.0


def main(argv: Sequence[str] | None = None) -> int:
    """Build the replies, run one aggregation, print the memory table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        command = [sys.executable, "-m", "benchmarks.strategy_memory", *(argv or sys.argv[1:])]
        os.execve(sys.executable, command, env)
    torch.set_num_threads(args.threads)
    set_task_identity()

    (base,) = build_adapters(args.layers, 1, args.rank, seed=1)
    replies: list[Message] = []
    for client, adapter in enumerate(build_adapters(args.layers, args.clients, args.rank, 2)):
        trained = {key: base[key] + 0.01 * value for key, value in adapter.items()}
        replies.append(train_reply(client + 1, ArrayRecord(trained)))
        del trained
    del adapter
    reply_bytes = sum(msg.content.array_records["arrays"].count_bytes() for msg in replies)
    adapter_bytes = sum(v.numel() * 4 for v in base.values())
    largest_module = max(v.numel() for v in base.values()) * 4 * 2
    strategy = FedRobustMerge(  # the norm screen, as measured before "auto" became the default
        device="cpu", min_train_nodes=args.clients, robust=RobustSettings("norm")
    )
    grid = FakeGrid(list(range(1, args.clients + 1)))
    list(strategy.configure_train(1, ArrayRecord(base), ConfigRecord(), grid))  # type: ignore[arg-type]

    reset = _reset_peak_rss()
    before = _status_kib("VmRSS") or 0
    started = time.perf_counter()
    arrays, metrics = strategy.aggregate_train(1, replies)
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM") or 0
    assert arrays is not None and metrics is not None
    new_global_bytes = arrays.count_bytes()
    extra = (peak - before) * 1024.0

    print(f"# FedRobustMerge round memory, {datetime.date.today().isoformat()}")
    print(f"machine: {cpu_model()} ({platform.machine()}), torch {torch.__version__}")
    print(
        f"command: python -m benchmarks.strategy_memory --clients {args.clients} "
        f"--layers {args.layers} --rank {args.rank}"
    )
    print(f"high-water mark reset before the round: {reset}")
    print()
    print("| quantity | MiB |")
    print("| --- | --- |")
    print(
        f"| replies as received ({args.clients} x {adapter_bytes / MIB:.0f} MiB) | "
        f"{reply_bytes / MIB:.0f} |"
    )
    print(f"| round's extra peak RSS beyond what was resident before it | {extra / MIB:.0f} |")
    print(f"| of which the new global adapter (output) | {new_global_bytes / MIB:.0f} |")
    print(
        f"| one decoded fp32 copy of every reply (naive design) | "
        f"{args.clients * adapter_bytes / MIB:.0f} |"
    )
    print(
        f"| one module (A and B, largest) stacked over the replies | "
        f"{args.clients * largest_module / MIB:.0f} |"
    )
    print()
    print(
        f"round seconds: {seconds:.1f} (checks, merge, server step, diagnostics); "
        f"merge alone {metrics['merge-seconds']:.1f} s"
    )
    print(
        f"extra beyond the output, in module stacks: "
        f"{(extra - new_global_bytes) / (args.clients * largest_module):.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
