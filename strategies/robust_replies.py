"""The robust stages (``strategies.robust``) applied to accepted replies, key by key.

A reply's update is its tensors minus the global adapter the round started from (for sparse
uplink replies, global + pruned delta minus global). Rewritten replies (clipped or clamped)
stay lazy: ``tensor(key)`` rewrites one key when the merge asks for it, so a round never holds a
decoded copy of every reply (the clamp's per-key bounds are two global-sized tensors). A
defence's stages (``strategies.robust.Stage``) read the replies through ``ReplyDeltas`` and
answer in ``Rewrites``, which ``apply_rewrites`` turns into rewritten replies.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from strategies.reply_checks import AcceptedReply
from strategies.robust import (
    STACK_BYTES,
    Rewrites,
    Rows,
    clamp_to_range,
    clip_toward,
    row_pieces,
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

    def tensor_rows(self, key: str, rows: Rows) -> torch.Tensor:
        """``tensor(key)[rows]``."""
        return self.tensor(key)[rows]


@dataclass(frozen=True)
class ReplyDeltas:
    """A round's replies as a defence's stage reads them (``strategies.robust.Deltas``): one
    key's updates stacked at a time, so a stage never holds every reply decoded."""

    replies: Sequence[AcceptedReply]
    base: Tensors
    budget: int = STACK_BYTES  # bytes of one piece's stack (``row_pieces``)

    @property
    def count(self) -> int:
        """How many replies."""
        return len(self.replies)

    @property
    def keys(self) -> tuple[str, ...]:
        """The global adapter's keys, in its order."""
        return tuple(self.base)

    def stacks(self, key: str) -> Iterator[torch.Tensor]:
        """Every reply's update of ``key``, stacked (count x the tensor's shape), in pieces of
        whole rows (``row_pieces``: each piece's stack within ``STACK_BYTES``), each reply
        reading only the piece's rows."""
        base = self.base[key]
        for rows in row_pieces(base.shape, self.count, self.budget):
            yield torch.stack([reply.tensor_rows(key, rows) - base[rows] for reply in self.replies])


def apply_rewrites(
    replies: Sequence[AcceptedReply], base: Tensors, rewrites: Rewrites
) -> list[AcceptedReply]:
    """``replies`` with a stage's ``Rewrites`` applied, lazily (a None leaves its reply as is)."""
    if len(rewrites.per_reply) != len(replies):
        raise ValueError(
            f"a rewrite stage answered for {len(rewrites.per_reply)} of {len(replies)} replies"
        )
    return [
        reply
        if rewrite is None
        else RewrittenReply.of(
            reply,
            base,
            scale=rewrite.scale,
            low=rewrite.low,
            high=rewrite.high,
            center=rewrite.center,
        )
        for reply, rewrite in zip(replies, rewrites.per_reply, strict=True)
    ]
