"""A tiny BERT (2 layers, hidden 32) with the tokenizer of the embedded all-MiniLM-L6-v2.

It keeps the training tests to seconds; sharing MiniLM's vocabulary keeps tokenisation real.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertModel

from workload.model import resolve_model_path

TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def save_tiny_bert(folder: Path, *, weights: bool = True) -> Path:
    """Write a tiny BERT (with MiniLM's tokenizer) to ``folder``; only its config if not
    ``weights``."""
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    folder.mkdir(parents=True, exist_ok=True)
    if weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            BertModel(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    source = Path(resolve_model_path(""))
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, folder / name)
    return folder


def tiny_run_config(model: Path, **overrides: Any) -> dict[str, Any]:
    """A run config for the tiny BERT in ``model``: small LoRA, batches and data (seconds)."""
    return {
        "model": str(model),
        "lora-r": 4,
        "lora-alpha": 8,
        "target-modules": "query,value",
        "batch-size": 8,
        "max-length": 32,
        "learning-rate": 1e-3,
        "train-examples": 16,
        "eval-examples": 8,
        "seen-tasks": "mcid,hwu64",
        "seed": 0,
        **overrides,
    }
