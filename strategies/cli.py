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

This module is the entry point (``robustmerge-fl`` and ``python -m strategies.cli``); the work
is in its neighbours, one job each:

- ``cli_parser``: the argument parser, its subcommands and flags;
- ``cli_values``: flag values from text (finite numbers, weight lists, device names);
- ``cli_commands``: the ``merge`` and ``audit verify`` subcommands;
- ``cli_merge_checks``: the checks made before any adapter file is read;
- ``cli_merge_report``: ``merge_report.json``;
- ``cli_merge_messages``: progress lines, the shared-A warning, the method's name;
- ``cli_errors``: program name, exit statuses and the one-line error.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from strategies.adapter_io.errors import AdapterFileError
from strategies.cli_commands import run_audit_verify, run_merge
from strategies.cli_errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CliError,
    print_error,
)
from strategies.cli_merge_report import REPORT_FILE
from strategies.cli_parser import build_parser
from strategies.merging import MergeInputError

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "PROG",
    "REPORT_FILE",
    "CliError",
    "build_parser",
    "main",
    "run_audit_verify",
    "run_merge",
]


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
        return print_error(str(error), EXIT_USAGE)
    except SystemExit as done:  # --help and --version end here
        return done.code if isinstance(done.code, int) else EXIT_OK
    try:
        return int(args.run(args))
    except CliError as error:
        return print_error(str(error), EXIT_USAGE)
    except (MergeInputError, AdapterFileError, ValueError) as error:
        return print_error(str(error), EXIT_USAGE)
    except OSError as error:
        where = f" {error.filename!r}" if error.filename else ""
        return print_error(f"{error.strerror or error}{where}", EXIT_FAILURE)
    except KeyboardInterrupt:
        return print_error("interrupted; no output was written", 130)


if __name__ == "__main__":
    raise SystemExit(main())
