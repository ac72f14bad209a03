"""The ``robustmerge-fl`` command line: merge PEFT LoRA adapter folders into one.

::

    robustmerge-fl merge clients/a clients/b clients/c --out merged \\
        [--method robustmerge] [--keep-ratio 0.2] [--scale-quantile 0.2] \\
        [--fuse-weight 2.0 | --fuse-weight 1,2,2] [--weights 100,250,80] \\
        [--mode paper-exact|paper-equation] [--device auto|cpu|cuda] [--overwrite]

The output is an ordinary PEFT adapter folder (``PeftModel.from_pretrained`` loads it; its
``adapter_config.json`` is the first input's) plus ``merge_report.json``: the inputs with the
sha256 of each weights file, method, hyperparameters, weights, device, time, truncation error
and the robustmerge-fl version, so a merged adapter can be traced back to what made it.

Bad input of any kind ends with exactly one line on stderr, ``robustmerge-fl: error: ...``,
naming the folder and key at fault, exit status 2, and no output folder: everything is checked
and merged in memory before the output is written, and it is written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import torch

from strategies.adapter_io.compat import check_compatible
from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.layout import AdapterFolder
from strategies.adapter_io.lora_content import check_lora_content
from strategies.adapter_io.reading import read_adapter_dir
from strategies.adapter_io.writing import check_target, write_adapter_dir
from strategies.audit import AUDIT_FILE, AuditError, package_version, verify_run
from strategies.merging import (
    MergeInputError,
    MergeReport,
    accepted_hyperparameters,
    available_methods,
    create_method,
    merge_lora_with_report,
    resolve_device,
)
from strategies.merging.diagnostics import shared_a_similarity

PROG = "robustmerge-fl"
REPORT_FILE = "merge_report.json"
PROGRESS_ABOVE_PARAMETERS = 1_000_000
"""Merges with more parameters (summed over the inputs) print progress lines on stderr."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

HYPERPARAMETER_FLAGS: dict[str, str] = {
    "keep_ratio": "--keep-ratio",
    "scale_quantile": "--scale-quantile",
    "fuse_weight": "--fuse-weight",
    "mode": "--mode",
}
"""Method hyperparameter -> the flag that sets it."""


