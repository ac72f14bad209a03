"""Writing a PEFT adapter folder that PEFT loads, all or nothing.

The tensors become ``adapter_model.safetensors`` as PEFT writes it (on CPU, contiguous, with
``metadata={"format": "pt"}``), the config ``adapter_config.json``; every input is checked before
anything touches the disk, and the folder appears atomically (see ``atomic``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from strategies.adapter_io import atomic
from strategies.adapter_io.config import config_text
from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS


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
        Saved as ``adapter_config.json`` (must be JSON-serialisable; see
        ``config.adapter_config_for``).
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
    config_bytes = config_text(target, config).encode("utf-8")
    prepared = _prepare_tensors(target, tensors)
    extras = _prepare_extras(target, extra_files or {})
    check_target(target, overwrite=overwrite)

    def fill(staging: Path) -> None:
        weights = staging / ADAPTER_WEIGHTS
        save_file(prepared, weights, metadata={"format": "pt"})
        # safetensors writes its file 0600; give it the mode every other file here gets
        atomic.match_umask_mode(weights, staging)
        atomic.fsync_file(weights)
        atomic.write_file(staging / ADAPTER_CONFIG, config_bytes)
        for name, data in extras.items():
            atomic.write_file(staging / name, data)

    atomic.replace_folder(target, fill, overwrite=overwrite)
    return target


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


def _prepare_tensors(target: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with storage of their own, as safetensors' ``save_file`` needs."""
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
    """Extra files as bytes, refusing names that are not plain or that PEFT's files use."""
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
