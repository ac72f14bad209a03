"""The ``robustmerge-fl`` subcommands, ``merge`` and ``audit verify``: what each does once its
arguments are parsed.

Each takes the parsed ``argparse.Namespace`` and returns an exit status; bad input is raised
as :class:`~strategies.cli_errors.CliError` (or an adapter/merge error) for ``main`` to print.
``merge`` checks everything and merges in memory before it writes, and writes atomically, so
bad input leaves no output folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from strategies.adapter_io.compat import check_compatible
from strategies.adapter_io.lora_content import check_lora_content
from strategies.adapter_io.reading import read_adapter_dir
from strategies.adapter_io.writing import write_adapter_dir
from strategies.audit import AuditError, verify_run
from strategies.cli_errors import EXIT_OK, CliError
from strategies.cli_merge_checks import (
    check_counts,
    check_hyperparameter_values,
    check_out,
    folder_labels,
    given_hyperparameters,
    merge_error_message,
)
from strategies.cli_merge_messages import MergeProgress, method_label, warn_shared_initialisation
from strategies.cli_merge_report import REPORT_FILE, merge_report
from strategies.merging import (
    MergeInputError,
    create_method,
    merge_lora_with_report,
    resolve_device,
)

PROGRESS_ABOVE_PARAMETERS = 1_000_000
"""Merges with more parameters (summed over the inputs) print progress lines on stderr."""


def run_audit_verify(args: argparse.Namespace) -> int:
    """The ``audit verify`` subcommand: the summary on stdout, or the first fault as an error."""
    try:
        summary = verify_run(args.run_dir)
    except AuditError as error:
        raise CliError(f"audit log does not verify: {error}") from None
    for line in summary.lines():
        print(line)
    return EXIT_OK


def run_merge(args: argparse.Namespace) -> int:
    """The ``merge`` subcommand: check everything, merge in memory, then write atomically."""
    method: str = args.method
    hyperparameters = given_hyperparameters(args, method)
    check_hyperparameter_values(method, hyperparameters)  # now, before any file is read
    device = resolve_device(None if args.device == "auto" else args.device)
    paths = [Path(item) for item in args.adapters]
    labels = folder_labels(args.adapters, paths)
    weights: list[float] | None = args.weights
    check_counts(weights, hyperparameters.get("fuse_weight"), labels)
    out = Path(args.out)
    check_out(out, paths, overwrite=args.overwrite)

    # Each folder on its own first (LoRA pairs of its rank on its targets), so a bad one is named
    # itself rather than blamed on the folder it is then compared with.
    folders = [check_lora_content(read_adapter_dir(path)) for path in paths]
    check_compatible(folders)
    tensors = [folder.tensors for folder in folders]
    parameters = sum(tensor.numel() for adapter in tensors for tensor in adapter.values())
    progress = MergeProgress(sys.stderr) if parameters > PROGRESS_ABOVE_PARAMETERS else None
    merger = create_method(method, **hyperparameters)
    try:
        result = merge_lora_with_report(
            tensors, merger, weights, device, labels=labels, progress=progress
        )
    except MergeInputError as error:
        raise CliError(merge_error_message(error, labels)) from None
    for key, tensor in result.tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise CliError(
                f"key {key!r}: the merged tensor has non-finite values (float32 overflow: the "
                "inputs' values are too large to merge)"
            )

    warn_shared_initialisation(tensors, merger)
    report = merge_report(folders, labels, method, hyperparameters, weights, result.report)
    write_adapter_dir(
        out,
        result.tensors,
        folders[0].config,
        extra_files={REPORT_FILE: json.dumps(report, indent=2, allow_nan=False) + "\n"},
        overwrite=args.overwrite,
    )
    merged_parameters = sum(tensor.numel() for tensor in result.tensors.values())
    print(
        f"merged {len(folders)} adapter(s) with {method_label(result.report.method)} into "
        f"{out} ({len(result.tensors)} tensors, {merged_parameters:,} parameters, "
        f"{result.report.seconds:.2f} s on {result.report.device})"
    )
    return EXIT_OK
