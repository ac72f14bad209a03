"""Reading ``adapter_model.safetensors`` from an untrusted folder.

safetensors validates the file itself before it loads anything: a file too short for a header,
a header length field larger than its limit (100 MB) or than the file, a header that is not
UTF-8 or not JSON, wrongly typed entries, unknown dtypes, shapes and offsets that do not match,
and data the header does not cover exactly. Its refusal is reported as an ``AdapterFileError``
naming the folder and the file, with the file's size and header length field; where its words do
not say which tensor's offsets are wrong, the header is read here to say so.

Checks safetensors does not make are made here: every dtype must be one torch loads as an
ordinary tensor (safetensors also loads ``F4`` and ``F8_E8M0`` into packed or exponent-only
dtypes), and no tensor name may appear twice in the header (safetensors keeps the last entry
silently). The file must be a regular file, as every file of the folder (``untrusted_files``).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.json_values import is_int, unique_keys
from strategies.adapter_io.untrusted_files import open_regular

MAX_HEADER_BYTES = 100_000_000
"""Largest safetensors header read (the limit the safetensors library itself applies)."""

SAFETENSORS_ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
"""The safetensors dtypes accepted (ordinary torch tensors), with their bytes per element."""

_LOAD_ERRORS = (SafetensorError, OSError, RuntimeError, ValueError, TypeError)
"""What safetensors raises for a file it refuses or cannot load."""


def read_safetensors(folder: Path, file: Path) -> dict[str, torch.Tensor]:
    """Load the tensors of a safetensors file (on CPU, dtypes as stored) after checking it.

    Raises
    ------
    AdapterFileError
        If the file is missing or not a regular file, safetensors refuses it, a dtype is not
        accepted (see ``SAFETENSORS_ITEMSIZE``), or a tensor name appears twice.
    """
    with open_regular(folder, file) as (handle, size):
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        header = None
        if length is not None and length <= min(MAX_HEADER_BYTES, size - 8):
            header = handle.read(length)
    try:
        with safe_open(file, framework="pt", device="cpu") as opened:
            names = list(opened.keys())
            _check_dtypes(folder, file.name, {n: opened.get_slice(n).get_dtype() for n in names})
            _check_names_unique(folder, file.name, length, header)
            return {name: opened.get_tensor(name) for name in names}
    except AdapterFileError:
        raise
    except _LOAD_ERRORS as error:
        reason = _refusal(error, size, length, header)
        raise AdapterFileError(folder, file.name, reason) from None


def _refusal(error: Exception, size: int, length: int | None, header: bytes | None) -> str:
    """safetensors' refusal in one line, with the file's size and header length field.

    Where the header can be read, the tensor whose offsets are wrong is named too.
    """
    detail = " ".join(str(error).split())
    if length is None:
        return (
            f"safetensors refused it: {detail} (the file is {size} bytes, too short to hold "
            "the 8-byte header length field)"
        )
    reason = (
        f"safetensors refused it: {detail} (the file is {size} bytes, its header length field "
        f"says {length})"
    )
    fault = _offsets_fault(header, size - 8 - length) if header is not None else None
    return reason if fault is None else f"{reason}; {fault}"


def _check_dtypes(folder: Path, name: str, dtypes: dict[str, str]) -> None:
    """Refuse dtypes outside ``SAFETENSORS_ITEMSIZE`` before their tensors are loaded."""
    for key, dtype in dtypes.items():
        if dtype not in SAFETENSORS_ITEMSIZE:
            raise AdapterFileError(
                folder,
                name,
                f"tensor {key!r}: dtype {dtype!r} is not accepted; accepted: "
                f"{', '.join(SAFETENSORS_ITEMSIZE)}",
            )


def _check_names_unique(folder: Path, name: str, length: int | None, header: bytes | None) -> None:
    """Refuse a header that names a tensor (or a metadata key) twice: readers could disagree."""
    if header is None:  # safetensors accepted a header this module would not read
        raise AdapterFileError(
            folder,
            name,
            f"header length field says {length} bytes, more than the {MAX_HEADER_BYTES} accepted",
        )
    try:
        json.loads(header, object_pairs_hook=unique_keys)
    except ValueError as error:
        raise AdapterFileError(folder, name, f"header is ambiguous: {error}") from None


def _offsets_fault(header: bytes, data_size: int) -> str | None:
    """Which tensor's ``data_offsets`` are wrong, and how; None if none is, or it cannot tell.

    Only explains a refusal: safetensors says "invalid shape, data type, or offset for tensor" or
    "file not fully covered" without naming the tensor or the numbers. A header that is not
    well-formed gives None (safetensors' own message already says what is wrong with it).
    """
    try:
        parsed = json.loads(header, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError):  # duplicate keys too: which entry counts is unclear
        return None
    if not isinstance(parsed, dict):
        return None
    spans: list[tuple[int, int, str]] = []
    for key, entry in parsed.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict):
            return None
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not (
            isinstance(dtype, str)
            and dtype in SAFETENSORS_ITEMSIZE
            and isinstance(shape, list)
            and all(is_int(d) and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(is_int(o) for o in offsets)
        ):
            return None
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            return (
                f"tensor {key!r}: data_offsets [{begin}, {end}] fall outside the {data_size} "
                "data bytes of the file"
            )
        expected = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
        if end - begin != expected:
            return (
                f"tensor {key!r}: data_offsets span {end - begin} bytes but {dtype} {shape} "
                f"needs {expected}"
            )
        spans.append((begin, end, key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            problem = "overlaps another tensor" if begin < position else "leaves a gap before it"
            return f"tensor {key!r}: data_offsets start at {begin}, which {problem}"
        position = end
    if position != data_size:
        return f"the tensors cover {position} bytes but the file holds {data_size} after the header"
    return None
