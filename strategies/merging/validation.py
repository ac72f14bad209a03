"""Checks that a set of adapters can be merged, with errors that say where and what."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from strategies.merging.errors import MergeInputError
from strategies.merging.lora_keys import AdapterLayout, parse_layout

ACCEPTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def validate_adapters(
    adapters: Sequence[Mapping[str, torch.Tensor]],
    labels: Sequence[int | str] | None = None,
    *,
    check_finite: bool = True,
) -> AdapterLayout:
    """Check keys, dtypes, shapes, ranks, A/B pairing and finiteness; return the shared layout.

    The first adapter is the reference; every other one must carry the same keys with the same
    shapes. ``labels`` name the adapters in errors (default: their index). ``check_finite=False``
    leaves finiteness to the caller, who checks each key once it has stacked it
    (``check_stack_finite``: one reduction over a stack still in cache instead of one pass over
    every input tensor) or once it has merged it (``check_keys_finite`` when the merged pair is
    not finite, for a method whose merge carries every NaN and Inf into its result): the same
    error, raised when that key's turn comes.
    """
    if len(adapters) == 0:
        raise MergeInputError("nothing to merge: zero adapters were given")
    if labels is not None and len(labels) != len(adapters):
        raise MergeInputError(
            f"labels has {len(labels)} entries for {len(adapters)} adapters; give one per adapter"
        )
    names: Sequence[int | str] = labels if labels is not None else range(len(adapters))
    reference = adapters[0]
    if len(reference) == 0:
        raise MergeInputError("adapter holds no tensors", adapter=names[0])
    layout = parse_layout(reference.keys(), adapter=names[0])
    for module in layout.modules:
        a, b = reference[module.a_key], reference[module.b_key]
        check_tensor(a, adapter=names[0], key=module.a_key, check_finite=check_finite)
        check_tensor(b, adapter=names[0], key=module.b_key, check_finite=check_finite)
        if a.dim() < 2 or b.dim() < 2 or math.prod(b.shape[2:]) != 1:
            raise MergeInputError(
                f"LoRA factors must be A (r x ...) and B (d_out x r); got A {tuple(a.shape)}, "
                f"B {tuple(b.shape)}",
                adapter=names[0],
                key=module.a_key,
            )
        if a.shape[0] != b.shape[1]:
            raise MergeInputError(
                f"rank mismatch inside the adapter: A has rank {a.shape[0]} but "
                f"{module.b_key!r} has rank {b.shape[1]}",
                adapter=names[0],
                key=module.a_key,
            )
    for key in layout.other_keys:
        check_tensor(reference[key], adapter=names[0], key=key, check_finite=check_finite)
    expected = set(reference)
    for index in range(1, len(adapters)):
        adapter = adapters[index]
        name = names[index]
        missing = sorted(expected - set(adapter))
        extra = sorted(set(adapter) - expected)
        if missing:
            raise MergeInputError(
                f"missing key (present in adapter {names[0]}); {len(missing)} missing in all",
                adapter=name,
                key=missing[0],
            )
        if extra:
            raise MergeInputError(
                f"unexpected key (absent from adapter {names[0]}); {len(extra)} extra in all",
                adapter=name,
                key=extra[0],
            )
        for key, ref_tensor in reference.items():
            tensor = adapter[key]
            check_tensor(tensor, adapter=name, key=key, check_finite=check_finite)
            if tensor.shape != ref_tensor.shape:
                raise MergeInputError(
                    f"shape {tuple(tensor.shape)} does not match {tuple(ref_tensor.shape)} "
                    f"of adapter {names[0]}{_rank_hint(key, tensor, ref_tensor)}",
                    adapter=name,
                    key=key,
                )
    return layout


def check_tensor(
    value: object, *, adapter: int | str, key: str, check_finite: bool = True
) -> torch.Tensor:
    """A floating-point torch tensor with only finite values, or a MergeInputError.

    ``check_finite=False`` checks the type and dtype only."""
    if not isinstance(value, torch.Tensor):
        raise MergeInputError(
            f"expected a torch.Tensor, got {type(value).__name__}", adapter=adapter, key=key
        )
    if value.dtype not in ACCEPTED_DTYPES:
        raise MergeInputError(
            f"dtype {value.dtype} is not accepted; use float16, bfloat16, float32 or float64",
            adapter=adapter,
            key=key,
        )
    if check_finite and not _all_finite(value):
        bad = int((~torch.isfinite(value)).sum())
        raise MergeInputError(
            f"{bad} non-finite value(s) (NaN or Inf) of {value.numel()}", adapter=adapter, key=key
        )
    return value


def check_stack_finite(
    stack: torch.Tensor,
    adapters: Sequence[Mapping[str, torch.Tensor]],
    key: str,
    labels: Sequence[int | str] | None = None,
) -> None:
    """Raise ``check_tensor``'s error for the first adapter whose ``key`` holds NaN or Inf.

    ``stack`` is that key of every adapter stacked (task dimension first, any float dtype). Its
    sum screens them all at once (NaN and Inf propagate into it); only a non-finite sum, also
    reached by overflow or by a float64 entry too large for the stack's dtype, sends each input
    through the exact check, so what is accepted and refused is what ``validate_adapters``
    accepts and refuses.
    """
    if stack.numel() == 0 or bool(torch.isfinite(stack.sum())):
        return
    check_keys_finite(adapters, (key,), labels)


def check_keys_finite(
    adapters: Sequence[Mapping[str, torch.Tensor]],
    keys: Sequence[str],
    labels: Sequence[int | str] | None = None,
) -> None:
    """The exact finiteness check of ``keys`` (in that order) in every adapter: raise
    ``check_tensor``'s error for the first that holds NaN or Inf, else return."""
    names: Sequence[int | str] = labels if labels is not None else range(len(adapters))
    for key in keys:
        for name, adapter in zip(names, adapters, strict=True):
            check_tensor(adapter[key], adapter=name, key=key)


