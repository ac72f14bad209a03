"""How the ``robustmerge-fl`` command line names itself and ends: program name, exit statuses,
and the one-line error.

Every failure the user can cause is a :class:`CliError` raised anywhere below ``main`` and
printed once by :func:`print_error`, so bad input always ends with exactly one
``robustmerge-fl: error: ...`` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import sys

PROG = "robustmerge-fl"
"""The program name, first word of every line the command line prints on stderr."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A problem with the command line or its inputs, reported as one line with exit status 2."""


def print_error(message: str, status: int) -> int:
    """Print ``message`` as one ``robustmerge-fl: error:`` line on stderr; return ``status``.

    Whitespace (newlines included) is collapsed so that a multi-line message from a library
    still gives exactly one line.
    """
    line = " ".join(message.split())
    print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)
    return status
