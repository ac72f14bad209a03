"""Reading and writing PEFT LoRA adapter folders, with errors that name the folder and the file.

A PEFT adapter folder holds ``adapter_config.json`` (a ``LoraConfig`` as JSON) and
``adapter_model.safetensors`` (the LoRA tensors, keys like
``base_model.model.<module>.lora_A.weight``). Older folders carry ``adapter_model.bin``, a
pickle; it is read only with ``torch.load(weights_only=True)`` and only when no safetensors file
is present, so a crafted pickle cannot run code.

Adapter folders reach the server from clients and from users, so every byte is untrusted: the
safetensors header is checked against the file size before anything is loaded (a garbled or
oversized header gives an ``AdapterFileError``, never a crash or a huge allocation), and the
config's fields are type-checked. Writing is atomic: everything goes into a hidden temporary
folder beside the target, is fsynced, and is renamed into place, so a crash leaves either the old
folder or the new one, never a partial one. No Flower import: the CLI and the server's
checkpoints both use this module.
"""

from __future__ import annotations

import enum
import json
import math
import os
import pickle
import shutil
import stat
import struct
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LEGACY_WEIGHTS = "adapter_model.bin"

MAX_HEADER_BYTES = 100_000_000
"""Largest safetensors header accepted (the limit the safetensors library itself applies)."""

MAX_CONFIG_BYTES = 16_000_000
"""Largest adapter_config.json accepted; real ones are a few kB."""

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
"""Bytes per element of each safetensors dtype name that torch can load."""

_COMPARED_FIELDS: tuple[tuple[str, object], ...] = (
    ("base_model_name_or_path", None),
    ("r", None),
    ("lora_alpha", None),
    ("target_modules", None),
    ("use_rslora", False),
    ("rank_pattern", {}),
    ("alpha_pattern", {}),
)
"""Config fields that must agree before adapters are merged, with the PEFT default if absent."""


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


@dataclass
class AdapterFolder:
    """The contents of one PEFT adapter folder.

    Attributes
    ----------
    path : Path
        The folder.
    tensors : dict of str to torch.Tensor
        The saved state dict (keys as PEFT saves them, without the adapter name).
    config : dict of str to Any
        ``adapter_config.json`` as parsed JSON.
    weights_file : Path or None, default None
        The weights file the tensors came from (safetensors or legacy ``.bin``).
    """

    path: Path
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    weights_file: Path | None = None


