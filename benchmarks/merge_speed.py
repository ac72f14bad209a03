"""Merge speed on LLaMA-7B-shaped LoRA: ours, a straightforward reading of the spec, a plain mean.

Run ``python -m benchmarks.merge_speed`` (``--help`` for the options). It builds T random
adapters shaped like a rank-r LoRA on every projection of LLaMA-7B (per layer q, k, v, o:
4096 -> 4096; gate, up: 4096 -> 11008; down: 11008 -> 4096; about 40M parameters per adapter at
32 layers and rank 16) under PEFT's key names, and times, side by side in one process with the
variants interleaved in every repeat:

- ``ours``: ``strategies.merge_lora(adapters, "robustmerge", device=...)`` (paper-exact mode,
  input validation included);
- ``straightforward``: the spec read literally, as the authors' code computes it: per module,
  stack the T tasks, ``torch.kthvalue`` on each flattened |tensor|, mask, sums, the scale s and its
  floor by sorting, the B normalisation;
- ``plain mean``: a stacked mean over the T adapters, key by key (what FedAvg costs);
- ``fedavg via merge_lora``: the same mean through our entry point (validation, stacking), for
  context.

First, a sweep over model sizes (``--sizes``, default 4, 8, 16 and 32 layers): at each size,
new adapters, ours and the plain mean timed side by side (interleaved, ``--sweep-repeats``
rounds, medians of wall-clock and of process CPU seconds) and their ratio, the number that
says what RobustMerge costs over the least any merge does (target: at most 4x at every size;
the fixed costs per tensor weigh most at small sizes), and, per size, whether every pruning
mask and pruned tensor of ours equals the straightforward reading's (``torch.equal``).

It then checks that ours and the straightforward reading keep exactly the same entries (every
pruning mask compared with ``torch.equal``) and prints the largest difference of the merged
tensors, measures each variant's peak memory in a fresh subprocess (CPU: peak RSS above the
RSS before the merge; CUDA: ``torch.cuda.max_memory_allocated``) and says where the time goes.
On CUDA the adapters are placed on the GPU first, and the achieved bandwidth (one read of the
inputs plus one write of the result, divided by the time) is compared with the card's.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import json
import math
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from strategies import merge_lora
from strategies.merging.pruning import (
    magnitude_mask,
    magnitude_threshold,
    prune_by_magnitude,
    prune_with_row_mass,
)
from strategies.merging.threshold import kth_smallest

Adapter = dict[str, torch.Tensor]
Merge = Callable[[Sequence[Mapping[str, torch.Tensor]], torch.device], dict[str, torch.Tensor]]

# (module path inside a decoder layer, d_in, d_out) for LLaMA-7B.
LLAMA_7B_MODULES: tuple[tuple[str, int, int], ...] = (
    ("self_attn.q_proj", 4096, 4096),
    ("self_attn.k_proj", 4096, 4096),
    ("self_attn.v_proj", 4096, 4096),
    ("self_attn.o_proj", 4096, 4096),
    ("mlp.gate_proj", 4096, 11008),
    ("mlp.up_proj", 4096, 11008),
    ("mlp.down_proj", 11008, 4096),
)

# Reference defaults of the spec (keep ratio rho, scale quantile a, fuse weight lambda).
KEEP_RATIO = 0.2
SCALE_QUANTILE = 0.2
FUSE_WEIGHT = 2.0

# Peak memory bandwidth in GB/s, by a substring of torch.cuda.get_device_name (first match).
CARD_BANDWIDTH_GBPS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5, "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10", 600.0),
    ("V100", 900.0),
    ("RTX 4090", 1008.0),
)


def lora_key(layer: int, module: str, factor: str) -> str:
    """PEFT's key for a saved adapter, e.g. ``...layers.0.self_attn.q_proj.lora_A.weight``."""
    return f"base_model.model.model.layers.{layer}.{module}.lora_{factor}.weight"


