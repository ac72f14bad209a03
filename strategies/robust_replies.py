"""The robust stages (``strategies.robust``) applied to accepted replies, key by key.

A reply's update is its tensors minus the global adapter the round started from (for sparse
uplink replies, global + pruned delta minus global). Rewritten replies (clipped or clamped)
stay lazy: ``tensor(key)`` rewrites one key when the merge asks for it, so a round never holds a
decoded copy of every reply (the clamp's per-key bounds are two global-sized tensors).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from strategies.reply_checks import AcceptedReply
from strategies.robust import (
    center_scales,
    clamp_to_range,
    clip_toward,
    coordinate_median,
    multikrum_select,
    pairwise_squared_distances,
    trim_count,
    trimmed_range,
)

Tensors = Mapping[str, torch.Tensor]


def update_norm(reply: AcceptedReply, base: Tensors) -> float:
    """||reply - global||, Frobenius over every tensor of the global adapter (float64 sum)."""
    squared = sum(
        float((reply.tensor(key) - value).to(torch.float64).square().sum())
        for key, value in base.items()
    )
    return float(squared**0.5)


@dataclass(frozen=True)
class RewrittenReply(AcceptedReply):
    """An accepted reply whose update is scaled by ``scale`` (toward ``center`` when given:
    center + scale (update - center)) and then clamped, key by key, to [``low``, ``high``]
    (when given); node, arrays and example count stay the source's."""

    source: AcceptedReply
    base: Tensors
    scale: float = 1.0
    low: Tensors | None = None
    high: Tensors | None = None
    center: Tensors | None = None

    @classmethod
    def of(
        cls,
        reply: AcceptedReply,
        base: Tensors,
        *,
        scale: float = 1.0,
        low: Tensors | None = None,
        high: Tensors | None = None,
        center: Tensors | None = None,
    ) -> RewrittenReply:
        """``reply`` rewritten as asked."""
        shared = {field.name: getattr(reply, field.name) for field in fields(AcceptedReply)}
        return cls(
            **shared,
            source=reply,
            base=base,
            scale=scale,
            low=low,
            high=high,
            center=center,
        )

    def tensor(self, key: str) -> torch.Tensor:
        """Global + the rewritten update of ``key``, float32."""
        delta = self.source.tensor(key) - self.base[key]
        if self.center is not None:
            delta = clip_toward(delta, self.center[key], self.scale)
        elif self.scale != 1.0:
            delta = delta * self.scale
        if self.low is not None and self.high is not None:
            delta = clamp_to_range(delta, self.low[key], self.high[key])
        return self.base[key] + delta


def _delta_stack(replies: Sequence[AcceptedReply], base: Tensors, key: str) -> torch.Tensor:
    return torch.stack([reply.tensor(key) - base[key] for reply in replies])


def krum_keep(
    replies: Sequence[AcceptedReply], base: Tensors, num_malicious: int, num_select: int
) -> list[int]:
    """Positions of the replies multi-Krum keeps (``num_select`` 0: all but ``num_malicious``),
    scored on the flattened updates."""
    count = len(replies)
    if count <= 1:
        return list(range(count))
    distances = torch.zeros(count, count, dtype=torch.float64)
    for key in base:
        distances += pairwise_squared_distances(_delta_stack(replies, base, key))
    wanted = num_select if num_select > 0 else count - num_malicious
    return multikrum_select(distances, num_malicious, wanted)


@dataclass(frozen=True)
class Clamped:
    """The coordinate-wise stage's result: the rewritten replies, how many values it trimmed on
    each side, and the fraction of the clients' coordinates it moved."""

    replies: list[AcceptedReply]
    trim: int
    clamped_fraction: float


def clamp_coordinates(
    replies: Sequence[AcceptedReply], base: Tensors, fraction: float | None
) -> Clamped:
    """Every reply's update clamped to the coordinate-wise trimmed range of all of them
    (``fraction`` None: the median's range); unchanged when nothing is trimmed (T small)."""
    trim = trim_count(len(replies), fraction) if replies else 0
    if trim == 0:
        return Clamped(list(replies), 0, 0.0)
    low: dict[str, torch.Tensor] = {}
    high: dict[str, torch.Tensor] = {}
    moved = total = 0
    for key in base:
        stack = _delta_stack(replies, base, key)
        low[key], high[key] = trimmed_range(stack, trim)
        moved += int(((stack < low[key]) | (stack > high[key])).sum())
        total += stack.numel()
    rewritten: list[AcceptedReply] = [
        RewrittenReply.of(reply, base, low=low, high=high) for reply in replies
    ]
    return Clamped(rewritten, trim, moved / total if total else 0.0)


def clip_to_center(replies: Sequence[AcceptedReply], base: Tensors, radius: float) -> Clamped:
    """Every reply's update pulled to within ``radius`` x the median distance of the
    coordinate-wise median (``strategies.robust.centered_clip``); ``clamped_fraction`` is the
    share of the replies pulled in. Unchanged for T <= 2."""
    count = len(replies)
    if count <= 2:
        return Clamped(list(replies), 0, 0.0)
    center: dict[str, torch.Tensor] = {}
    squared = torch.zeros(count, dtype=torch.float64)
    for key in base:
        stack = _delta_stack(replies, base, key)
        center[key] = coordinate_median(stack)
        offsets = (stack - center[key]).to(torch.float64)
        squared += offsets.reshape(count, -1).square().sum(dim=1)
    scales = center_scales(squared.sqrt().tolist(), radius)
    rewritten: list[AcceptedReply] = [
        reply if scale == 1.0 else RewrittenReply.of(reply, base, scale=scale, center=center)
        for reply, scale in zip(replies, scales, strict=True)
    ]
    return Clamped(rewritten, 0, sum(scale < 1.0 for scale in scales) / count)
