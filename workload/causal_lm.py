"""Instruction tuning of a causal language model with LoRA: data, model, training, evaluation.

The second task kind (run-config ``task = "causal-lm"``). A site's data is a JSONL file with one
object per line::

    {"instruction": "Translate to French", "input": "cheese", "response": "fromage"}

``instruction`` and ``response`` are non-empty strings, ``input`` an optional string (other
fields are ignored). Each example is rendered as ``prompt + response + eos`` where the prompt is
``prompt-template`` filled with ``{instruction}`` and ``{input}``; by default (``""``)::

    ### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n

with the Input block left out when ``input`` is empty. The loss is the mean next-token
cross-entropy over **response tokens only** (prompt and padding labels are -100), so the model
learns to answer, not to repeat prompts; perplexity is ``exp`` of that loss.

Where the data comes from (``site_data_path``): node-config ``data-path`` (a real site), else
run-config ``data-path`` with ``{partition-id}`` replaced by the node's partition id (a
simulation, where nodes have no node config of their own). Without node-config
``eval-data-path``, a fixed 10 % of the file (by a hash of each example) is held out for
evaluation and never trained on.

Precision: fp32 on CPU; on CUDA the base weights load in bf16 (fp16 where bf16 is not supported)
and the forward pass runs under autocast, while the LoRA factors stay fp32 (PEFT's default), so
what is sent is exact. ``quantization = "4bit" | "8bit"`` loads the base with bitsandbytes where
CUDA and bitsandbytes are present, and falls back to the above with a warning elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.common import log
from peft import PeftModel
from torch.nn import functional
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from workload.config import Reader, read_float, read_int, read_str
from workload.model import LoraSettings, resolve_model_path, trainable_parameters, wrap_lora

DEFAULT_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
DEFAULT_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
TEMPLATE_FIELDS = ("instruction", "input")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
QUANTIZATIONS = ("none", "4bit", "8bit")
IGNORE_INDEX = -100
# Percent of a site's examples held out for evaluation when it has no eval-data-path.
HOLDOUT_PERCENT = 10
_MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class Example:
    """One instruction-tuning example (``input`` is ``""`` when absent)."""

    instruction: str
    input: str
    response: str


@dataclass(frozen=True)
class CausalLmSettings:
    """Local training of the causal-LM kind.

    Parameters
    ----------
    learning_rate : float (default: 5e-4)
        AdamW step size for the LoRA factors.
    local_epochs : int (default: 1)
        Passes over the site's training examples per round.
    batch_size : int (default: 32)
        Examples per micro-batch (one forward/backward).
    gradient_accumulation : int (default: 1)
        Micro-batches per optimizer step; the loss is normalised by the response tokens of the
        whole step, so a step equals one batch of ``batch_size * gradient_accumulation``.
    max_length : int (default: 64)
        Tokens per example (prompt + response + eos) after truncation.
    gradient_checkpointing : bool (default: False)
        Recompute activations in backward: less memory for longer sequences, ~30 % slower.
    prompt_template : str (default: "")
        ``""`` for the default template (module docstring), else a str.format template with
        ``{instruction}`` and optionally ``{input}``; the response follows it directly.
    precision : str (default: "auto")
        ``auto`` (bf16/fp16 on CUDA, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``.
    quantization : str (default: "none")
        ``none``, ``4bit`` or ``8bit`` (bitsandbytes, CUDA only).
    train_examples : int (default: 512)
        At most this many training examples per round (a seeded draw; all when fewer).
    eval_examples : int (default: 256)
        At most this many held-out examples per evaluation (the first ones, fixed).
    train_factors : str (default: "ab")
        ``"ab"`` trains both LoRA factors; ``"b"`` freezes every ``lora_A`` and trains only
        ``lora_B`` (FFA-LoRA; ``workload.model.trainable_parameters``).
    """

    learning_rate: float = 5e-4
    local_epochs: int = 1
    batch_size: int = 32
    gradient_accumulation: int = 1
    max_length: int = 64
    gradient_checkpointing: bool = False
    prompt_template: str = ""
    precision: str = "auto"
    quantization: str = "none"
    train_examples: int = 512
    eval_examples: int = 256
    train_factors: str = "ab"

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> CausalLmSettings:
        """Read the keys above (kebab-case); a wrong type or range raises ValueError."""
        default = cls()
        checkpointing = config.get("gradient-checkpointing", default.gradient_checkpointing)
        if not isinstance(checkpointing, bool):
            raise ValueError(
                f"run-config key 'gradient-checkpointing' must be true or false; got "
                f"{checkpointing!r}"
            )
        settings = cls(
            learning_rate=read_float(
                config, "learning-rate", default.learning_rate, low=0.0, low_open=True
            ),
            local_epochs=read_int(config, "local-epochs", default.local_epochs, minimum=1),
            batch_size=read_int(config, "batch-size", default.batch_size, minimum=1),
            gradient_accumulation=read_int(
                config, "gradient-accumulation", default.gradient_accumulation, minimum=1
            ),
            max_length=read_int(config, "max-length", default.max_length, minimum=2),
            gradient_checkpointing=checkpointing,
            prompt_template=config.get("prompt-template", default.prompt_template),
            precision=_choice(config, "precision", PRECISIONS),
            quantization=_choice(config, "quantization", QUANTIZATIONS),
            train_examples=read_int(config, "train-examples", default.train_examples, minimum=1),
            eval_examples=read_int(config, "eval-examples", default.eval_examples, minimum=1),
            train_factors=Reader(config).choice("train-factors", default=default.train_factors),
        )
        if not isinstance(settings.prompt_template, str):
            raise ValueError(
                f"run-config key 'prompt-template' must be a string; got "
                f"{settings.prompt_template!r}"
            )
        check_template(settings.prompt_template)
        return settings


def _choice(config: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    value = read_str(config, key, allowed[0])
    if value not in allowed:
        raise ValueError(f"run-config key {key!r} must be one of {list(allowed)}; got {value!r}")
    return value


# ----------------------------------------------------------------------------- data


def check_template(template: str) -> None:
    """A custom ``prompt-template`` must name ``{instruction}`` and no field but it and
    ``{input}``; ``""`` (the default template) passes."""
    if not template:
        return
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ValueError(
            f"run-config key 'prompt-template' is not a valid template: {error}"
        ) from error
    unknown = sorted(fields - set(TEMPLATE_FIELDS))
    if unknown or "instruction" not in fields:
        raise ValueError(
            f"run-config key 'prompt-template' must contain {{instruction}} and may contain "
            f"{{input}} (write literal braces as {{{{ }}}}); got fields {sorted(fields)} in "
            f"{template!r}"
        )


def render_prompt(example: Example, template: str = "") -> str:
    """The prompt of ``example``: everything before the response."""
    if not template:
        template = DEFAULT_PROMPT if example.input else DEFAULT_PROMPT_NO_INPUT
    return template.format(instruction=example.instruction, input=example.input)


def load_examples(path: str | Path) -> list[Example]:
    """The examples of a JSONL file (see the module docstring for the schema).

    Raises FileNotFoundError for a missing file and ValueError naming the file and the line
    number for a line that is not a JSON object with the required string fields, or for a file
    without examples. Blank lines are skipped.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"instruction data file {str(file)!r} does not exist; set node-config 'data-path' "
            "(or run-config 'data-path') to a JSONL file with instruction/input/response"
        )
    examples: list[Example] = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                examples.append(_parse_line(line, file, number))
    if not examples:
        raise ValueError(
            f"{file}: no examples; expected one JSON object per line like "
            '{"instruction": "...", "input": "...", "response": "..."}'
        )
    return examples


