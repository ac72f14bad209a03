"""A site's own tensors kept across rounds and restarts (issue 27, item 2: the coming "shared-a").

A site that keeps part of its adapter (its own LoRA B, and optimiser state if used) saves it
here after a round and loads it before the next: in a folder the caller names (a site-local
folder in deployment), in one safetensors file (never pickle), written atomically:

    1. the tensors are serialised in memory (contiguous CPU tensors, metadata {"format": "pt"},
       as PEFT writes adapters);
    2. they are written to a temporary file in the same folder and flushed to disk (fsync);
    3. ``os.replace`` puts it in place of the old file in one step.

A crash or a failed write at any point leaves the old file as it was (and no temporary file).

Loading never raises into the round: a missing file is a fresh start (``None``); a file that
cannot be used (unreadable, truncated, not safetensors, non-finite values, or keys and shapes
other than the ``expected`` ones the caller passes) logs a warning naming the file and what was
wrong, and is a fresh start too (``None``). The caller then starts from the global's tensors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.common import log
from safetensors.torch import load, save

from workload.atomic_files import write_bytes_atomic

# The file in the caller's folder that holds the site's tensors.
SITE_STATE_FILE = "site-state.safetensors"


def site_state_path(folder: str | os.PathLike[str], name: str = SITE_STATE_FILE) -> Path:
    """Where the site's tensors live: ``folder / name``."""
    return Path(folder) / name


def _check_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse what could not be loaded back: a non-tensor, or a float tensor with NaN or inf."""
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"site state key {key!r}: expected a torch.Tensor, got {type(tensor).__name__}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"site state key {key!r}: holds NaN or infinite values; it would be refused on "
                "load, so it is not saved (the previous state is kept)"
            )


def save_site_state(
    folder: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    name: str = SITE_STATE_FILE,
) -> Path:
    """Write ``tensors`` to ``folder / name`` atomically (see the module docstring); returns the
    path. The folder is created when missing.

    A non-tensor value or a float tensor with NaN or inf raises (TypeError, ValueError) before
    anything is written; an OSError while writing propagates. Either way the old file, if any,
    is left intact and no temporary file remains.
    """
    _check_tensors(tensors)
    path = site_state_path(folder, name)
    payload = save(
        {key: tensor.detach().to("cpu").contiguous() for key, tensor in tensors.items()},
        metadata={"format": "pt"},
    )
    write_bytes_atomic(path, payload)
    return path


def _problem(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]] | None
) -> str | None:
    """Why ``tensors`` cannot be the site's state (``None``: they can)."""
    if expected is not None:
        missing = [key for key in expected if key not in tensors]
        if missing:
            return (
                f"it lacks {len(missing)} of the {len(expected)} expected tensors, first "
                f"{missing[0]!r}"
            )
        unexpected = [key for key in tensors if key not in expected]
        if unexpected:
            return (
                f"it holds {len(unexpected)} tensor(s) not expected, first {unexpected[0]!r} "
                f"(expected keys like {next(iter(expected), '(none)')!r})"
            )
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != tuple(shape):
                return (
                    f"key {key!r} has shape {tuple(tensors[key].shape)}, expected "
                    f"{tuple(shape)} (did lora-r or the model change?)"
                )
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"key {key!r} holds NaN or infinite values"
    return None


def load_site_state(
    folder: str | os.PathLike[str],
    expected: Mapping[str, tuple[int, ...]] | None = None,
    name: str = SITE_STATE_FILE,
) -> dict[str, torch.Tensor] | None:
    """The site's tensors saved in ``folder / name``, or ``None`` for a fresh start.

    ``expected`` (key -> shape) is what the caller can use; with it, a file with other keys or
    shapes is refused, and the keys come in its order (without it, sorted). ``None`` when the
    file is missing (logged at INFO) or cannot be used (logged as a WARNING that names the file
    and why); never raises. A successful load is logged at INFO too (the file, how many
    tensors, the folder): a restarted site's log shows it went on with its own state.
    """
    path = site_state_path(folder, name)
    if not path.exists():
        log(INFO, "site state %s: no saved state, starting fresh", path)
        return None
    try:
        tensors = load(path.read_bytes())
    except Exception as error:  # unreadable, truncated or not safetensors: a fresh start
        log(
            WARNING,
            "site state %s: cannot be read as safetensors (%s: %s); starting fresh from the "
            "global's tensors (delete or restore the file to silence this)",
            path,
            type(error).__name__,
            error,
        )
        return None
    problem = _problem(tensors, expected)
    if problem is not None:
        log(
            WARNING,
            "site state %s: %s; starting fresh from the global's tensors (delete or restore "
            "the file to silence this)",
            path,
            problem,
        )
        return None
    # safetensors gives the keys in no fixed order: the caller's order, else sorted.
    order = list(expected) if expected is not None else sorted(tensors)
    # One line an operator (and the deployment test) can read: a restarted site went on with
    # the state it saved, not from the global's.
    log(
        INFO,
        "site state %s: loaded %d saved tensors from folder %s; going on with this site's own",
        path,
        len(order),
        path.parent,
    )
    return {key: tensors[key] for key in order}
