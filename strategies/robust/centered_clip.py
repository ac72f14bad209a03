"""Centered clipping: each client's delta pulled to within a robust radius of a robust center.

A candidate default against adaptive attackers (issue 28). The norm screen bounds an update's
*length* against 10 x the median, so a hostile site can send any direction, reversed included,
at up to 10 times an honest length. Centered clipping (after Karimireddy, He and Jaggi, ICML
2021, *Learning from History for Byzantine Robust Optimization*; here one step from the
coordinate-wise median, without momentum) bounds how far an update may sit from the others:

    c       = coordinate-wise median of the deltas d_1 .. d_T (midpoint of the two middle
              values for even T), over every LoRA tensor
    r_i     = ||d_i - c||                                  (Frobenius over every tensor)
    tau     = radius x lower_median(r_1 .. r_T)
    d_i'    = c + min(1, tau / r_i) (d_i - c)

With fewer than half of the clients hostile, c and tau are set by the honest ones, so a hostile
delta moves the mean of the d_i' by at most tau / T from where the honest ones and the center
put it, whatever its direction or length. An honest client further than ``radius`` x the
median distance from the center is pulled in too (the cost with nobody attacking); the default
radius 2 leaves the typical honest client untouched. T <= 2 changes nothing (the center is the
midpoint, both distances are equal).

Like the coordinate-wise stage it keeps one delta per client, so every merge method can
follow. Pure tensor functions; ``strategies.robust_replies`` applies them to replies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from strategies.robust.coordinatewise import trimmed_range
from strategies.robust.norm_screen import clip_scale, lower_median

# tau = DEFAULT_CENTER_RADIUS x the median distance to the center.
DEFAULT_CENTER_RADIUS = 2.0


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """The coordinate-wise median of ``stack``'s rows (T x ...): the middle value, or the
    midpoint of the two middle values for even T."""
    low, high = trimmed_range(stack, (stack.shape[0] - 1) // 2)
    return (low + high) / 2


def center_scales(distances: Sequence[float], radius: float) -> list[float]:
    """Per client, what to multiply its offset from the center by: ``clip_scale`` of its
    distance against tau = ``radius`` x the lower median of ``distances`` (all 1 for T <= 2,
    where the distances are equal)."""
    if not radius >= 1.0:
        raise ValueError(f"radius must be >= 1, got {radius}")
    if not distances:
        return []
    tau = radius * lower_median(distances)
    return [clip_scale(distance, tau) for distance in distances]


def clip_toward(delta: torch.Tensor, center: torch.Tensor, scale: float) -> torch.Tensor:
    """center + scale (delta - center): ``delta`` moved toward ``center`` (scale 1: unchanged)."""
    if scale == 1.0:
        return delta
    return center + scale * (delta - center)