def _parse_line(line: str, file: Path, number: int) -> Example:
    where = f"{file}, line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg})") from error
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    values: dict[str, str] = {}
    for field, required in (("instruction", True), ("input", False), ("response", True)):
        value = row.get(field, "" if not required else None)
        if value is None and not required:
            value = ""
        if not isinstance(value, str) or (required and not value.strip()):
            raise ValueError(
                f"{where}: field {field!r} must be a{' non-empty' if required else ''} string; "
                f"got {value!r}"
            )
        values[field] = value
    return Example(values["instruction"], values["input"], values["response"])


def is_holdout(example: Example) -> bool:
    """Whether ``example`` is in the fixed evaluation hold-out (same answer on every machine)."""
    key = "\x1f".join((example.instruction, example.input, example.response)).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % 100 < HOLDOUT_PERCENT


def site_data_path(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> str:
    """The node's data file: node-config ``data-path``, else run-config ``data-path`` with
    ``{partition-id}`` filled in from node-config ``partition-id``; ``""`` when neither."""
    key = "data-path"
    if key in node_config:
        return read_str(node_config, key, "", source="node config")
    pattern = read_str(run_config, key, "")
    if "{partition-id}" in pattern:
        if "partition-id" not in node_config:
            raise ValueError(
                f"run-config key {key!r} = {pattern!r} needs node-config 'partition-id' "
                "(set by the simulation); a real site sets node-config 'data-path' instead"
            )
        partition = read_int(node_config, "partition-id", 0, minimum=0, source="node config")
        pattern = pattern.replace("{partition-id}", str(partition))
    return pattern


def site_examples(
    node_config: Mapping[str, Any], run_config: Mapping[str, Any], split: str
) -> list[Example]:
    """The node's ``"train"`` or ``"eval"`` examples (see the module docstring)."""
    path = site_data_path(node_config, run_config)
    if not path:
        raise ValueError(
            "task 'causal-lm' needs data: set node-config 'data-path' (a site's JSONL file) or "
            "run-config 'data-path' (in simulation, e.g. '/data/site-{partition-id}.jsonl')"
        )
    eval_path = read_str(node_config, "eval-data-path", "", source="node config")
    if eval_path:
        return load_examples(path if split == "train" else eval_path)
    examples = [e for e in load_examples(path) if is_holdout(e) == (split == "eval")]
    if not examples:
        raise ValueError(
            f"{path}: the {HOLDOUT_PERCENT} % evaluation hold-out left no {split} examples "
            "(file too small); add examples or set node-config 'eval-data-path'"
        )
    return examples


# ----------------------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class Encoded:
    """One tokenised example: ids and labels of equal length (prompt labels are -100)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def encode(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    template: str = "",
) -> list[Encoded]:
    """Tokenise ``prompt + response + eos``, label only the response and eos, cut to
    ``max_length``. Examples whose prompt fills ``max_length`` (no response token left) are
    dropped; if all are, ValueError asks for a larger ``max-length``."""
    encoded: list[Encoded] = []
    eos = tokenizer.eos_token_id
    for example in examples:
        prompt = list(tokenizer(render_prompt(example, template))["input_ids"])
        response = list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
        if isinstance(eos, int):
            response.append(eos)
        ids = (prompt + response)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
        if any(label != IGNORE_INDEX for label in labels[1:]):
            encoded.append(Encoded(tuple(ids), tuple(labels)))
    if examples and not encoded:
        raise ValueError(
            f"run-config key 'max-length' = {max_length} leaves no response token in any "
            "example (the prompts alone are that long); raise max-length"
        )
    return encoded


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padding labels -100)."""
    width = max(len(item.input_ids) for item in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(item.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------- model


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of base weights and autocast: fp32 on CPU whatever ``precision`` says."""
    if device.type != "cuda" or precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _quantization_config(settings: CausalLmSettings, device: torch.device) -> Any:
    if settings.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        available = False
    else:
        available = device.type == "cuda"
    if not available:
        log(
            WARNING,
            "quantization=%s needs CUDA and bitsandbytes; loading the base model unquantized",
            settings.quantization,
        )
        return None
    from transformers import BitsAndBytesConfig

    if settings.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype(settings.precision, device),
    )


def build_causal_lm(
    lora: LoraSettings, settings: CausalLmSettings, *, seed: int = 0
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The causal LM with fresh LoRA adapters (only they are trainable) and its tokenizer.

    On the first CUDA device when there is one, else CPU (fp32). Offline: ``model`` is a local
    folder or a name in the Hugging Face cache.
    """
    path = resolve_model_path(lora.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quantization = _quantization_config(settings, device)
    kwargs: dict[str, Any] = {"dtype": compute_dtype(settings.precision, device)}
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": device.index or 0})
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
        if quantization is None:
            base = base.to(device)  # type: ignore[arg-type]
        if settings.gradient_checkpointing:
            base.gradient_checkpointing_enable()  # type: ignore[no-untyped-call]
            base.enable_input_require_grads()  # type: ignore[no-untyped-call]
            base.config.use_cache = False
        model = wrap_lora(base, lora)
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------- train / eval


@dataclass(frozen=True)
class CausalLmResult:
    """Mean response-token loss (nats) over the examples seen, and their count."""

    loss: float
    num_examples: int
    num_tokens: int

    @property
    def perplexity(self) -> float:
        """``exp(loss)``, capped at ``exp(80)`` so it stays finite for a broken model."""
        return math.exp(min(self.loss, 80.0))


def _loss_sum(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over response tokens, and their count."""
    device = next(p.device for p in model.parameters())
    inputs = {key: value.to(device) for key, value in batch.items()}
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])[
            "logits"
        ]
    targets = inputs["labels"][:, 1:]
    shifted = logits[:, :-1, :].float()
    total = functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, int((targets != IGNORE_INDEX).sum())


def train_causal_lm(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    settings: CausalLmSettings,
    *,
    seed: int,
) -> CausalLmResult:
    """Train the LoRA factors with AdamW on the response-token loss; returns the mean loss.

    Per round: up to ``train_examples`` examples (a draw seeded by ``seed``), ``local_epochs``
    passes in a seeded order, ``gradient_accumulation`` micro-batches per step, gradient norm
    clipped at 1. With ``train_factors = "b"`` only the ``lora_B`` factors are trained (every
    ``lora_A`` stays exactly as it came). The caller's torch RNG state is kept.
    """
    encoded = encode(
        examples, tokenizer, max_length=settings.max_length, template=settings.prompt_template
    )
    generator = torch.Generator().manual_seed(seed)
    if len(encoded) > settings.train_examples:
        keep = torch.randperm(len(encoded), generator=generator)[: settings.train_examples]
        encoded = [encoded[int(i)] for i in keep]
    pad_id = _pad_id(tokenizer)
    device = next(p.device for p in model.parameters())
    dtype = compute_dtype(settings.precision, device)
    total_loss, total_tokens = 0.0, 0
    with trainable_parameters(model, settings.train_factors) as trainable:
        optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
        model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(settings.local_epochs):
                order = torch.randperm(len(encoded), generator=generator).tolist()
                batches = [
                    collate(
                        [encoded[i] for i in order[start : start + settings.batch_size]], pad_id
                    )
                    for start in range(0, len(order), settings.batch_size)
                ]
                step = settings.gradient_accumulation
                for first in range(0, len(batches), step):
                    window = batches[first : first + step]
                    tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)
                    optimizer.zero_grad(set_to_none=True)
                    for batch in window:
                        loss_sum, count = _loss_sum(model, batch, dtype)
                        (loss_sum / tokens).backward()  # type: ignore[no-untyped-call]
                        total_loss += float(loss_sum.detach())
                        total_tokens += count
                    torch.nn.utils.clip_grad_norm_(trainable, _MAX_GRAD_NORM)
                    optimizer.step()
        model.eval()
        optimizer.zero_grad(set_to_none=True)
    return CausalLmResult(total_loss / max(total_tokens, 1), len(encoded), total_tokens)


@torch.no_grad()
def evaluate_causal_lm(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    settings: CausalLmSettings,
) -> CausalLmResult:
    """Mean response-token loss over the first ``eval_examples`` examples (token-weighted)."""
    encoded = encode(
        examples[: settings.eval_examples],
        tokenizer,
        max_length=settings.max_length,
        template=settings.prompt_template,
    )
    pad_id = _pad_id(tokenizer)
    device = next(p.device for p in model.parameters())
    dtype = compute_dtype(settings.precision, device)
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(encoded), settings.batch_size):
        loss_sum, count = _loss_sum(
            model, collate(encoded[start : start + settings.batch_size], pad_id), dtype
        )
        total += float(loss_sum)
        tokens += count
    return CausalLmResult(total / max(tokens, 1), len(encoded), tokens)
