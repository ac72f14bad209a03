"""A tiny LLaMA (2 layers, hidden 32) with a character-level tokenizer, built offline.

Both are made from scratch in a folder, so the causal-LM tests need no download: the tokenizer
is a ``tokenizers`` WordLevel model over printable ASCII plus newline (one token per character,
``<s>`` prepended), wrapped as a ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")


def save_tiny_llama(folder: Path, *, weights: bool = True, seed: int = 0) -> Path:
    """Write the tiny LLaMA (config, and weights unless ``weights`` is False) and its
    tokenizer to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    characters = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    vocab = {token: index for index, token in enumerate([*SPECIAL, *characters])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    ).save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        tie_word_embeddings=False,
        # 10x the usual 0.02: with it the lm_head's logits of a random model are nearly uniform
        # whatever the hidden state, and LoRA on the layers below cannot move the loss
        initializer_range=0.2,
    )
    if weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            LlamaForCausalLM(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    return folder


def write_echo_jsonl(path: Path, count: int, *, seed: int) -> Path:
    """``count`` examples of a task a tiny model learns fast: answer a lowercase word in
    upper case (instruction "upper", the word as input)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as file:
        for _ in range(count):
            word = "".join(rng.choice("abcdef") for _ in range(4))
            row = {"instruction": "upper", "input": word, "response": word.upper()}
            file.write(json.dumps(row) + "\n")
    return path
