"""The server step: how far the global adapter moves towards a round's merge (run-config
``server-lr``, eta; ``merge-target``). The one home of that rule for every round path.

Every path ends a round with the same rule, taken in the space the path merges in:

- factor space (paper-exact RobustMerge, fedavg, ties, dare; buffered, streamed, sparse and
  secure-sum rounds alike): with ``target="delta"`` the merge is a delta and
  G <- G + eta * merged; with ``target="adapter"`` it is a whole adapter and
  G <- G + eta * (merged - G) (``ServerStep.apply``);
- product space (svd, exact-mean, paper-equation RobustMerge; equal or mixed ranks): the new
  product is B_G A_G + eta * M, truncated back to the rank afterwards, so the step scales the
  update's left factor before the truncation (``ServerStep.scale_update``) and cannot be taken
  on the truncated factors; the non-LoRA keys move towards the method's mean
  (``ServerStep.towards``).

Pure tensor arithmetic (no Flower, no I/O); float32 in, float32 out, in the order of operations
the golden rounds were recorded with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

TARGETS: tuple[str, ...] = ("delta", "adapter")  # what a round merges: updates or adapters


@dataclass(frozen=True)
class ServerStep:
    """eta (``lr``) and what the merge holds (``target``: "delta" or "adapter")."""

    lr: float
    target: str = "delta"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}; got {self.target!r}")

    def apply(self, base: Mapping[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> None:
        """Turn ``merged`` (a factor-space merge of every key of ``base``) into the new global in
        place, one key at a time, so no second copy of the adapter is held."""
        for key, value in base.items():
            update = merged[key]
            if self.target == "adapter":
                update.sub_(value)
            merged[key] = update.mul_(self.lr).add_(value.to(update.dtype))

    def moved_by(self, start: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        """start + eta * change (a factor moved by a merged delta; a new tensor)."""
        return start + self.lr * change

    def towards(self, start: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
        """start + eta * (merged - start): a tensor moved towards a merged value."""
        return start + self.lr * (merged - start)

    def scale_update(self, left: torch.Tensor) -> torch.Tensor:
        """eta * L for a product-space update M = L R, taken before the truncation."""
        return self.lr * left
