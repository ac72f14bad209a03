"""The one error type of adapter folder I/O, so every caller can catch and report a single kind."""

from __future__ import annotations

import os
from pathlib import Path


class AdapterFileError(ValueError):
    """An adapter folder could not be read or written: names the folder, the file and the fault.

    Attributes
    ----------
    folder : Path
        The adapter folder at fault.
    file : str or None
        The file inside it (``adapter_config.json``, ``adapter_model.safetensors``, ...), when one
        is at fault.
    reason : str
        What is wrong, and where it helps, how to fix it.
    """

    def __init__(self, folder: str | os.PathLike[str], file: str | None, reason: str) -> None:
        self.folder = Path(folder)
        self.file = file
        self.reason = reason
        where = f"adapter folder '{self.folder}'"
        if file is not None:
            where += f", {file}"
        super().__init__(f"{where}: {reason}")
