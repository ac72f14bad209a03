"""Replacing a folder all or nothing: fill a hidden staging folder, fsync it, rename it in.

The staging folder sits beside the target (same parent, so the rename stays on one file
system). A crash therefore leaves either the old folder or the new one, never a partial one; at
worst a hidden ``.<name>.tmp-*`` folder beside it.

The staging folder is made as ``mkdir`` makes any folder, mode 0777 less the process's umask
(0755 under the usual 022), not as ``tempfile.mkdtemp`` does (always 0700): the adapter folder it
becomes holds a model's weights, no secret, and its files are written with the umask's modes
too. Who wants outputs private sets a private umask (077), and then the folders follow.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
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
    staging = make_staging_dir(target)
    try:
        fill(staging)
        fsync_dir(staging)
        _swap_into_place(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(target.parent)


def make_staging_dir(target: Path) -> Path:
    """A new, empty, hidden folder ``.<name>.tmp-<random>`` beside ``target``, mode 0777 less
    the umask (``tempfile.mkdtemp`` would make it 0700, and so the renamed folder)."""
    for _ in range(100):
        staging = target.parent / f".{target.name}.tmp-{secrets.token_hex(6)}"
        try:
            staging.mkdir(mode=0o777)
        except FileExistsError:
            continue
        return staging
    raise FileExistsError(f"no free staging folder name beside '{target}'")


def match_umask_mode(file: Path, staging: Path) -> None:
    """Give ``file`` 0666 less the umask, read off ``staging`` (made 0777 less the umask by
    ``make_staging_dir``) instead of calling ``os.umask``, which would change it for a moment
    for every thread."""
    os.chmod(file, stat.S_IMODE(staging.stat().st_mode) & 0o666)


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
