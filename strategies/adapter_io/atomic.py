"""Replacing a folder all or nothing: fill a hidden staging folder, fsync it, rename it in.

The staging folder sits beside the target (same parent, so the rename stays on one file
system). A crash therefore leaves either the old folder or the new one, never a partial one; at
worst a hidden ``.<name>.tmp-*`` folder beside it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from strategies.adapter_io.errors import AdapterFileError


def replace_folder(target: Path, fill: Callable[[Path], None], *, overwrite: bool) -> None:
    """Create ``target`` with the files ``fill`` writes into the staging folder it is given.

    ``fill`` must write each file durably (``write_file``, or ``fsync_file`` after writing).
    With ``overwrite``, an existing ``target`` is renamed away, the new one renamed in, then the
    old one deleted; if moving the new one in fails, the old one is put back. Deciding whether an
    existing ``target`` may be replaced is the caller's job.

    Raises
    ------
    AdapterFileError
        If ``target`` exists (appeared meanwhile) and ``overwrite`` is False.
    OSError
        If the file system fails; the staging folder is removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(staging)
        fsync_dir(staging)
        _swap_into_place(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(target.parent)


def _swap_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename ``staging`` to ``target``; with ``overwrite``, move the old folder away first."""
    if not (overwrite and (target.exists() or target.is_symlink())):
        if target.exists() or target.is_symlink():
            raise AdapterFileError(target, None, "already exists (pass overwrite=True)")
        os.rename(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    if old.is_symlink() or not old.is_dir():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def write_file(file: Path, data: bytes) -> None:
    """Write ``data`` to ``file`` and fsync it."""
    with file.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_file(file: Path) -> None:
    """fsync a file written by someone else (e.g. safetensors' ``save_file``)."""
    with file.open("rb+") as handle:
        os.fsync(handle.fileno())


def fsync_dir(folder: Path) -> None:
    """Persist a folder's entries (renames, new files); a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
