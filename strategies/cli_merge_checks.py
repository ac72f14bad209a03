"""Checks ``robustmerge-fl merge`` makes before reading any adapter file, and the wording of
merge engine errors.

Flags, counts and the output folder are all checked first, so that a mistake on the command
line is reported in terms of the flag at fault (``--keep-ratio``, not ``keep_ratio``) and
before minutes are spent reading and merging.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from strategies.adapter_io.writing import check_target
from strategies.cli_errors import CliError
from strategies.merging import MergeInputError, accepted_hyperparameters, create_method

HYPERPARAMETER_FLAGS: dict[str, str] = {
    "keep_ratio": "--keep-ratio",
    "scale_quantile": "--scale-quantile",
    "fuse_weight": "--fuse-weight",
    "mode": "--mode",
}
"""Method hyperparameter -> the flag that sets it."""


def given_hyperparameters(args: argparse.Namespace, method: str) -> dict[str, Any]:
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


def check_hyperparameter_values(method: str, hyperparameters: Mapping[str, Any]) -> None:
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


def check_counts(weights: list[float] | None, fuse_weight: object, labels: Sequence[str]) -> None:
    """Refuse ``--weights`` / per-adapter ``--fuse-weight`` lists whose length is not the number
    of adapter folders, and weights that sum to zero (nothing would be merged)."""
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


def check_out(out: Path, inputs: Sequence[Path], *, overwrite: bool) -> None:
    """Refuse an ``--out`` that exists (without ``--overwrite``), is an input, or cannot be
    created, so that a merge is never run only to fail at the write."""
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


def folder_labels(arguments: Sequence[str], paths: Sequence[Path]) -> list[str]:
    """Folder names, or the paths as given when two folders share a name."""
    names = [path.resolve().name or str(path) for path in paths]
    return names if len(set(names)) == len(names) else list(arguments)


def merge_error_message(error: MergeInputError, labels: Sequence[str]) -> str:
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