class CliError(Exception):
    """A problem with the command line or its inputs, reported as one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become CliError (one line) instead of usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise CliError(message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 success, 2 bad input, 1 other failure).

    Parameters
    ----------
    argv : Sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when None.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except CliError as error:
        return _fail(str(error), EXIT_USAGE)
    except SystemExit as done:  # --help and --version end here
        return done.code if isinstance(done.code, int) else EXIT_OK
    try:
        return int(args.run(args))
    except CliError as error:
        return _fail(str(error), EXIT_USAGE)
    except (MergeInputError, AdapterFileError, ValueError) as error:
        return _fail(str(error), EXIT_USAGE)
    except OSError as error:
        where = f" {error.filename!r}" if error.filename else ""
        return _fail(f"{error.strerror or error}{where}", EXIT_FAILURE)
    except KeyboardInterrupt:
        return _fail("interrupted; no output was written", 130)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: subcommands ``merge`` and ``audit verify``."""
    parser = _Parser(
        prog=PROG,
        description="Merge PEFT LoRA adapters (RobustMerge and baselines).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    merge = commands.add_parser(
        "merge",
        help="merge adapter folders into one PEFT adapter folder",
        description=(
            "Merge PEFT LoRA adapter folders (same base model, rank, alpha, target modules) "
            "into one adapter folder that PeftModel.from_pretrained loads, plus "
            f"{REPORT_FILE}. Hyperparameters not given keep the method's defaults."
        ),
    )
    merge.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="PEFT adapter folders")
    merge.add_argument("--out", required=True, metavar="DIR", help="folder to create")
    merge.add_argument(
        "--method",
        default="robustmerge",
        help=f"merge method, one of: {', '.join(available_methods())} (default: robustmerge)",
    )
    merge.add_argument(
        "--keep-ratio",
        type=_finite_float,
        help="fraction of each tensor's entries kept by pruning, in (0, 1] (robustmerge: 0.2)",
    )
    merge.add_argument(
        "--scale-quantile",
        type=_finite_float,
        help="fraction of rank directions keeping their own scale, in [0, 1) (robustmerge: 0.2)",
    )
    merge.add_argument(
        "--fuse-weight",
        type=_fuse_weight,
        metavar="W|W1,W2,...",
        help="task weight lambda, shared or one per adapter (robustmerge: 2.0)",
    )
    merge.add_argument(
        "--weights",
        type=_weight_list,
        metavar="W1,W2,...",
        help="per-adapter weights, e.g. example counts (default: equal)",
    )
    merge.add_argument(
        "--mode",
        help="robustmerge formula: paper-exact (released code, default) or paper-equation",
    )
    merge.add_argument(
        "--device",
        default="auto",
        type=_device_name,
        help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)",
    )
    merge.add_argument(
        "--overwrite", action="store_true", help="replace --out if it is an adapter folder"
    )
    merge.set_defaults(run=run_merge)
    audit = commands.add_parser(
        "audit",
        help="check a run folder's audit log",
        description=f"Check a federated run's tamper-evident audit log ({AUDIT_FILE}).",
    )
    audit_commands = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = audit_commands.add_parser(
        "verify",
        help="verify the hash chain and that it agrees with the checkpoints",
        description=(
            f"Verify RUN_DIR/{AUDIT_FILE}: every record's hash and its link to the one before, "
            "the rounds and global adapter digests in order, and each kept checkpoint and "
            "final/ against the log. Exit 0 with a summary, or 2 naming the first bad record."
        ),
    )
    verify.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run's output folder")
    verify.set_defaults(run=run_audit_verify)
    return parser


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
    hyperparameters = _given_hyperparameters(args, method)
    _check_hyperparameter_values(method, hyperparameters)  # now, before any file is read
    device = resolve_device(None if args.device == "auto" else args.device)
    paths = [Path(item) for item in args.adapters]
    labels = _labels(args.adapters, paths)
    weights: list[float] | None = args.weights
    _check_counts(weights, hyperparameters.get("fuse_weight"), labels)
    out = Path(args.out)
    _check_out(out, paths, overwrite=args.overwrite)

    # Each folder on its own first (LoRA pairs of its rank on its targets), so a bad one is named
    # itself rather than blamed on the folder it is then compared with.
    folders = [check_lora_content(read_adapter_dir(path)) for path in paths]
    check_compatible(folders)
    tensors = [folder.tensors for folder in folders]
    parameters = sum(tensor.numel() for adapter in tensors for tensor in adapter.values())
    progress = _Progress(sys.stderr) if parameters > PROGRESS_ABOVE_PARAMETERS else None
    try:
        result = merge_lora_with_report(
            tensors,
            method,
            weights,
            device,
            labels=labels,
            progress=progress,
            **hyperparameters,
        )
    except MergeInputError as error:
        raise CliError(_merge_error_message(error, labels)) from None
    for key, tensor in result.tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise CliError(
                f"key {key!r}: the merged tensor has non-finite values (float32 overflow: the "
                "inputs' values are too large to merge)"
            )

    _warn_shared_initialisation(tensors, result.report.method)
    report = _report(folders, labels, method, hyperparameters, weights, result.report)
    write_adapter_dir(
        out,
        result.tensors,
        folders[0].config,
        extra_files={REPORT_FILE: json.dumps(report, indent=2, allow_nan=False) + "\n"},
        overwrite=args.overwrite,
    )
    merged_parameters = sum(tensor.numel() for tensor in result.tensors.values())
    print(
        f"merged {len(folders)} adapter(s) with {_method_label(result.report.method)} into "
        f"{out} ({len(result.tensors)} tensors, {merged_parameters:,} parameters, "
        f"{result.report.seconds:.2f} s on {result.report.device})"
    )
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# Argument checks


SHARED_A_SIMILARITY = 0.9


def _warn_shared_initialisation(
    adapters: Sequence[Mapping[str, torch.Tensor]], described: Mapping[str, object]
) -> None:
    """A stderr warning when summing lambda * A over adapters with one initial A will blow up."""
    summing = described.get("method") in ("task_arithmetic", "dare") or (
        described.get("method") == "robustmerge" and described.get("mode") == "paper-exact"
    )
    fuse = described.get("fuse_weight", 1.0)
    weight = max(fuse) if isinstance(fuse, tuple) else fuse
    if not summing or not isinstance(weight, float):
        return
    similarity = shared_a_similarity(adapters)
    if similarity is None or similarity < SHARED_A_SIMILARITY:
        return
    print(
        f"{PROG}: warning: the adapters' A factors are nearly the same (cosine {similarity:.2f}; "
        f"they share an initialisation, as federated clients' do), so the merged A is about "
        f"{weight * len(adapters):.3g} times one adapter's; on such adapters lambda = 2 fell "
        "below zero-shot in our benchmark: consider --fuse-weight 1 or --mode paper-equation "
        "(README: Quality)",
        file=sys.stderr,
        flush=True,
    )


