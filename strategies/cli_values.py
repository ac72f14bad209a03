"""Value types for the ``robustmerge-fl`` flags: text on the command line -> checked values.

Each function is an argparse ``type=``: it returns the value or raises
``argparse.ArgumentTypeError``, which the parser turns into one error line naming the flag.
Checking here (finite numbers, non-negative weights, known devices) refuses bad flags before
any adapter file is read.
"""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """A finite number (NaN and infinities are refused: no hyperparameter accepts them)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def float_list(text: str) -> list[float]:
    """Comma-separated finite numbers, e.g. ``100,250,80``."""
    parts = text.split(",")
    try:
        return [finite_float(part.strip()) for part in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated finite numbers such as 100,250,80; got {text!r}"
        ) from None


def fuse_weight(text: str) -> float | tuple[float, ...]:
    """``--fuse-weight``: one shared lambda (``2``), or a tuple of one per adapter (``1,2,2``).

    A single value with a comma (``2,``) is still a tuple, so its count is checked against the
    adapters.
    """
    values = float_list(text)
    return values[0] if len(values) == 1 and "," not in text else tuple(values)


def weight_list(text: str) -> list[float]:
    """``--weights``: per-adapter weights, each >= 0 (their sum is checked later)."""
    values = float_list(text)
    for position, value in enumerate(values, start=1):
        if value < 0:
            raise argparse.ArgumentTypeError(f"entry {position} is {value:g}; weights must be >= 0")
    return values


def device_name(text: str) -> str:
    """``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (availability is checked later)."""
    if text in ("auto", "cpu", "cuda") or (
        text.startswith("cuda:") and text[len("cuda:") :].isdigit()
    ):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
