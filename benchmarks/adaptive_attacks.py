"""Adaptive attacks' math: pure tensor functions on the round's honest updates (no Flower).

Threat model (omniscient, colluding): the hostile sites see every honest client's update of
the round (the honest stack, ``n_h x d``, one flattened update per row), know the defence in use
and its settings (``robust-aggregation``, ``robust-norm-factor``, ``robust-history``), and send
the same malicious update from every hostile site. This is the strongest attacker the
literature measures defences with; a real one who sees less does no better.

- **ALIE** (Baruch et al., *A Little Is Enough*, NeurIPS 2019): per coordinate,
  ``mean - z * std`` of the honest updates, with the paper's
  ``s = floor(n / 2 + 1) - m`` and ``z = Phi^-1((n - s) / n)`` for n clients of which m are
  hostile (``alie_z``): the largest shift that still leaves s honest clients further from the
  mean than the attackers. The std is the unbiased one (``torch.std``), as in Shejwalkar and
  Houmansadr's reimplementation.
- **IPM** (Xie et al., *Fall of Empires*, UAI 2020): ``-epsilon * mean``: a small epsilon hides
  among the honest updates, a large one reverses the round.
- **Min-max / min-sum** (Shejwalkar and Houmansadr, *Manipulating the Byzantine*, NDSS 2021):
  ``mean + gamma * p`` with p the perturbation (``-mean / ||mean||``, "unit-mean", or ``-std``)
  and the largest gamma such that the malicious update's largest distance to an honest one stays
  within the largest honest pairwise distance (min-max), or its sum of squared distances to the
  honest ones within the largest such sum of an honest update (min-sum). gamma = 0 (the mean)
  always satisfies both, and the distances grow convexly in gamma, so the feasible gammas are
  an interval [0, gamma*] and ``largest_feasible`` finds gamma* by doubling then bisection.
  Implementation note: the paper's code bisects from gamma = 10 with a fixed step, which cannot
  pass 20; here the upper end is doubled until infeasible first, so gamma* of any size is found.
- **Under the screen's bound** (``screen_bound``, ``scale_to``): the default norm screen
  (``strategies.robust.norm_screen``) rejects an update whose norm exceeds
  ``factor x lower_median(pool)``. The pool is the round's update norms (the hostile ones
  included) plus the history of earlier rounds' accepted norms, except in a streamed round (the
  plain screen once the history holds two norms), whose pool is the history alone. An attacker
  that knows the honest norms and the history places its own norms at the top of the pool
  (they are above the median as long as they are fewer than half of it) and sends
  ``UNDER x bound``: the screen passes it, 1.01 x the bound it rejects.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence

import torch

from strategies.robust import norm_bound

# Hostile updates are sent at this fraction of the screen's bound: just under it, with room for
# the float32 rounding of global + update - global on the server.
UNDER = 0.99


def flatten(update: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    """One float64 vector of ``update``'s tensors in ``keys`` order."""
    return torch.cat([update[key].reshape(-1).to(torch.float64) for key in keys])


def unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``vector`` cut back into ``like``'s keys, shapes and dtypes (the inverse of ``flatten``)."""
    total = sum(value.numel() for value in like.values())
    if total != vector.numel():
        raise ValueError(f"vector has {vector.numel()} values, the adapter {total}")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for key, value in like.items():
        size = value.numel()
        out[key] = vector[offset : offset + size].reshape(value.shape).to(value.dtype)
        offset += size
    return out


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """||update||, Frobenius over every tensor, summed key by key in float64 as the server's
    screen does (``strategies.robust_replies.update_norm``)."""
    squared = sum(float(value.to(torch.float64).square().sum()) for value in update.values())
    return float(squared**0.5)


def alie_z(clients: int, hostile: int) -> float:
    """ALIE's z for n = ``clients`` of which m = ``hostile``: s = floor(n / 2 + 1) - m,
    z = Phi^-1((n - s) / n) (0 when s >= n / 2: the mean itself)."""
    if not 0 < hostile < clients:
        raise ValueError(f"need 0 < hostile < clients, got {hostile} of {clients}")
    supporters = math.floor(clients / 2 + 1) - hostile
    return statistics.NormalDist().inv_cdf((clients - supporters) / clients)


def alie(honest: torch.Tensor, z: float) -> torch.Tensor:
    """ALIE's update: per coordinate mean - z * std of the honest stack (n_h x d, n_h >= 2)."""
    return honest.mean(dim=0) - z * honest.std(dim=0)


def ipm(honest: torch.Tensor, epsilon: float) -> torch.Tensor:
    """IPM's update: -epsilon x the honest mean (inner product with the mean negative)."""
    return -epsilon * honest.mean(dim=0)