def build_adapters(layers: int, clients: int, rank: int, seed: int) -> list[Adapter]:
    """T random LLaMA-7B-shaped adapters (float32, CPU), each with its own generator stream.

    A is drawn like PEFT's initialisation (uniform in +-1/sqrt(d_in)); B, zero at initialisation,
    is drawn from N(0, 0.02^2) as a trained B would be non-zero: every entry is distinct, so the
    pruning thresholds are not helped by ties.
    """
    adapters: list[Adapter] = []
    for client in range(clients):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + client)
        adapter: Adapter = {}
        for layer in range(layers):
            for module, d_in, d_out in LLAMA_7B_MODULES:
                bound = 1.0 / math.sqrt(d_in)
                a = torch.rand(rank, d_in, generator=generator).mul_(2 * bound).sub_(bound)
                adapter[lora_key(layer, module, "A")] = a
                adapter[lora_key(layer, module, "B")] = torch.randn(
                    d_out, rank, generator=generator
                ).mul_(0.02)
        adapters.append(adapter)
    return adapters


def ours(adapters: Sequence[Mapping[str, torch.Tensor]], device: torch.device) -> Adapter:
    """The project's entry point, paper-exact RobustMerge with the reference defaults."""
    return merge_lora(adapters, "robustmerge", device=device)


def fedavg_via_merge_lora(
    adapters: Sequence[Mapping[str, torch.Tensor]], device: torch.device
) -> Adapter:
    """FedAvg through the same entry point: what validation and stacking cost on their own."""
    return merge_lora(adapters, "fedavg", device=device)


def plain_mean(adapters: Sequence[Mapping[str, torch.Tensor]], device: torch.device) -> Adapter:
    """Key by key, the mean of the T stacked tensors: the least any merge has to do."""
    return {
        key: torch.stack([adapter[key] for adapter in adapters]).to(device).mean(dim=0).cpu()
        for key in adapters[0]
    }