# --------------------------------------------------------------------------------------------
# Reading


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
        For every problem: a missing or unreadable folder or file, a config that is not a JSON
        object or has wrongly typed fields (``peft_type`` must be ``"LORA"``, ``r`` an integer
        > 0, ``lora_alpha`` a finite number, ``target_modules`` a string or a list of strings,
        ``base_model_name_or_path`` a string or null), a safetensors file whose header is
        truncated, oversized, not JSON, or has unknown dtypes or offsets that do not match the
        file, a ``.bin`` that holds anything but tensors.
    """
    folder = Path(path)
    if not folder.exists():
        raise AdapterFileError(folder, None, "no such folder")
    if not folder.is_dir():
        raise AdapterFileError(folder, None, "not a folder (expected a PEFT adapter folder)")
    config = _read_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    legacy = folder / LEGACY_WEIGHTS
    if weights.exists():
        tensors = _read_safetensors(folder, weights)
        source = weights
    elif legacy.exists():
        tensors = _read_legacy(folder, legacy)
        source = legacy
    else:
        raise AdapterFileError(
            folder, ADAPTER_WEIGHTS, f"missing (and no legacy {LEGACY_WEIGHTS} either)"
        )
    if not tensors:
        raise AdapterFileError(folder, source.name, "holds no tensors")
    return AdapterFolder(path=folder, tensors=tensors, config=config, weights_file=source)


def _read_config(folder: Path) -> dict[str, Any]:
    """Parse adapter_config.json and check the fields a LoRA merge depends on."""
    file = folder / ADAPTER_CONFIG
    raw = _read_limited(folder, file, MAX_CONFIG_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise AdapterFileError(folder, ADAPTER_CONFIG, f"not UTF-8 text ({error.reason})") from None
    try:
        config = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise AdapterFileError(
            folder, ADAPTER_CONFIG, f"not valid JSON: {error.msg} (line {error.lineno})"
        ) from None
    except (ValueError, RecursionError) as error:
        raise AdapterFileError(folder, ADAPTER_CONFIG, f"not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(
            folder, ADAPTER_CONFIG, f"must be a JSON object, got {_json_type(config)}"
        )
    check_config(config, folder=folder)
    return config


def check_config(config: Mapping[str, Any], *, folder: str | os.PathLike[str] = ".") -> None:
    """Check the LoRA fields of an adapter config; raise AdapterFileError naming the field.

    Parameters
    ----------
    config : Mapping
        A parsed ``adapter_config.json``.
    folder : str or os.PathLike, default "."
        The folder to name in errors.
    """

    def fail(field: str, expected: str) -> AdapterFileError:
        value = config.get(field)
        got = "missing" if field not in config else f"{value!r} ({_json_type(value)})"
        return AdapterFileError(
            folder, ADAPTER_CONFIG, f"field {field!r} must be {expected}, got {got}"
        )

    if config.get("peft_type") != "LORA":
        raise fail("peft_type", '"LORA" (only LoRA adapters can be merged)')
    rank = config.get("r")
    if not _is_int(rank) or rank <= 0:
        raise fail("r", "an integer > 0")
    alpha = config.get("lora_alpha")
    if not (_is_number(alpha) and math.isfinite(alpha)):
        raise fail("lora_alpha", "a finite number")
    targets = config.get("target_modules")
    if not (
        isinstance(targets, str)
        or (isinstance(targets, list) and all(isinstance(item, str) for item in targets))
    ):
        raise fail("target_modules", "a string or a list of strings")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise fail("base_model_name_or_path", "a string or null")


def _read_limited(folder: Path, file: Path, limit: int) -> bytes:
    """Read a whole small file, refusing one larger than ``limit`` bytes."""
    try:
        with file.open("rb") as handle:
            size = _regular_file_size(folder, file, handle.fileno())
            if size > limit:
                raise AdapterFileError(
                    folder, file.name, f"is {size} bytes, more than the {limit} accepted"
                )
            return handle.read(limit + 1)
    except FileNotFoundError:
        raise AdapterFileError(folder, file.name, "missing") from None
    except IsADirectoryError:
        raise AdapterFileError(folder, file.name, "is a folder, expected a file") from None
    except OSError as error:
        raise AdapterFileError(folder, file.name, f"cannot be read: {error.strerror}") from None


def _regular_file_size(folder: Path, file: Path, descriptor: int) -> int:
    """The size of an open regular file; a pipe or device would block or never end."""
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode):
        raise AdapterFileError(folder, file.name, "is not a regular file")
    return status.st_size


def _read_safetensors(folder: Path, file: Path) -> dict[str, torch.Tensor]:
    """Check the header against the file, then load the tensors with safetensors."""
    try:
        with file.open("rb") as handle:
            size = _regular_file_size(folder, file, handle.fileno())
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise AdapterFileError(
                    folder, file.name, f"truncated: {size} bytes, too short for a safetensors file"
                )
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > MAX_HEADER_BYTES:
                raise AdapterFileError(
                    folder,
                    file.name,
                    f"header length field says {header_size} bytes, more than the "
                    f"{MAX_HEADER_BYTES} accepted (garbled or not a safetensors file)",
                )
            if header_size > size - 8:
                raise AdapterFileError(
                    folder,
                    file.name,
                    f"header length field says {header_size} bytes but the file has only "
                    f"{size - 8} after it (truncated or not a safetensors file)",
                )
            header = handle.read(header_size)
    except FileNotFoundError:
        raise AdapterFileError(folder, file.name, "missing") from None
    except IsADirectoryError:
        raise AdapterFileError(folder, file.name, "is a folder, expected a file") from None
    except OSError as error:
        raise AdapterFileError(folder, file.name, f"cannot be read: {error.strerror}") from None
    _check_header(folder, file.name, header, size - 8 - header_size)
    try:
        tensors = load_file(file, device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as error:
        detail = " ".join(str(error).split())
        raise AdapterFileError(
            folder, file.name, f"safetensors could not load it: {detail}"
        ) from None
    return dict(tensors)


def _check_header(folder: Path, name: str, header: bytes, data_size: int) -> None:
    """Validate a safetensors header: JSON object, known dtypes, offsets that tile the data."""
    try:
        parsed = json.loads(header.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise AdapterFileError(folder, name, "header is not UTF-8 (garbled file)") from None
    except json.JSONDecodeError as error:
        raise AdapterFileError(
            folder, name, f"header is not valid JSON: {error.msg} at byte {error.pos}"
        ) from None
    except (ValueError, RecursionError) as error:
        raise AdapterFileError(folder, name, f"header is not valid JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise AdapterFileError(
            folder, name, f"header must be a JSON object, got {_json_type(parsed)}"
        )
    metadata = parsed.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(value, str) for value in metadata.values()
    ):
        raise AdapterFileError(folder, name, "header '__metadata__' must map strings to strings")
    spans: list[tuple[int, int, str]] = []
    for key, entry in parsed.items():
        spans.append((*_check_entry(folder, name, key, entry, data_size), key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            problem = "overlaps another tensor" if begin < position else "leaves a gap before it"
            raise AdapterFileError(
                folder, name, f"tensor {key!r}: data_offsets start at {begin}, which {problem}"
            )
        position = end
    if position != data_size:
        raise AdapterFileError(
            folder,
            name,
            f"the tensors cover {position} bytes but the file holds {data_size} after the header",
        )


def _check_entry(
    folder: Path, name: str, key: str, entry: object, data_size: int
) -> tuple[int, int]:
    """One tensor's header entry: dtype, shape and offsets consistent with each other."""

    def fail(reason: str) -> AdapterFileError:
        return AdapterFileError(folder, name, f"tensor {key!r}: {reason}")

    if not isinstance(entry, dict):
        raise fail(f"header entry must be an object, got {_json_type(entry)}")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
        raise fail(f"unknown dtype {dtype!r}; known: {', '.join(SAFETENSORS_ITEMSIZE)}")
    shape = entry.get("shape")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise fail(f"shape must be a list of integers >= 0, got {shape!r}")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise fail(f"data_offsets must be two integers, got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise fail(
            f"data_offsets [{begin}, {end}] fall outside the {data_size} data bytes of the file"
        )
    expected = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
    if end - begin != expected:
        raise fail(f"data_offsets span {end - begin} bytes but {dtype} {shape} needs {expected}")
    return begin, end


