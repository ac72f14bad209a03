"""Adapter folders for the file-format and CLI tests.

Two kinds: ``synthetic_adapter`` writes a PEFT-shaped folder directly with safetensors and json
(fast, no PEFT import, easy to break on purpose); ``peft_folders`` builds a tiny BERT from a
config (no hub) and saves three real LoRA adapters with PEFT's own ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SYNTHETIC_HIDDEN = 8
SYNTHETIC_LAYERS = 2


def synthetic_tensors(
    seed: int,
    *,
    r: int = 4,
    targets: Sequence[str] = ("query", "value"),
    hidden: int = SYNTHETIC_HIDDEN,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """PEFT-style keys of a 2-layer BERT with LoRA on ``targets``; A: r x hidden, B: hidden x r."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(SYNTHETIC_LAYERS):
        for target in targets:
            prefix = f"base_model.model.encoder.layer.{layer}.attention.self.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(
                r, hidden, generator=generator, dtype=torch.float32
            ).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(
                hidden, r, generator=generator, dtype=torch.float32
            ).to(dtype)
    return tensors


def synthetic_config(
    *,
    r: int = 4,
    lora_alpha: float = 8,
    targets: Sequence[str] = ("query", "value"),
    base: str | None = "tiny-bert",
) -> dict[str, Any]:
    """The fields of a PEFT LoRA adapter_config.json that the reader checks, plus a few more."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "base_model_name_or_path": base,
        "bias": "none",
    }


def write_synthetic_adapter(
    folder: Path,
    *,
    seed: int = 0,
    r: int = 4,
    lora_alpha: float = 8,
    targets: Sequence[str] = ("query", "value"),
    base: str | None = "tiny-bert",
    tensors: dict[str, torch.Tensor] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = synthetic_tensors(seed, r=r, targets=targets)
    if config is None:
        config = synthetic_config(r=r, lora_alpha=lora_alpha, targets=targets, base=base)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


SyntheticFactory = Callable[..., Path]


@pytest.fixture
def synthetic_adapter(tmp_path: Path) -> SyntheticFactory:
    """``synthetic_adapter(name, **options)`` writes a synthetic adapter folder under tmp_path."""

    def make(name: str, **options: Any) -> Path:
        return write_synthetic_adapter(tmp_path / name, **options)

    return make


@dataclass(frozen=True)
class PeftFolders:
    """A tiny saved base model and three LoRA adapters saved by PEFT."""

    base: Path
    adapters: tuple[Path, ...]

    def load_base(self) -> torch.nn.Module:
        from transformers import BertModel

        model: torch.nn.Module = BertModel.from_pretrained(self.base)
        return model


@pytest.fixture(scope="session")
def peft_folders(tmp_path_factory: pytest.TempPathFactory) -> PeftFolders:
    """Tiny BERT (hidden 32, 2 layers) saved locally, and 3 rank-4 LoRA adapters (query, value).

    PEFT initialises B to zero; each adapter's LoRA weights are then set from its own seed so
    the three differ and the merge is non-trivial.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("peft")
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
    )
    torch.manual_seed(0)
    base_dir = root / "base"
    BertModel(config).save_pretrained(base_dir)
    adapters = []
    for seed in range(3):
        model = get_peft_model(
            BertModel.from_pretrained(base_dir),
            LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]),
        )
        generator = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator))
        folder = root / f"client-{seed}"
        model.save_pretrained(str(folder))
        adapters.append(folder)
    return PeftFolders(base=base_dir, adapters=tuple(adapters))