def straightforward_prune(
    stack: torch.Tensor, keep_ratio: float = KEEP_RATIO
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec step 1 as written: tau = torch.kthvalue of each task's flattened |X|; keep |x| >= tau.

    Returns (X^, mask) for a T x ... stack.
    """
    magnitudes = stack.abs()
    flat = magnitudes.reshape(stack.shape[0], -1)
    k = math.floor(flat.shape[1] * (1.0 - keep_ratio))
    if k == 0:
        mask = torch.ones_like(stack, dtype=torch.bool)
    else:
        tau = torch.kthvalue(flat, k, dim=1).values
        mask = magnitudes >= tau.reshape((-1,) + (1,) * (stack.dim() - 1))
    return stack * mask, mask


def straightforward(
    adapters: Sequence[Mapping[str, torch.Tensor]],
    device: torch.device,
    keep_ratio: float = KEEP_RATIO,
    scale_quantile: float = SCALE_QUANTILE,
    fuse_weight: float = FUSE_WEIGHT,
) -> Adapter:
    """RobustMerge (paper-exact) the way the authors' code computes it, module by module.

    Per module: stack the T tasks; prune A and B with ``torch.kthvalue`` thresholds; s_t[i] =
    sum|A_t[i]| / sum|A^_t[i]| (1 where the kept mass is 0); floor s at its ascending element
    min(floor(r (1 - a)), r - 1) found by sorting; A_m = sum_t lambda A^_t; B_m[:, i] = sum_t
    lambda s~_t[i] B^_t[:, i] / sum_t s~_t[i]. No input validation (the authors' code has none).
    """
    count = len(adapters)
    lambdas = torch.full((count,), fuse_weight, dtype=torch.float32, device=device)
    merged: Adapter = {}
    for a_key in (key for key in adapters[0] if ".lora_A." in key):
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        a_stack = torch.stack([adapter[a_key] for adapter in adapters]).to(device, torch.float32)
        b_stack = torch.stack([adapter[b_key] for adapter in adapters]).to(device, torch.float32)
        a_pruned, _ = straightforward_prune(a_stack, keep_ratio)
        b_pruned, _ = straightforward_prune(b_stack, keep_ratio)
        total = a_stack.abs().sum(dim=-1)
        kept = a_pruned.abs().sum(dim=-1)
        scale = torch.where(kept == 0, torch.ones_like(total), total / kept)
        rank = scale.shape[1]
        position = min(math.floor(rank * (1.0 - scale_quantile)), rank - 1)
        floor = scale.sort(dim=1).values[:, position : position + 1]
        scale = torch.maximum(scale, floor)
        merged[a_key] = (lambdas[:, None, None] * a_pruned).sum(dim=0).cpu()
        numerator = (lambdas[:, None, None] * scale[:, None, :] * b_pruned).sum(dim=0)
        merged[b_key] = (numerator / scale.sum(dim=0)).cpu()
    return {key: merged[key] for key in adapters[0]}


VARIANTS: dict[str, Merge] = {
    "ours": ours,
    "straightforward": straightforward,
    "plain mean": plain_mean,
    "fedavg via merge_lora": fedavg_via_merge_lora,
}


@dataclass
class Timing:
    """Wall-clock seconds of every repeat of one variant."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so a timer stops when the merge has really finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(
    adapters: Sequence[Mapping[str, torch.Tensor]], device: torch.device, repeats: int
) -> dict[str, Timing]:
    """One warm-up run each, then ``repeats`` rounds, the variants' order rotating every round.

    Interleaving spreads the noise of a shared machine over all variants alike.
    """
    names = list(VARIANTS)
    timings = {name: Timing([]) for name in names}
    for name in names:
        VARIANTS[name](adapters, device)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            synchronize(device)
            started = time.perf_counter()
            result = VARIANTS[name](adapters, device)
            synchronize(device)
            timings[name].seconds.append(time.perf_counter() - started)
            del result
    return timings


@dataclass
class SweepRow:
    """One size of the sweep: medians of ours and of the plain mean, wall clock and CPU."""

    layers: int
    parameters: int
    ours_wall: float
    mean_wall: float
    ours_cpu: float
    mean_cpu: float
    masks_equal: int
    pruned_equal: int
    tensors: int

    @property
    def ratio_wall(self) -> float:
        return self.ours_wall / self.mean_wall

    @property
    def ratio_cpu(self) -> float:
        return self.ours_cpu / self.mean_cpu


SWEEP_TARGET = 4.0


def sweep_sizes(
    sizes: Sequence[int], clients: int, rank: int, seed: int, device: torch.device, repeats: int
) -> list[SweepRow]:
    """Ours against the plain mean at each number of layers, interleaved on the same inputs.

    Per size: fresh adapters, one warm-up run each, then ``repeats`` rounds in which the two
    run back to back in alternating order; wall-clock (``time.perf_counter``) and process CPU
    seconds (``time.process_time``, all threads; less disturbed by other jobs on a shared
    machine) are recorded per run. The masks and pruned tensors are compared with the
    straightforward reading's at every size.
    """
    rows = []
    for layers in sizes:
        adapters = build_adapters(layers, clients, rank, seed)
        if device.type == "cuda":
            adapters = [{key: value.to(device) for key, value in a.items()} for a in adapters]
        masks_equal, pruned_equal, tensors = compare_masks(adapters, device)
        walls: dict[str, list[float]] = {"ours": [], "plain mean": []}
        cpus: dict[str, list[float]] = {"ours": [], "plain mean": []}
        for name in walls:
            VARIANTS[name](adapters, device)
        for round_index in range(repeats):
            order = ["ours", "plain mean"] if round_index % 2 == 0 else ["plain mean", "ours"]
            for name in order:
                gc.collect()
                synchronize(device)
                wall_started, cpu_started = time.perf_counter(), time.process_time()
                result = VARIANTS[name](adapters, device)
                synchronize(device)
                walls[name].append(time.perf_counter() - wall_started)
                cpus[name].append(time.process_time() - cpu_started)
                del result
        rows.append(
            SweepRow(
                layers=layers,
                parameters=sum(value.numel() for value in adapters[0].values()),
                ours_wall=statistics.median(walls["ours"]),
                mean_wall=statistics.median(walls["plain mean"]),
                ours_cpu=statistics.median(cpus["ours"]),
                mean_cpu=statistics.median(cpus["plain mean"]),
                masks_equal=masks_equal,
                pruned_equal=pruned_equal,
                tensors=tensors,
            )
        )
        del adapters
        gc.collect()
    return rows


def print_sweep(rows: Sequence[SweepRow], clients: int, repeats: int) -> None:
    """The sweep as a table: seconds, the ratio to the plain mean, and the mask agreement."""
    print(
        f"size sweep: {clients} adapters, ours vs a plain stacked mean side by side, medians of "
        f"{repeats} interleaved rounds (target: ours / plain mean <= {SWEEP_TARGET:g}x)"
    )
    print()
    print(
        "| layers | parameters per adapter | ours s | plain mean s | ours / mean (wall) | "
        "ours CPU s | mean CPU s | ours / mean (CPU) | masks, pruned tensors identical |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row.layers} | {row.parameters / 1e6:.1f}M | {row.ours_wall:.3f} | "
            f"{row.mean_wall:.3f} | {row.ratio_wall:.2f}x | {row.ours_cpu:.3f} | "
            f"{row.mean_cpu:.3f} | {row.ratio_cpu:.2f}x | "
            f"{row.masks_equal}/{row.tensors}, {row.pruned_equal}/{row.tensors} |"
        )
    worst = max(row.ratio_wall for row in rows)
    verdict = "met" if worst <= SWEEP_TARGET else "NOT met"
    print()
    print(f"largest ratio (wall): {worst:.2f}x, target <= {SWEEP_TARGET:g}x: {verdict}")


def time_thresholds(
    adapters: Sequence[Mapping[str, torch.Tensor]], device: torch.device, repeats: int
) -> list[tuple[int, float, float, float]]:
    """The threshold alone per distinct tensor size: the merge's ``magnitude_threshold``,
    ``kth_smallest`` and ``torch.kthvalue``.

    For one tensor of each size: |x| of the T stacked tasks, k at keep ratio 0.2, the three
    functions interleaved ``10 * repeats`` times; returns (entries per task, median seconds of
    magnitude_threshold, of kth_smallest, of torch.kthvalue), after checking that they agree
    bit for bit.
    """
    by_size: dict[int, str] = {}
    for key, value in adapters[0].items():
        by_size.setdefault(value.numel(), key)
    rows = []
    for size, key in sorted(by_size.items()):
        stack = torch.stack([adapter[key] for adapter in adapters]).to(device, torch.float32)
        flat = stack.abs().reshape(len(adapters), -1)
        k = math.floor(size * (1.0 - KEEP_RATIO))
        reference = torch.kthvalue(flat, k, dim=1).values
        for select in (magnitude_threshold, kth_smallest):
            if not torch.equal(select(flat, k).view(torch.int32), reference.view(torch.int32)):
                raise AssertionError(f"{select.__name__} differs from torch.kthvalue on {key}")
        merge_s: list[float] = []
        ours_s: list[float] = []
        theirs_s: list[float] = []
        for _ in range(10 * repeats):
            selects = (
                (magnitude_threshold, merge_s),
                (kth_smallest, ours_s),
                (_kthvalue, theirs_s),
            )
            for select, into in selects:
                synchronize(device)
                started = time.perf_counter()
                select(flat, k)
                synchronize(device)
                into.append(time.perf_counter() - started)
        rows.append(
            (
                size,
                statistics.median(merge_s),
                statistics.median(ours_s),
                statistics.median(theirs_s),
            )
        )
    return rows


def _kthvalue(values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.kthvalue(values, k, dim=1).values


@dataclass
class Agreement:
    """How ours and the straightforward reading compare."""

    tensors: int
    masks_equal: int
    pruned_equal: int
    max_abs_diff: float
    max_rel_diff: float


def compare_masks(
    adapters: Sequence[Mapping[str, torch.Tensor]], device: torch.device
) -> tuple[int, int, int]:
    """Key by key, ours against ``straightforward_prune``: (masks equal, pruned tensors equal
    bit for bit, tensors). A's pruned stack comes from ``prune_with_row_mass``, as in the merge.
    """
    tensors = masks_equal = pruned_equal = 0
    for key in adapters[0]:
        stack = torch.stack([adapter[key] for adapter in adapters]).to(device, torch.float32)
        reference_pruned, reference_mask = straightforward_prune(stack)
        tensors += 1
        masks_equal += bool(torch.equal(magnitude_mask(stack, KEEP_RATIO), reference_mask))
        if ".lora_A." in key:
            pruned = prune_with_row_mass(stack, KEEP_RATIO)[0]
        else:
            pruned = prune_by_magnitude(stack, KEEP_RATIO)
        pruned_equal += bool(
            torch.equal(pruned.view(torch.int32), reference_pruned.view(torch.int32))
        )
    return masks_equal, pruned_equal, tensors


def compare_with_straightforward(
    adapters: Sequence[Mapping[str, torch.Tensor]], device: torch.device
) -> Agreement:
    """Masks and pruned tensors key by key (``torch.equal``), then the merged results."""
    masks_equal, pruned_equal, tensors = compare_masks(adapters, device)
    merged = ours(adapters, device)
    reference = straightforward(adapters, device)
    max_abs = max_rel = 0.0
    for key, value in reference.items():
        diff = float((merged[key] - value).abs().max())
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(float(value.abs().max()), 1e-30))
    return Agreement(tensors, masks_equal, pruned_equal, max_abs, max_rel)


def peak_memory(variant: str, args: argparse.Namespace) -> tuple[float, str]:
    """Peak extra memory (bytes) of one merge, measured in a fresh subprocess, and the method."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.merge_speed",
        "--memory-probe",
        variant,
        "--layers",
        str(args.layers),
        "--clients",
        str(args.clients),
        "--rank",
        str(args.rank),
        "--device",
        args.device,
        "--seed",
        str(args.seed),
        *(["--threads", str(args.threads)] if args.threads is not None else []),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    return float(report["bytes"]), str(report["method"])


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def memory_probe(args: argparse.Namespace) -> None:
    """Subprocess side of ``peak_memory``: build the adapters, merge once, print one JSON line."""
    device = torch.device(args.device)
    merge = VARIANTS[args.memory_probe]
    adapters = build_adapters(args.layers, args.clients, args.rank, args.seed)
    if device.type == "cuda":
        adapters = [{key: value.to(device) for key, value in a.items()} for a in adapters]
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        merge(adapters, device)
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - before
        method = "torch.cuda.max_memory_allocated"
    else:
        gc.collect()
        rss_before = _status_kib("VmRSS")
        if rss_before is not None and _reset_peak_rss():
            merge(adapters, device)
            extra = ((_status_kib("VmHWM") or 0) - rss_before) * 1024
            method = "peak RSS (VmHWM reset before the merge) minus RSS before"
        else:
            max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            merge(adapters, device)
            extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - max_before) * 1024
            method = "ru_maxrss delta (a lower bound)"
    print(json.dumps({"bytes": max(extra, 0), "method": method}))


# Functions whose cumulative time makes up our merge, as (label, file suffix, function name).
OUR_PARTS: tuple[tuple[str, str, str], ...] = (
    ("input validation (keys, shapes, dtypes)", "validation.py", "validate_adapters"),
    ("stacking the T adapters", "api.py", "stack_tensors"),
    (
        "finiteness screen of stacks (robustmerge: of merged pairs)",
        "validation.py",
        "check_stack_finite",
    ),
    ("pruning A (threshold + mask + row masses)", "pruning.py", "prune_with_row_mass"),
    ("pruning B (threshold + mask)", "pruning.py", "prune_by_magnitude"),
    ("  of which the thresholds of A and B", "pruning.py", "_threshold_bits"),
    ("complementary scale from the row masses", "pruning.py", "scale_from_row_mass"),
    ("A sum and B normalisation", "robustmerge.py", "_combine"),
)
REFERENCE_PARTS: tuple[tuple[str, str, str], ...] = (
    ("stacking (torch.stack)", "~", "<built-in method torch.stack>"),
    ("pruning A and B (kthvalue + mask)", "merge_speed.py", "straightforward_prune"),
    ("  of which torch.kthvalue", "~", "<built-in method torch.kthvalue>"),
)


def profile_parts(
    merge: Merge,
    adapters: Sequence[Mapping[str, torch.Tensor]],
    device: torch.device,
    parts: tuple[tuple[str, str, str], ...],
) -> list[tuple[str, float]]:
    """Cumulative seconds of chosen functions in one profiled merge (CPU: ops are synchronous)."""
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    merge(adapters, device)
    profiler.disable()
    total = time.perf_counter() - started
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = [("total (profiled run)", total)]
    for label, file_suffix, function in parts:
        seconds = sum(
            entry[3]
            for (filename, _, name), entry in stats.items()
            if filename.endswith(file_suffix) and name == function
        )
        rows.append((label, seconds))
    return rows


def cuda_kernel_table(
    adapters: Sequence[Mapping[str, torch.Tensor]], device: torch.device, limit: int = 10
) -> list[tuple[str, float]]:
    """The operators with the most device time in one of our merges (microseconds -> seconds)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        ours(adapters, device)
        synchronize(device)
    events = [(event.key, event.self_device_time_total / 1e6) for event in profiler.key_averages()]
    return sorted(events, key=lambda item: item[1], reverse=True)[:limit]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def card_bandwidth(name: str) -> float | None:
    """Peak memory bandwidth (GB/s) of a CUDA card by its name, None when not in the table."""
    for fragment, bandwidth in CARD_BANDWIDTH_GBPS:
        if fragment in name:
            return bandwidth
    return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.merge_speed",
        description="RobustMerge speed on LLaMA-7B-shaped LoRA: ours vs a straightforward "
        "reading of the spec vs a plain mean.",
    )
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (default 32)")
    parser.add_argument("--clients", type=int, default=8, help="adapters to merge, T (default 8)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (default 16)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random adapters")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the per-variant memory subprocesses"
    )
    parser.add_argument(
        "--peak-gbps", type=float, default=None, help="CUDA card's bandwidth if not in the table"
    )
    parser.add_argument(
        "--sizes",
        default="4,8,16,32",
        help="layer counts of the ours-vs-plain-mean sweep, comma-separated; '' skips it "
        "(default 4,8,16,32)",
    )
    parser.add_argument(
        "--sweep-repeats", type=int, default=9, help="interleaved rounds per sweep size (default 9)"
    )
    parser.add_argument("--sweep-only", action="store_true", help="print the size sweep and stop")
    parser.add_argument("--memory-probe", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layers < 1 or args.clients < 1 or args.rank < 1 or args.repeats < 1:
        parser.error("--layers, --clients, --rank and --repeats must be positive")
    try:
        args.sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
    except ValueError:
        parser.error(f"--sizes must be comma-separated layer counts, got {args.sizes!r}")
    if any(size < 1 for size in args.sizes) or args.sweep_repeats < 1:
        parser.error("--sizes and --sweep-repeats must be positive")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but CUDA is not available")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_probe is not None:
        memory_probe(args)
        return 0
    device = torch.device(args.device)
    print(f"# merge_speed  {datetime.date.today().isoformat()}")
    print(f"command: python -m benchmarks.merge_speed {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    )
    if hasattr(os, "getloadavg"):
        print(f"load average before the run (other users of the machine): {os.getloadavg()[0]:.2f}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    sweep_ok = True
    if args.sizes:
        print()
        rows = sweep_sizes(
            args.sizes, args.clients, args.rank, args.seed, device, args.sweep_repeats
        )
        print_sweep(rows, args.clients, args.sweep_repeats)
        sweep_ok = all(
            row.masks_equal == row.tensors and row.pruned_equal == row.tensors for row in rows
        )
        print()
    if not sweep_ok:
        print("ERROR: ours and the straightforward reading disagree in the sweep", file=sys.stderr)
        return 1
    if args.sweep_only:
        return 0
    adapters = build_adapters(args.layers, args.clients, args.rank, args.seed)
    parameters = sum(value.numel() for value in adapters[0].values())
    print(
        f"{args.clients} adapters x {parameters / 1e6:.1f}M parameters (fp32, {args.layers} "
        f"layers x 7 modules, rank {args.rank}, LLaMA-7B shapes); "
        f"{args.repeats} timed rounds, variants interleaved"
    )
    if device.type == "cuda":
        adapters = [{key: value.to(device) for key, value in a.items()} for a in adapters]
        print("adapters live on the GPU before timing; results come back to the CPU")

    agreement = compare_with_straightforward(adapters, device)
    timings = time_variants(adapters, device, args.repeats)
    thresholds = time_thresholds(adapters, device, args.repeats)
    memory: dict[str, tuple[float, str]] = {}
    if not args.no_memory:
        memory = {name: peak_memory(name, args) for name in VARIANTS}

    ours_s = timings["ours"].median
    reference_s = timings["straightforward"].median
    mean_s = timings["plain mean"].median
    print()
    print("| variant | median s | min s | max s | vs ours | peak extra memory |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, timing in timings.items():
        relative = timing.median / ours_s
        memory_text = f"{memory[name][0] / 2**20:,.0f} MiB" if name in memory else "-"
        print(
            f"| {name} | {timing.median:.3f} | {min(timing.seconds):.3f} | "
            f"{max(timing.seconds):.3f} | {relative:.2f}x | {memory_text} |"
        )
    print()
    print(
        f"ours vs straightforward: {reference_s / ours_s:.2f}x faster (target >= 3x); "
        f"ours / plain mean: {ours_s / mean_s:.2f}x the cost (target <= 8x)"
    )
    if agreement.max_abs_diff == 0.0:
        merged_text = "merged tensors identical (max abs diff 0)"
    else:
        merged_text = (
            f"merged tensors max abs diff {agreement.max_abs_diff:.3g} (relative to the "
            f"tensor's largest entry {agreement.max_rel_diff:.3g}: the sums run in another order)"
        )
    print(
        f"agreement: pruning masks identical for {agreement.masks_equal}/{agreement.tensors} "
        f"tensors, pruned tensors bit-identical for {agreement.pruned_equal}/{agreement.tensors}; "
        f"{merged_text}"
    )
    if memory:
        print(f"memory: {next(iter(memory.values()))[1]}; fresh subprocess per variant")
    print()
    print("the threshold alone (|x| of the T stacked tasks, k at keep ratio 0.2, bit-identical):")
    print()
    print(
        "| entries per task | magnitude_threshold ms (the merge's) | kth_smallest ms | "
        "torch.kthvalue ms | speed-up of the merge's |"
    )
    print("| ---: | ---: | ---: | ---: | ---: |")
    for size, merge_threshold, ours_threshold, reference_threshold in thresholds:
        print(
            f"| {size:,} | {merge_threshold * 1e3:.3f} | {ours_threshold * 1e3:.3f} | "
            f"{reference_threshold * 1e3:.3f} | {reference_threshold / merge_threshold:.1f}x |"
        )
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bandwidth = args.peak_gbps or card_bandwidth(name)
        moved = (args.clients + 1) * parameters * 4
        for variant in ("ours", "straightforward", "plain mean"):
            achieved = moved / timings[variant].median / 1e9
            share = f", {achieved / bandwidth:.1%} of {bandwidth:,.0f} GB/s" if bandwidth else ""
            print(f"achieved bandwidth, {variant}: {achieved:,.0f} GB/s{share} ({name})")
        print()
        print("where our time goes on the GPU (operators by device time, one merge):")
        for key, seconds in cuda_kernel_table(adapters, device):
            print(f"  {seconds:8.4f} s  {key}")
    else:
        print()
        print("where the time goes (cProfile, one merge each; parts overlap where indented):")
        for label, seconds in profile_parts(ours, adapters, device, OUR_PARTS):
            print(f"  ours  {seconds:7.3f} s  {label}")
        for label, seconds in profile_parts(straightforward, adapters, device, REFERENCE_PARTS):
            print(f"  straightforward  {seconds:7.3f} s  {label}")
    if agreement.masks_equal != agreement.tensors or agreement.pruned_equal != agreement.tensors:
        print("ERROR: ours and the straightforward reading disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