def _given_hyperparameters(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The hyperparameters the user set, refusing ones the method does not take."""
    accepted = accepted_hyperparameters(method)  # ValueError listing known methods if unknown
    given = {
        name: getattr(args, name)
        for name in HYPERPARAMETER_FLAGS
        if getattr(args, name) is not None
    }
    for name in given:
        if name not in accepted:
            takes = [HYPERPARAMETER_FLAGS.get(item, item) for item in accepted]
            raise CliError(
                f"{HYPERPARAMETER_FLAGS[name]} does not apply to method {method!r} "
                f"(it takes {', '.join(takes) if takes else 'no hyperparameters'})"
            )
    return given


def _check_hyperparameter_values(method: str, hyperparameters: Mapping[str, Any]) -> None:
    """Build the method once to refuse out-of-range values, naming the flag, not the parameter
    (``--keep-ratio must be in (0, 1], got 1.5``)."""
    try:
        create_method(method, **hyperparameters)
    except ValueError as error:
        message = str(error)
        for name, flag in HYPERPARAMETER_FLAGS.items():
            if message.startswith(f"{name} "):
                message = flag + message[len(name) :]
                break
        raise CliError(message) from None


def _check_counts(weights: list[float] | None, fuse_weight: object, labels: Sequence[str]) -> None:
    count = len(labels)
    if weights is not None:
        if len(weights) != count:
            raise CliError(
                f"--weights has {len(weights)} entries but {count} adapter folders were given"
            )
        if sum(weights) <= 0:
            raise CliError("--weights sum to zero: at least one adapter needs a positive weight")
    if isinstance(fuse_weight, tuple) and len(fuse_weight) != count:
        raise CliError(
            f"--fuse-weight has {len(fuse_weight)} entries but {count} adapter folders were given"
        )


def _check_out(out: Path, inputs: Sequence[Path], *, overwrite: bool) -> None:
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CliError(f"--out '{out}' already exists (pass --overwrite to replace it)")
    resolved = out.resolve()
    for path in inputs:
        if path.resolve() == resolved:
            raise CliError(f"--out '{out}' is also an input folder; choose another --out")
    check_target(out, overwrite=overwrite)
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CliError(f"--out '{out}' cannot be created: '{parent}' is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"--out '{out}' cannot be created: '{parent}' is not writable")


def _labels(arguments: Sequence[str], paths: Sequence[Path]) -> list[str]:
    """Folder names, or the paths as given when two folders share a name."""
    names = [path.resolve().name or str(path) for path in paths]
    return names if len(set(names)) == len(names) else list(arguments)


def _merge_error_message(error: MergeInputError, labels: Sequence[str]) -> str:
    """Name the folder (not the index) in a merge engine error."""
    adapter = error.adapter
    if isinstance(adapter, int) and 0 <= adapter < len(labels):
        adapter = labels[adapter]
    where = []
    if adapter is not None:
        where.append(f"adapter folder '{adapter}'")
    if error.key is not None:
        where.append(f"key {error.key!r}")
    return f"{', '.join(where)}: {error.reason}" if where else error.reason


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _float_list(text: str) -> list[float]:
    parts = text.split(",")
    try:
        return [_finite_float(part.strip()) for part in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated finite numbers such as 100,250,80; got {text!r}"
        ) from None


def _fuse_weight(text: str) -> float | tuple[float, ...]:
    values = _float_list(text)
    return values[0] if len(values) == 1 and "," not in text else tuple(values)


def _weight_list(text: str) -> list[float]:
    values = _float_list(text)
    for position, value in enumerate(values, start=1):
        if value < 0:
            raise argparse.ArgumentTypeError(f"entry {position} is {value:g}; weights must be >= 0")
    return values


def _device_name(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or (
        text.startswith("cuda:") and text[len("cuda:") :].isdigit()
    ):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


# --------------------------------------------------------------------------------------------
# Report and progress


def _report(
    folders: Sequence[AdapterFolder],
    labels: Sequence[str],
    method: str,
    given: dict[str, Any],
    weights: Sequence[float] | None,
    merge: MergeReport,
) -> dict[str, Any]:
    """What went into the merge and what came out, for ``merge_report.json``."""
    described = {key: _plain(value) for key, value in merge.method.items() if key != "method"}
    return {
        "robustmerge_fl_version": package_version(),
        "created_unix": time.time(),
        "method": method,
        "hyperparameters": described,
        "hyperparameters_given": {key: _plain(value) for key, value in given.items()},
        "weights": list(weights) if weights is not None else None,
        "device": merge.device,
        "seconds": merge.seconds,
        "relative_error": merge.relative_error,
        "relative_errors": dict(merge.relative_errors),
        "inputs": [
            {
                "label": label,
                "folder": str(folder.path),
                "weights_file": folder.weights_file.name if folder.weights_file else None,
                "sha256": _sha256(folder.weights_file) if folder.weights_file else None,
                "base_model_name_or_path": folder.config.get("base_model_name_or_path"),
            }
            for label, folder in zip(labels, folders, strict=True)
        ],
    }


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _method_label(described: dict[str, object]) -> str:
    name = str(described.get("method", "?"))
    mode = described.get("mode")
    return f"{name} ({mode})" if mode else name


class _Progress:
    """Prints ``robustmerge-fl: merged i/n modules`` about every 10% of a large merge."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last_decile = -1

    def __call__(self, done: int, total: int) -> None:
        decile = 10 * done // max(total, 1)
        if decile > self.last_decile:
            self.last_decile = decile
            print(f"{PROG}: merged {done}/{total} modules", file=self.stream, flush=True)


def _fail(message: str, status: int) -> int:
    line = " ".join(message.split())
    print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
