"""Reading a whole PEFT LoRA adapter folder: its config and its weights, both checked.

Adapter folders reach the server from clients and from users, so every byte is untrusted: every
fault gives an ``AdapterFileError`` naming the folder and the file, never a crash or a huge
allocation. The legacy ``adapter_model.bin`` is read only when no safetensors file is present.
"""

from __future__ import annotations

import os
from pathlib import Path

from strategies.adapter_io.config import read_config
from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.layout import ADAPTER_WEIGHTS, LEGACY_WEIGHTS, AdapterFolder
from strategies.adapter_io.legacy_reading import read_legacy
from strategies.adapter_io.safetensors_reading import read_safetensors


def read_adapter_dir(path: str | os.PathLike[str]) -> AdapterFolder:
    """Read and check a PEFT LoRA adapter folder.

    Parameters
    ----------
    path : str or os.PathLike
        A folder holding ``adapter_config.json`` and ``adapter_model.safetensors`` (or, only when
        no safetensors file is present, a legacy ``adapter_model.bin``).

    Returns
    -------
    AdapterFolder
        The parsed config and the tensors (on CPU, dtypes as stored).

    Raises
    ------
    AdapterFileError
        For every problem: a missing or unreadable folder or file, a config that fails
        ``config.read_config``, weights that fail ``safetensors_reading.read_safetensors`` or
        ``legacy_reading.read_legacy``, or weights that hold no tensors.
    """
    folder = Path(path)
    if not folder.exists():
        raise AdapterFileError(folder, None, "no such folder")
    if not folder.is_dir():
        raise AdapterFileError(folder, None, "not a folder (expected a PEFT adapter folder)")
    config = read_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    legacy = folder / LEGACY_WEIGHTS
    if weights.exists():
        tensors = read_safetensors(folder, weights)
        source = weights
    elif legacy.exists():
        tensors = read_legacy(folder, legacy)
        source = legacy
    else:
        raise AdapterFileError(
            folder, ADAPTER_WEIGHTS, f"missing (and no legacy {LEGACY_WEIGHTS} either)"
        )
    if not tensors:
        raise AdapterFileError(folder, source.name, "holds no tensors")
    return AdapterFolder(path=folder, tensors=tensors, config=config, weights_file=source)
