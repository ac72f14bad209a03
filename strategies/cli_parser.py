"""The ``robustmerge-fl`` argument parser: subcommands ``merge`` and ``audit verify``, their
flags and help text.

Parse errors raise :class:`~strategies.cli_errors.CliError` rather than printing usage and
exiting, so that they end like every other bad input: one error line and exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

from strategies.audit import AUDIT_FILE, package_version
from strategies.cli_commands import run_audit_verify, run_merge
from strategies.cli_errors import PROG, CliError
from strategies.cli_merge_report import REPORT_FILE
from strategies.cli_values import device_name, finite_float, fuse_weight, weight_list
from strategies.merging import available_methods


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become CliError (one line) instead of usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise CliError(message)


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
        type=finite_float,
        help="fraction of each tensor's entries kept by pruning, in (0, 1] (robustmerge: 0.2)",
    )
    merge.add_argument(
        "--scale-quantile",
        type=finite_float,
        help="fraction of rank directions keeping their own scale, in [0, 1) (robustmerge: 0.2)",
    )
    merge.add_argument(
        "--fuse-weight",
        type=fuse_weight,
        metavar="W|W1,W2,...",
        help="task weight lambda, shared or one per adapter (robustmerge: 2.0)",
    )
    merge.add_argument(
        "--weights",
        type=weight_list,
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
        type=device_name,
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