def _read_legacy(folder: Path, file: Path) -> dict[str, torch.Tensor]:
    """Load a legacy adapter_model.bin with torch's weights-only unpickler, tensors only."""
    try:
        with file.open("rb") as handle:
            _regular_file_size(folder, file, handle.fileno())
    except OSError as error:
        raise AdapterFileError(folder, file.name, f"cannot be read: {error.strerror}") from None
    try:
        # weights_only=True uses torch's restricted unpickler: only tensors and plain
        # containers can come back, so a crafted pickle cannot run code. Everything it
        # raises for a bad file (UnpicklingError, RuntimeError, EOFError, ...) is reported.
        with warnings.catch_warnings():  # e.g. pickle-protocol notes; a refusal is reported
            warnings.simplefilter("ignore")
            loaded = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message advises weights_only=False, which would run the pickle's code; keep
        # only the line that names the refused object.
        named = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line]
        detail = f" ({named[0]})" if named else ""
        raise AdapterFileError(
            folder,
            file.name,
            "refused by torch.load(weights_only=True): it holds objects other than tensors"
            f"{detail}; convert it to {ADAPTER_WEIGHTS} where the file is trusted",
        ) from None
    except Exception as error:  # untrusted bytes: any failure is a bad file
        detail = " ".join(str(error).split())[:200]
        raise AdapterFileError(
            folder, file.name, f"torch.load could not read it: {type(error).__name__}: {detail}"
        ) from None
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


# --------------------------------------------------------------------------------------------
# Compatibility


