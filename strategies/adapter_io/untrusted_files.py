"""Opening files of an adapter folder that came from clients or users, so never trusted.

Only regular files are read: reading a FIFO or a device could block or never end (safetensors
would refuse one with a bare "No such device" from mmap; ``json`` and ``torch.load`` would
wait on it). Every failure becomes an ``AdapterFileError`` naming the folder and the file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from strategies.adapter_io.errors import AdapterFileError


@contextmanager
def open_regular(folder: Path, file: Path) -> Iterator[tuple[BinaryIO, int]]:
    """Open ``file`` for reading and yield it with its size; refuse anything but a regular file.

    Raises
    ------
    AdapterFileError
        If the file is missing, a folder, not a regular file, or cannot be read.
    """
    try:
        with file.open("rb") as handle:
            status = os.fstat(handle.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise AdapterFileError(folder, file.name, "is not a regular file")
            yield handle, status.st_size
    except FileNotFoundError:
        raise AdapterFileError(folder, file.name, "missing") from None
    except IsADirectoryError:
        raise AdapterFileError(folder, file.name, "is a folder, expected a file") from None
    except OSError as error:
        raise AdapterFileError(folder, file.name, f"cannot be read: {error.strerror}") from None


def read_limited(folder: Path, file: Path, limit: int) -> bytes:
    """Read a whole small file, refusing one larger than ``limit`` bytes before reading it."""
    with open_regular(folder, file) as (handle, size):
        if size > limit:
            raise AdapterFileError(
                folder, file.name, f"is {size} bytes, more than the {limit} accepted"
            )
        return handle.read(limit + 1)
