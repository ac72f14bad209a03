"""The public merge entry point: validate, then merge module by module on one device."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from strategies.merging.method import MergeMethod
from strategies.merging.registry import create_method
from strategies.merging.validation import (
    check_keys_finite,
    check_stack_finite,
    check_weights,
    validate_adapters,
)

ProgressCallback = Callable[[int, int], None]


@dataclass
class MergeReport:
    """What a merge did: method and hyperparameters, device, time, truncation errors.

    ``relative_error``: ||B A - P||_F / ||P||_F over the truncated modules, P the full-rank
    result. ``update_relative_error`` (rounds, product-space methods): the same discarded part
    against the round's update, ||B A - P||_F / ||eta M||_F, the share of the step that was lost.
    """

    method: dict[str, object]
    num_adapters: int
    device: str
    seconds: float = 0.0
    relative_errors: dict[str, float] = field(default_factory=dict)
    relative_error: float | None = None
    update_relative_error: float | None = None


@dataclass
class MergeResult:
    """Merged tensors (float32, CPU, the input keys) and the report."""

    tensors: dict[str, torch.Tensor]
    report: MergeReport


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available")
    return resolved


def merge_lora_with_report(
    adapters: Sequence[Mapping[str, torch.Tensor]],
    method: str | MergeMethod = "robustmerge",
    weights: Sequence[float] | torch.Tensor | None = None,
    device: str | torch.device | None = None,
    *,
    labels: Sequence[int | str] | None = None,
    progress: ProgressCallback | None = None,
    **hyperparameters: Any,
) -> MergeResult:
    """Merge PEFT LoRA state dicts with a registered method (a name, or a built method and no
    hyperparameters); see ``merge_lora``."""
    merger = build_method(method, hyperparameters)
    # Finiteness is checked per key once it is stacked, not in a pass over every input: on the
    # merged pair (1/T of the data) when the method says NaN and Inf always reach its output,
    # else on each stack, while it is in cache.
    layout = validate_adapters(adapters, labels, check_finite=False)
    screen_outputs = merger.propagates_non_finite()
    count = len(adapters)
    target = resolve_device(device)
    normalised = normalised_weights(weights, count, target)
    report = MergeReport(method=merger.describe(), num_adapters=count, device=str(target))
    started = time.perf_counter()
    merged: dict[str, torch.Tensor] = {}
    truncated = total = 0.0
    steps = len(layout.modules) + len(layout.other_keys)
    for index, module in enumerate(layout.modules):
        a_shape = adapters[0][module.a_key].shape
        b_shape = adapters[0][module.b_key].shape
        a_stack = stack_tensors(adapters, module.a_key, target)
        b_stack = stack_tensors(adapters, module.b_key, target)
        if not screen_outputs:
            check_stack_finite(a_stack, adapters, module.a_key, labels)
            check_stack_finite(b_stack, adapters, module.b_key, labels)
        a_stack = a_stack.reshape(count, a_shape[0], -1)
        b_stack = b_stack.reshape(count, b_shape[0], b_shape[1])
        pair = merger.merge_pair(a_stack, b_stack, normalised, module_index=index)
        if screen_outputs and not bool(torch.isfinite(pair.a.sum() + pair.b.sum())):
            check_keys_finite(adapters, (module.a_key, module.b_key), labels)
        merged[module.a_key] = pair.a.reshape(a_shape).to(device="cpu", dtype=torch.float32)
        merged[module.b_key] = pair.b.reshape(b_shape).to(device="cpu", dtype=torch.float32)
        if pair.relative_error is not None:
            report.relative_errors[module.name] = pair.relative_error
            truncated += pair.truncated_energy
            total += pair.total_energy
        if progress is not None:
            progress(index + 1, steps)
    for offset, key in enumerate(layout.other_keys, start=len(layout.modules) + 1):
        other = stack_tensors(adapters, key, target)
        check_stack_finite(other, adapters, key, labels)
        merged[key] = merger.merge_other(other, normalised).to(device="cpu", dtype=torch.float32)
        if progress is not None:
            progress(offset, steps)
    if report.relative_errors:
        report.relative_error = (truncated / total) ** 0.5 if total > 0 else 0.0
    report.seconds = time.perf_counter() - started
    ordered = {key: merged[key] for key in adapters[0]}
    return MergeResult(tensors=ordered, report=report)


def merge_lora(
    adapters: Sequence[Mapping[str, torch.Tensor]],
    method: str | MergeMethod = "robustmerge",
    weights: Sequence[float] | torch.Tensor | None = None,
    device: str | torch.device | None = None,
    **hyperparameters: Any,
) -> dict[str, torch.Tensor]:
    """Merge T PEFT-style LoRA state dicts into one; returns float32 CPU tensors, same keys.

    ``adapters``: state dicts with keys like ``base_model.model....q_proj.lora_A.weight``
    (fp16, bf16 or fp32; never modified). ``method``: a registered name (``available_methods()``)
    or a built method (then no hyperparameters here).
    ``weights``: optional per-adapter weights (e.g. example counts); for robustmerge they reshape
    the fuse weights to lambda_t = fuse_weight * T * w_t / sum(w). ``device``: None picks CUDA
    when available. RobustMerge takes ``keep_ratio``, ``scale_quantile``, ``fuse_weight`` (a float
    or one per adapter) and ``mode`` ("paper-exact" | "paper-equation"). Computation is float32,
    one module at a time, so extra memory is about one module stacked over the T adapters.
    """
    return merge_lora_with_report(adapters, method, weights, device, **hyperparameters).tensors


def build_method(method: str | MergeMethod, hyperparameters: Mapping[str, Any]) -> MergeMethod:
    """A registered method by name with its hyperparameters, or an already built one."""
    if isinstance(method, MergeMethod):
        if hyperparameters:
            raise ValueError(
                "hyperparameters go to the method's constructor; a built method takes none here, "
                f"got {', '.join(sorted(hyperparameters))}"
            )
        return method
    return create_method(method, **hyperparameters)


def normalised_weights(
    weights: Sequence[float] | torch.Tensor | None, count: int, device: torch.device
) -> torch.Tensor:
    """The checked per-adapter weights as p (float64 sum, then float32; equal when None)."""
    checked = check_weights(weights, count)
    raw = (
        torch.ones(count, dtype=torch.float64)
        if checked is None
        else torch.tensor(checked, dtype=torch.float64)
    )
    return (raw / raw.sum()).to(dtype=torch.float32, device=device)


def stack_tensors(
    adapters: Sequence[Mapping[str, torch.Tensor]], key: str, device: torch.device
) -> torch.Tensor:
    """One key of every adapter, float32, stacked on ``device`` (task dimension first)."""
    # detach: live parameters (requires_grad) must not make the merge build an autograd graph,
    # which would keep every module's stacked inputs alive and return tensors with grad_fn.
    return torch.stack(
        [adapter[key].detach().to(device=device, dtype=torch.float32) for adapter in adapters]
    )