def check_compatible(folders: Sequence[AdapterFolder]) -> None:
    """Check that adapters can be merged: same base model, LoRA settings, keys and shapes.

    Compared against the first folder: ``base_model_name_or_path``, ``r``, ``lora_alpha``,
    ``target_modules`` (order-insensitive), ``use_rslora``, ``rank_pattern`` and
    ``alpha_pattern`` (a different scaling rule would make the merged numbers meaningless), then
    the tensor keys and shapes.

    Raises
    ------
    AdapterFileError
        Naming the folder that differs, the field (or key), its value and the first folder's.
    """
    if not folders:
        return
    first = folders[0]
    for other in folders[1:]:
        for field, default in _COMPARED_FIELDS:
            mine = _comparable(field, first.config.get(field, default))
            theirs = _comparable(field, other.config.get(field, default))
            if mine != theirs:
                raise AdapterFileError(
                    other.path,
                    ADAPTER_CONFIG,
                    f"{field} is {other.config.get(field, default)!r} but adapter folder "
                    f"'{first.path}' has {first.config.get(field, default)!r}",
                )
        missing = sorted(set(first.tensors) - set(other.tensors))
        if missing:
            raise AdapterFileError(
                other.path,
                _weights_name(other),
                f"key {missing[0]!r} is missing but present in adapter folder '{first.path}' "
                f"({len(missing)} missing in all)",
            )
        extra = sorted(set(other.tensors) - set(first.tensors))
        if extra:
            raise AdapterFileError(
                other.path,
                _weights_name(other),
                f"key {extra[0]!r} is absent from adapter folder '{first.path}' "
                f"({len(extra)} extra in all)",
            )
        for key, tensor in first.tensors.items():
            shape = tuple(other.tensors[key].shape)
            if shape != tuple(tensor.shape):
                raise AdapterFileError(
                    other.path,
                    _weights_name(other),
                    f"key {key!r} has shape {shape} but adapter folder '{first.path}' has "
                    f"{tuple(tensor.shape)}",
                )


def _comparable(field: str, value: object) -> object:
    if field == "target_modules" and isinstance(value, list):
        return sorted(set(value))
    if field == "lora_alpha" and _is_number(value):
        return float(value)
    return value


def _weights_name(folder: AdapterFolder) -> str:
    return folder.weights_file.name if folder.weights_file is not None else ADAPTER_WEIGHTS


# --------------------------------------------------------------------------------------------
# Writing


