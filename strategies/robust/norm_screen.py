"""The default screen: is an update's norm far above what this federation's updates look like?

The reference is the *lower* median of a pool: this round's update norms and a bounded history
of earlier rounds' accepted norms. The lower median (the middle value, or the smaller of the
two middle values) cannot be raised by outsized updates unless they are more than half of the
pool, which is what makes the two small cases work:

- T = 2 in a first round: the pool is the two norms and the reference is the smaller one, so a
  x1e6 update is over ``factor`` x the honest one and rejected, whichever of the two it is.
- T = 1 in a first round: the only norm is its own reference; there is nothing to compare it
  with, so the bound is None (accept, record the norm; the next rounds have a history).

With a history, later rounds are bounded whatever T is, and a round where several sites
misbehave is still bounded as long as they are fewer than half of the pool.

Zero norms stay out of the pool: an update that did not move (a free rider sending the global
back; every site's A in a first "shared-a" round of one step, whose B starts at zero) says
nothing of how far this federation's updates go, and with them the reference could be 0, a
bound that rejects every real update after it; free riders could also pull it down.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class NormBound:
    """The reference norm (lower median of the pool), the bound (factor x reference) and the
    pool's size, for the round's metrics and log."""

    reference: float
    bound: float
    pool: int


def lower_median(values: Sequence[float]) -> float:
    """The middle value of ``values``, the smaller middle one for an even count."""
    if not values:
        raise ValueError("lower_median of no values")
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def norm_bound(
    round_norms: Sequence[float], history: Sequence[float], factor: float
) -> NormBound | None:
    """The bound for this round's updates, or None when the pool holds fewer than two non-zero
    norms (a lone first reply: nothing to compare it with).

    ``factor`` must be >= 1 (a bound below the reference would reject half of any round).
    """
    if not factor >= 1.0 or not math.isfinite(factor):
        raise ValueError(f"factor must be a finite number >= 1, got {factor}")
    pool = [*round_norms, *history]
    if any(not math.isfinite(value) or value < 0 for value in pool):
        raise ValueError("norms must be finite and >= 0")
    pool = [value for value in pool if value > 0]
    if len(pool) < 2:
        return None
    reference = lower_median(pool)
    return NormBound(reference=reference, bound=factor * reference, pool=len(pool))


def clip_scale(norm: float, bound: float) -> float:
    """What to multiply an update of ``norm`` by so that its norm is at most ``bound`` (1 when it
    already is; 0 for a zero bound)."""
    if norm <= bound:
        return 1.0
    return bound / norm