def _all_finite(value: torch.Tensor) -> bool:
    """Exact all-finite test; a float32 sum screens first, since NaN and Inf propagate into it.

    A finite sum proves every entry finite; a non-finite one (also reached by overflow of a huge
    but finite tensor) falls back to the entry-wise check.
    """
    if value.numel() == 0:
        return True
    total = value.sum(dtype=torch.float32 if value.dtype != torch.float64 else torch.float64)
    if bool(torch.isfinite(total)):
        return True
    return bool(torch.isfinite(value).all())


def check_weights(weights: Sequence[float] | torch.Tensor | None, count: int) -> list[float] | None:
    """Per-adapter weights: finite, non-negative, one per adapter, not all zero."""
    if weights is None:
        return None
    values = [
        float(w) for w in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)
    ]
    if len(values) != count:
        raise MergeInputError(f"weights has {len(values)} entries for {count} adapters")
    for index, value in enumerate(values):
        if not math.isfinite(value) or value < 0:
            raise MergeInputError(
                f"weight must be a finite number >= 0, got {value!r}", adapter=index
            )
    if sum(values) <= 0:
        raise MergeInputError("weights sum to zero: at least one adapter needs a positive weight")
    return values


def _rank_hint(key: str, tensor: torch.Tensor, reference: torch.Tensor) -> str:
    is_a = ".lora_A" in key or ".lora_embedding_A" in key
    is_b = ".lora_B" in key or ".lora_embedding_B" in key
    if is_a and tensor.shape[0] != reference.shape[0]:
        return f" (rank {tensor.shape[0]}, expected rank {reference.shape[0]})"
    if is_b and tensor.dim() > 1 and tensor.shape[1] != reference.shape[1]:
        return f" (rank {tensor.shape[1]}, expected rank {reference.shape[1]})"
    return ""
