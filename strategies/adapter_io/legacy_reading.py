"""Reading a legacy ``adapter_model.bin`` (a pickle) without letting it run code.

The file is read only with ``torch.load(weights_only=True)``: torch's restricted unpickler
returns tensors and plain containers and refuses every other object, so a crafted pickle cannot
run code. What comes back must be a dict of str to tensor.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import BinaryIO

import torch

from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.layout import ADAPTER_WEIGHTS
from strategies.adapter_io.untrusted_files import open_regular


def read_legacy(folder: Path, file: Path) -> dict[str, torch.Tensor]:
    """Load a legacy adapter_model.bin with torch's weights-only unpickler, tensors only.

    Raises
    ------
    AdapterFileError
        If the file is not a regular file, torch refuses or cannot read it (the message never
        advises ``weights_only=False``), or it holds anything but a dict of str to tensor.
    """
    with open_regular(folder, file) as (handle, _size):
        loaded = _load_weights_only(folder, file.name, handle)
    if not isinstance(loaded, dict):
        raise AdapterFileError(
            folder, file.name, f"must hold a dict of tensors, got {type(loaded).__name__}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for key, value in loaded.items():
        if not isinstance(key, str):
            raise AdapterFileError(folder, file.name, f"key {key!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise AdapterFileError(
                folder, file.name, f"key {key!r} holds {type(value).__name__}, not a tensor"
            )
        tensors[key] = value
    return tensors


def _load_weights_only(folder: Path, name: str, handle: BinaryIO) -> object:
    """``torch.load(weights_only=True)``; every failure (the bytes are untrusted) is reported."""
    try:
        with warnings.catch_warnings():  # e.g. pickle-protocol notes; a refusal is reported
            warnings.simplefilter("ignore")
            return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message advises weights_only=False, which would run the pickle's code; keep
        # only the line that names the refused object.
        named = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line]
        detail = f" ({named[0]})" if named else ""
        raise AdapterFileError(
            folder,
            name,
            "refused by torch.load(weights_only=True): it holds objects other than tensors"
            f"{detail}; convert it to {ADAPTER_WEIGHTS} where the file is trusted",
        ) from None
    except Exception as error:  # UnpicklingError's siblings: RuntimeError, EOFError, ...
        detail = " ".join(str(error).split())[:200]
        raise AdapterFileError(
            folder, name, f"torch.load could not read it: {type(error).__name__}: {detail}"
        ) from None