def write_adapter_dir(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    extra_files: Mapping[str, str | bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a PEFT adapter folder atomically.

    Everything is written into a hidden temporary folder beside ``path`` (same parent, so the
    rename stays on one file system), each file is fsynced, and the folder is renamed into
    place. A crash therefore leaves no partial ``path``; at worst a hidden
    ``.<name>.tmp-*`` folder beside it.

    Parameters
    ----------
    path : str or os.PathLike
        The folder to create. Missing parents are created.
    tensors : Mapping of str to torch.Tensor
        Saved as ``adapter_model.safetensors``: moved to CPU, made contiguous, with
        ``metadata={"format": "pt"}`` as PEFT writes it.
    config : Mapping
        Saved as ``adapter_config.json`` (must be JSON-serialisable; see ``adapter_config_for``).
    extra_files : Mapping of str to str or bytes, optional
        More files to put in the folder (plain names, e.g. ``merge_report.json``); str is
        written as UTF-8.
    overwrite : bool, default False
        Replace an existing folder at ``path``: the old one is renamed away, the new one renamed
        in, then the old one deleted. To avoid deleting unrelated data, an existing folder is
        only replaced when it is empty or looks like an adapter folder (holds
        ``adapter_config.json`` or ``adapter_model.safetensors``).

    Returns
    -------
    Path
        The written folder.

    Raises
    ------
    AdapterFileError
        If ``path`` exists and ``overwrite`` is False (or it is not replaceable), or the inputs
        cannot be written (non-tensor values, a config that is not JSON, a bad extra file name).
    OSError
        If the file system fails.
    """
    target = Path(path)
    config_text = _config_json(target, config)
    prepared = _prepare_tensors(target, tensors)
    extras = _prepare_extras(target, extra_files or {})
    check_target(target, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        weights = staging / ADAPTER_WEIGHTS
        save_file(prepared, weights, metadata={"format": "pt"})
        _fsync_file(weights)
        _write_file(staging / ADAPTER_CONFIG, config_text.encode("utf-8"))
        for name, data in extras.items():
            _write_file(staging / name, data)
        _fsync_dir(staging)
        _swap_into_place(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    return target


def _config_json(target: Path, config: Mapping[str, Any]) -> str:
    try:
        return json.dumps(_to_json(dict(config)), indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise AdapterFileError(
            target, ADAPTER_CONFIG, f"config cannot be written as JSON: {error}"
        ) from None


def _prepare_tensors(target: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prepared: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise AdapterFileError(
                target,
                ADAPTER_WEIGHTS,
                f"key {key!r}: expected str -> torch.Tensor, got {type(value).__name__}",
            )
        tensor = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory; give each its own storage.
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        if tensor.numel():
            seen.add(tensor.untyped_storage().data_ptr())
        prepared[key] = tensor
    return prepared


def _prepare_extras(target: Path, extra_files: Mapping[str, str | bytes]) -> dict[str, bytes]:
    extras: dict[str, bytes] = {}
    for name, content in extra_files.items():
        if (
            not isinstance(name, str)
            or name in ("", ".", "..")
            or "/" in name
            or "\\" in name
            or "\0" in name
            or name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
        ):
            raise AdapterFileError(
                target, None, f"extra file name {name!r} must be a plain file name"
            )
        if isinstance(content, str):
            extras[name] = content.encode("utf-8")
        elif isinstance(content, bytes):
            extras[name] = content
        else:
            raise AdapterFileError(
                target, name, f"content must be str or bytes, got {type(content).__name__}"
            )
    return extras


def check_target(path: str | os.PathLike[str], *, overwrite: bool) -> None:
    """Raise AdapterFileError unless ``write_adapter_dir`` may write ``path`` with ``overwrite``.

    Lets a caller find out before long work that its output folder is taken or not replaceable.
    """
    target = Path(path)
    if not (target.exists() or target.is_symlink()):
        return
    if not overwrite:
        raise AdapterFileError(target, None, "already exists (pass overwrite=True to replace it)")
    if not target.is_dir():
        raise AdapterFileError(target, None, "exists and is not a folder; refusing to replace it")
    if any(target.iterdir()) and not (
        (target / ADAPTER_CONFIG).exists() or (target / ADAPTER_WEIGHTS).exists()
    ):
        raise AdapterFileError(
            target,
            None,
            "exists and does not look like an adapter folder (no adapter_config.json or "
            "adapter_model.safetensors); refusing to replace it",
        )


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


def _write_file(file: Path, data: bytes) -> None:
    with file.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_file(file: Path) -> None:
    with file.open("rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
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


# --------------------------------------------------------------------------------------------
# Configs


def adapter_config_for(
    base_model: str | None,
    r: int,
    lora_alpha: float,
    target_modules: Sequence[str],
    **extra: Any,
) -> dict[str, Any]:
    """A JSON-ready ``adapter_config.json`` dict that the installed PEFT accepts.

    Built from ``peft.LoraConfig(...).to_dict()`` so that it carries every field the installed
    PEFT version expects; sets become sorted lists and enums their values, as PEFT's own
    ``save_pretrained`` writes them. ``inference_mode`` is True, as in saved adapters, unless
    ``extra`` says otherwise.

    Parameters
    ----------
    base_model : str or None
        ``base_model_name_or_path``: a hub id or a local folder.
    r : int
        LoRA rank.
    lora_alpha : float
        LoRA scaling numerator (the update is ``lora_alpha / r * B @ A``).
    target_modules : Sequence of str
        Module names LoRA wraps, e.g. ``["query", "value"]``.
    **extra
        Any other ``peft.LoraConfig`` field (``lora_dropout``, ``modules_to_save``, ...).

    Raises
    ------
    ValueError
        If PEFT rejects the settings (the message is PEFT's).
    """
    from peft import LoraConfig

    fields: dict[str, Any] = {
        "inference_mode": True,
        **extra,
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": list(target_modules),
        "base_model_name_or_path": base_model,
    }
    try:
        lora = LoraConfig(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"peft.LoraConfig refused these settings: {error}") from None
    converted = _to_json(lora.to_dict())  # type: ignore[no-untyped-call]
    assert isinstance(converted, dict)
    return converted


def _to_json(value: object) -> object:
    """Sets -> sorted lists, enums -> values, tuples -> lists, recursively."""
    if isinstance(value, enum.Enum):
        return _to_json(value.value)
    if isinstance(value, Mapping):
        return {str(key): _to_json(item) for key, item in value.items()}
    if isinstance(value, (set, frozenset)):
        items = [_to_json(item) for item in value]
        try:
            return sorted(items)  # type: ignore[type-var]
        except TypeError:
            return sorted(items, key=repr)
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    return value


# --------------------------------------------------------------------------------------------
# Small helpers


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook that refuses duplicate keys (which would make the file ambiguous)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
