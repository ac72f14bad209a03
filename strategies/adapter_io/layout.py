"""What a PEFT LoRA adapter folder holds, and the in-memory form a read of one returns.

A folder holds ``adapter_config.json`` (a ``LoraConfig`` as JSON) and
``adapter_model.safetensors`` (the LoRA tensors, keys like
``base_model.model.<module>.lora_A.weight``). Older folders carry ``adapter_model.bin``, a
pickle, instead of the safetensors file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LEGACY_WEIGHTS = "adapter_model.bin"


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

    @property
    def weights_name(self) -> str:
        """The weights file's name, for errors: the one read, else the safetensors name."""
        return self.weights_file.name if self.weights_file is not None else ADAPTER_WEIGHTS
