"""Sums of tensors whose result does not depend on the order of the terms, bit for bit.

A streamed round adds the clients' terms in whatever order their replies arrive. Float addition
is not associative, so a plain running sum would make the new global, and with it a resumed run,
depend on that order. ``ExactSum`` splits every term into slices of ``BIN_BITS`` bits on a grid
that is fixed in absolute terms (bin b holds the bits worth 2^(b W) .. 2^((b+1) W - 1)), and
keeps one float64 accumulator per bin for the ``BINS`` highest bins the terms reach. Each slice
is an integer multiple of its bin's unit below 2^W units, so adding up to ``MAX_TERMS`` of them
in float64 is exact, and an exact sum has no order. When a larger term raises the highest bin,
the lowest bin falls out of the window; what it held is what every order drops, because each
term's slices depend only on the term and the final window (the idea of reproducible
summation, Demmel and Nguyen's binned sums, in its simplest form).

What is dropped lies below 2^((top - BINS + 1) W): with W = 32 and two bins, at least 32 bits
under the largest term's leading bit, below float32's 24-bit precision of the result.
Memory: ``BINS`` float64 tensors per sum, 4x a float32 tensor of the same shape.
"""

from __future__ import annotations

import math

import torch

BIN_BITS = 32
BINS = 2
MAX_TERMS = 2**20  # < 2^(53 - BIN_BITS): every bin's float64 sum stays exact
LOWEST_EXPONENT = -1000  # float64's normal range ends at 2^-1022


class ExactSum:
    """An order-independent, bit-exact running sum of tensors of one shape."""

    def __init__(self, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu"):
        self.shape = torch.Size(shape)
        self.device = torch.device(device)
        self.count = 0
        self._top: int | None = None  # the highest bin any term reached
        self._bins = [
            torch.zeros(self.shape, dtype=torch.float64, device=self.device) for _ in range(BINS)
        ]

    def add(self, term: torch.Tensor) -> None:
        """Add ``term`` (any float dtype, the sum's shape, finite values)."""
        if tuple(term.shape) != tuple(self.shape):
            raise ValueError(f"term has shape {tuple(term.shape)}, the sum {tuple(self.shape)}")
        if self.count >= MAX_TERMS:
            raise ValueError(f"an exact sum takes at most {MAX_TERMS} terms")
        values = term.detach().to(device=self.device, dtype=torch.float64)
        peak = float(values.abs().max()) if values.numel() else 0.0
        if not math.isfinite(peak):
            raise ValueError("an exact sum takes finite values only")
        self.count += 1
        if peak == 0.0:
            return
        self._raise_top(_bin_of(peak))
        assert self._top is not None
        rest = values
        for index in range(BINS):
            exponent = (self._top - index) * BIN_BITS
            if exponent < LOWEST_EXPONENT:
                break  # below anything a float32 term holds; every order drops it alike
            unit = math.ldexp(1.0, exponent)
            part = torch.trunc(rest / unit) * unit
            self._bins[index] += part
            rest = rest - part

    def _raise_top(self, top: int) -> None:
        """Move the window up so that bin ``top`` is its highest (never down)."""
        if self._top is None:
            self._top = top
            return
        shift = top - self._top
        if shift <= 0:
            return
        kept = self._bins[: max(BINS - shift, 0)]
        fresh = [torch.zeros_like(self._bins[0]) for _ in range(BINS - len(kept))]
        self._bins = fresh + kept
        self._top = top

    def value(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The sum (rounded once from the bins, highest first), as ``dtype``."""
        total = self._bins[0].clone()
        for extra in self._bins[1:]:
            total += extra
        return total.to(dtype)


def _bin_of(peak: float) -> int:
    """The bin holding the leading bit of ``peak`` (> 0): floor(log2(peak)) // BIN_BITS."""
    _, exponent = math.frexp(peak)  # peak = m 2^exponent, 0.5 <= m < 1
    return (exponent - 1) // BIN_BITS
