"""The interface every merge method implements, and the hyperparameter checks they share."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PairMerge:
    """A merged LoRA pair (A: r x d_in, B: d_out x r).

    ``relative_error`` is ||B A - full-rank merge||_F / ||full-rank merge||_F for methods that
    factor a higher-rank merged update back to rank r (0.0 when nothing was truncated), else None.
    """

    a: torch.Tensor
    b: torch.Tensor
    relative_error: float | None = None
    truncated_energy: float = 0.0
    total_energy: float = 0.0


class MergeMethod(ABC):
    """Merges one module at a time across T adapters; stacks have the task dimension first.

    ``weights`` is always the normalised per-adapter weight p (T entries summing to 1, equal
    when the caller gave none), on the device the stacks live on.
    """

    @abstractmethod
    def merge_pair(
        self,
        a_stack: torch.Tensor,
        b_stack: torch.Tensor,
        weights: torch.Tensor,
        *,
        module_index: int,
    ) -> PairMerge:
        """Merge the A (T x r x d_in) and B (T x d_out x r) factors of one module."""

    def merge_other(self, stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Non-LoRA trainable tensors (spec step 5): the (weighted) mean over adapters."""
        merged: torch.Tensor = torch.tensordot(weights, stack, dims=1)
        return merged

    def describe(self) -> dict[str, object]:
        """The method's name and hyperparameters, for logs and merge reports."""
        return {}


def check_unit_interval(name: str, value: float, *, low_open: bool, high_open: bool) -> float:
    """Reject a ratio outside its interval, naming it and the allowed range."""
    number = float(value)
    low_ok = number > 0.0 if low_open else number >= 0.0
    high_ok = number < 1.0 if high_open else number <= 1.0
    if not (math.isfinite(number) and low_ok and high_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return number


def check_fuse_weight(value: float | Sequence[float]) -> float | tuple[float, ...]:
    """A finite fuse weight, shared (a number) or per adapter (a sequence)."""
    if isinstance(value, (int, float)):
        if not math.isfinite(float(value)):
            raise ValueError(f"fuse_weight must be finite, got {value!r}")
        return float(value)
    values = tuple(float(v) for v in value)
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"fuse_weight must be a finite number or one per adapter, got {value!r}")
    return values


def task_coefficients(
    fuse_weight: float | tuple[float, ...], weights: torch.Tensor
) -> torch.Tensor:
    """lambda_t = fuse_weight_t * T * p_t: equal weights give every task its fuse weight."""
    count = weights.shape[0]
    if isinstance(fuse_weight, tuple):
        if len(fuse_weight) != count:
            raise ValueError(
                f"fuse_weight has {len(fuse_weight)} entries but {count} adapters were given"
            )
        base = torch.tensor(fuse_weight, dtype=weights.dtype, device=weights.device)
    else:
        base = torch.full((count,), fuse_weight, dtype=weights.dtype, device=weights.device)
    return base * count * weights
