"""The one digest of a set of tensors: checkpoints store it, the audit log records it.

A SHA-256 over each tensor's name, dtype, shape and raw bytes, in key order, so two adapters
have the same digest exactly when they hold the same tensors bit for bit (a float32 and a
float64 copy of the same values differ).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in key order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