def perturbation(honest: torch.Tensor, kind: str) -> torch.Tensor:
    """Min-max / min-sum's direction p: ``"unit-mean"`` -mean / ||mean|| or ``"std"`` -std."""
    if kind == "unit-mean":
        mean = honest.mean(dim=0)
        return -mean / max(float(mean.norm()), 1e-30)
    if kind == "std":
        return -honest.std(dim=0)
    raise ValueError(f"perturbation must be 'unit-mean' or 'std', got {kind!r}")


def largest_feasible(
    feasible: Callable[[float], bool], start: float = 1.0, tolerance: float = 1e-5
) -> float:
    """The largest gamma >= 0 with ``feasible(gamma)``, to within ``tolerance`` x the bracket's
    upper end; ``feasible(0)`` must hold and the feasible set be an interval [0, gamma*].

    Doubles ``start`` until infeasible (at most 200 times: an unbounded set returns the last
    feasible point), then bisects (at most 200 times: gamma* = 0 gives 0); the result is always
    a feasible point.
    """
    low, high = 0.0, start
    for _ in range(200):
        if not feasible(high):
            break
        low, high = high, 2.0 * high
    else:
        return low
    for _ in range(200):  # a gamma* of 0 never meets the relative tolerance
        if high - low <= tolerance * high:
            break
        middle = (low + high) / 2.0
        if feasible(middle):
            low = middle
        else:
            high = middle
    return low


def _squared_distances(stack: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    return (stack - point).square().sum(dim=1)


def _pairwise_squared(stack: torch.Tensor) -> torch.Tensor:
    return torch.cdist(stack, stack, compute_mode="donot_use_mm_for_euclid_dist").square()


def min_max_gamma(honest: torch.Tensor, direction: torch.Tensor, tolerance: float = 1e-5) -> float:
    """Min-max's gamma: the largest with max_i ||mean + gamma p - g_i|| <= max_ij ||g_i - g_j||."""
    mean = honest.mean(dim=0)
    limit = float(_pairwise_squared(honest).max())

    def feasible(gamma: float) -> bool:
        return float(_squared_distances(honest, mean + gamma * direction).max()) <= limit

    return largest_feasible(feasible, tolerance=tolerance)


def min_sum_gamma(honest: torch.Tensor, direction: torch.Tensor, tolerance: float = 1e-5) -> float:
    """Min-sum's gamma: the largest with sum_i ||mean + gamma p - g_i||^2 <=
    max_i sum_j ||g_i - g_j||^2."""
    mean = honest.mean(dim=0)
    limit = float(_pairwise_squared(honest).sum(dim=1).max())

    def feasible(gamma: float) -> bool:
        return float(_squared_distances(honest, mean + gamma * direction).sum()) <= limit

    return largest_feasible(feasible, tolerance=tolerance)


def min_max(honest: torch.Tensor, kind: str = "unit-mean") -> torch.Tensor:
    """Min-max's update: mean + gamma* p (``perturbation(kind)``, ``min_max_gamma``)."""
    direction = perturbation(honest, kind)
    return honest.mean(dim=0) + min_max_gamma(honest, direction) * direction


def min_sum(honest: torch.Tensor, kind: str = "unit-mean") -> torch.Tensor:
    """Min-sum's update: mean + gamma* p (``perturbation(kind)``, ``min_sum_gamma``)."""
    direction = perturbation(honest, kind)
    return honest.mean(dim=0) + min_sum_gamma(honest, direction) * direction


def screen_bound(
    honest_norms: Sequence[float],
    history: Sequence[float],
    hostile: int,
    factor: float,
    streamed: bool,
    pool: int | None = None,
) -> float | None:
    """The bound the norm screen will hold this round's updates to, as the attacker predicts it
    (None: no bound, a lone first reply).

    ``streamed``: the round can stream (the plain screen); with at least two remembered norms it
    is judged against the history alone. Otherwise the pool is the round's norms in arrival
    order, the ``hostile`` ones last and counted at the top (the largest float: they are sent
    near the bound, above the median), plus the history; a streamable round of more than
    ``pool`` replies (``robust-pool``, the first round) is judged by its first ``pool`` replies
    alone.
    """
    if streamed and len(history) >= 2:
        bound = norm_bound([], history, factor)
    else:
        norms = [*honest_norms, *([sys.float_info.max] * hostile)]
        if streamed and pool is not None and len(norms) > pool:
            norms = norms[:pool]
        bound = norm_bound(norms, history, factor)
    return None if bound is None else bound.bound


def scale_to(vector: torch.Tensor, norm: float) -> torch.Tensor:
    """``vector`` rescaled to ``norm`` (a zero vector stays zero)."""
    length = float(vector.norm())
    return vector if length == 0.0 else vector * (norm / length)


def cap_norm(vector: torch.Tensor, bound: float | None, margin: float = UNDER) -> torch.Tensor:
    """``vector`` scaled down to ``margin x bound`` when longer (unchanged when shorter or when
    there is no bound): an attacker that knows the screen stays under it."""
    if bound is None or float(vector.norm()) <= margin * bound:
        return vector
    return scale_to(vector, margin * bound)
