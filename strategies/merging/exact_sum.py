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
Memory: ``BINS`` int64 tensors per sum (each a count of its bin's unit), 4x a float32 tensor of the
same shape.
"""

from __future__ import annotations

import math
from types import EllipsisType

import torch

BIN_BITS = 32
BINS = 2
MAX_TERMS = 2**20  # < 2^(53 - BIN_BITS): every bin's float64 sum stays exact
LOWEST_EXPONENT = -1000  # float64's normal range ends at 2^-1022
# The lowest bin kept (-31): the lowest whose unit 2^(b W) is at least 2^LOWEST_EXPONENT. A bin
# below it is neither filled nor read, so every order drops what falls there alike
LOWEST_BIN = -(-LOWEST_EXPONENT // BIN_BITS)  # ceil(LOWEST_EXPONENT / BIN_BITS)
# Which rows of the bins a piece of a term adds to (``...``: all of a scalar or empty term).
Rows = slice | EllipsisType
CHUNK_ENTRIES = 1 << 15  # 256 KiB of float64 per slice: a core's L2 cache holds its passes


class ExactSum:
    """An order-independent, bit-exact running sum of tensors of one shape.

    Each bin keeps its slices as an int64 count of its unit (the slices are whole multiples of
    it), so splitting a term costs a few fast passes: scale by a power of two (exact), convert to
    int64 (truncation toward zero, one vectorised cast where ``torch.trunc`` on float64 is a
    scalar loop several times slower), subtract, and integer adds. The sums are the float64
    ones they replace, bit for bit.
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu"):
        self.shape = torch.Size(shape)
        self.device = torch.device(device)
        self.count = 0
        self._top: int | None = None  # the highest bin any term reached
        self._bins = [
            torch.zeros(self.shape, dtype=torch.int64, device=self.device) for _ in range(BINS)
        ]

    def add(self, term: torch.Tensor, factor: float | torch.Tensor | None = None) -> None:
        """Add ``term`` (any float dtype, the sum's shape, finite values), or the float64 product
        ``term * factor`` when a factor is given (a number, or float64 values that broadcast to
        the term), rounded as that product would be."""
        if tuple(term.shape) != tuple(self.shape):
            raise ValueError(f"term has shape {tuple(term.shape)}, the sum {tuple(self.shape)}")
        if self.count >= MAX_TERMS:
            raise ValueError(f"an exact sum takes at most {MAX_TERMS} terms")
        pieces = self._pieces(term.detach(), factor)
        peak = _product_peak(term.detach(), factor)
        if peak is None:
            peak = 0.0
            for _, part, part_factor in pieces:
                part_peak = _peak(self._scaled(part, part_factor))
                # max() would drop a NaN (every comparison with it is false): test it first
                peak = part_peak if not math.isfinite(part_peak) else max(peak, part_peak)
                if not math.isfinite(peak):
                    break
        if not math.isfinite(peak):
            raise ValueError("an exact sum takes finite values only")
        self.count += 1
        if peak == 0.0:
            return
        self._raise_top(_bin_of(peak))
        for rows, part, part_factor in pieces:
            self._split_into_bins(rows, self._scaled(part, part_factor))

    def _pieces(
        self, term: torch.Tensor, factor: float | torch.Tensor | None
    ) -> list[tuple[Rows, torch.Tensor, float | torch.Tensor | None]]:
        """The term (and its factor where it varies along the first dimension) in slices of
        whole rows of about ``CHUNK_ENTRIES`` entries, so that every pass over a slice runs in
        the core's cache rather than streaming the whole tensor from memory once a pass. A
        scalar or empty term is one piece (``...``: a 0-dim tensor takes no slice)."""
        if term.dim() == 0 or term.numel() == 0:
            return [(..., term, factor)]
        rows = term.shape[0]
        step = max(1, CHUNK_ENTRIES // max(1, term.numel() // rows))
        row_factor = (
            factor
            if isinstance(factor, torch.Tensor)
            and factor.dim() == term.dim()
            and factor.shape[0] != 1
            else None
        )
        pieces: list[tuple[Rows, torch.Tensor, float | torch.Tensor | None]] = []
        for start in range(0, rows, step):
            span = slice(start, min(start + step, rows))
            part_factor = factor if row_factor is None else row_factor[span]
            pieces.append((span, term[span], part_factor))
        return pieces

    def _scaled(self, part: torch.Tensor, factor: float | torch.Tensor | None) -> torch.Tensor:
        """A float64 copy of ``part``, times ``factor`` when there is one."""
        values = torch.empty(part.shape, dtype=torch.float64, device=self.device)
        values.copy_(part)
        if factor is not None:
            values.mul_(factor)
        return values

    def _split_into_bins(self, rows: Rows, values: torch.Tensor) -> None:
        """Add each bin's slice of ``values`` (overwritten) to rows ``rows`` of the bins."""
        assert self._top is not None
        for index in range(BINS):
            if self._top - index < LOWEST_BIN:
                break  # below anything a float32 term holds; every order drops it alike
            # values is the rest in units of the bin above (the term itself for the top bin)
            values.mul_(math.ldexp(1.0, -self._top * BIN_BITS if index == 0 else BIN_BITS))
            units = values.to(torch.int64)
            self._bins[index][rows] += units
            if index + 1 < BINS:
                values.sub_(units)

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
        total = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        if self._top is not None:
            for index, units in enumerate(self._bins):
                bin_number = self._top - index
                if bin_number >= LOWEST_BIN:
                    # exact: each count is below 2^53 and the unit a power of two
                    total += units.to(torch.float64) * math.ldexp(1.0, bin_number * BIN_BITS)
        return total.to(dtype)


def _product_peak(term: torch.Tensor, factor: float | torch.Tensor | None) -> float | None:
    """max |term * factor| (the float64 product) read from the term itself, or None when the
    term's dtype or the factor's shape needs the product formed. Rounding is monotonic, so the
    largest rounded product is the rounded product of the largest magnitude: one pass over the
    float32 term instead of two over its float64 copy."""
    if term.dtype not in (torch.float32, torch.float64):
        return None
    if factor is None:
        return _peak(term)
    if not isinstance(factor, torch.Tensor):
        return _peak(term) * abs(float(factor))
    columns = term.shape[-1] if term.dim() == 2 else None
    if factor.dim() != 1 or factor.shape[0] != columns or not term.numel():
        return None
    low, high = torch.aminmax(term, dim=0)
    largest = torch.maximum(-low, high).to(torch.float64) * factor.to(term.device).abs()
    return float(largest.max())


def _peak(values: torch.Tensor) -> float:
    """max |values| (0.0 when empty; NaN or inf when any value is)."""
    if not values.numel():
        return 0.0
    low, high = torch.aminmax(values)
    peak = max(-float(low), float(high))
    return peak if peak == peak else math.nan


def _bin_of(peak: float) -> int:
    """The bin holding the leading bit of ``peak`` (> 0): floor(log2(peak)) // BIN_BITS."""
    _, exponent = math.frexp(peak)  # peak = m 2^exponent, 0.5 <= m < 1
    return (exponent - 1) // BIN_BITS
