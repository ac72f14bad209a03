"""What in the clients' updates might predict whether an aggregation method pays (issue 31).

What and why
------------
Merging methods differ from FedAvg only where the clients' updates differ: when every client
sends nearly the same update, every rule returns nearly the same merge. The regime map records,
per round, three signals computed here from the round's start (the global every client
received) and the clients' trained adapters, all in the *product space* of LoRA, where an
update is what it does to the model: the update of module m of client i is

    dW_i[m] = B_i[m] A_i[m] - B_0[m] A_0[m]                     (B: d_out x r, A: r x d_in)

- ``mean_pairwise_cosine``: the mean over client pairs of cos(dW_i, dW_j), each update
  flattened over all modules (1: all agree; 0: orthogonal updates; below 0: they conflict);
- ``factorwise_gap``: || mean_i(B_i) mean_i(A_i) - mean_i(B_i A_i) || / || mean_i(dW_i) ||, the
  part of FedAvg's merge (averaging A and B separately) that is not the mean update, relative
  to the mean update; the Frobenius norm over all modules; unweighted means;
- ``step_norm``: || W_new - W_old || over all modules, the server's step in product space,
  so the report can compare the step sizes that the methods' tuned settings take.

Pure functions on tensors, float64 throughout; no Flower, no I/O.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch

from strategies.merging import parse_layout

Adapter = Mapping[str, torch.Tensor]


def products(adapter: Adapter) -> dict[str, torch.Tensor]:
    """B A per LoRA module of ``adapter`` (float64), by module name."""
    layout = parse_layout(adapter.keys())
    return {
        m.name: adapter[m.b_key].to(torch.float64) @ adapter[m.a_key].to(torch.float64)
        for m in layout.modules
    }


def flat_update(start: Adapter, trained: Adapter) -> torch.Tensor:
    """One client's product-space update, every module flattened into one vector (in the
    modules' name order)."""
    before, after = products(start), products(trained)
    if before.keys() != after.keys():
        raise ValueError("start and trained adapters have different LoRA modules")
    return torch.cat([(after[name] - before[name]).flatten() for name in sorted(before)])


def mean_pairwise_cosine(updates: Sequence[torch.Tensor]) -> float:
    """Mean of cos(u_i, u_j) over the pairs i < j (NaN with fewer than two updates or a zero
    update, which has no direction)."""
    if len(updates) < 2:
        return math.nan
    norms = [float(torch.linalg.vector_norm(u)) for u in updates]
    if min(norms) == 0.0:
        return math.nan
    cosines = [
        float(torch.dot(updates[i], updates[j])) / (norms[i] * norms[j])
        for i, j in itertools.combinations(range(len(updates)), 2)
    ]
    return sum(cosines) / len(cosines)


def factorwise_gap(start: Adapter, trained: Sequence[Adapter]) -> float:
    """|| mean(B) mean(A) - mean(BA) || / || mean(BA) - B_0 A_0 || over all modules (see the
    module docstring); NaN when the mean update is zero."""
    if not trained:
        return math.nan
    layout = parse_layout(start.keys())
    gap_sq = 0.0
    mean_sq = 0.0
    before = products(start)
    for module in layout.modules:
        a = torch.stack([t[module.a_key].to(torch.float64) for t in trained])
        b = torch.stack([t[module.b_key].to(torch.float64) for t in trained])
        exact = torch.einsum("tor,tri->oi", b, a) / len(trained)
        factorwise = b.mean(dim=0) @ a.mean(dim=0)
        gap_sq += float(torch.sum((factorwise - exact) ** 2))
        mean_sq += float(torch.sum((exact - before[module.name]) ** 2))
    if mean_sq == 0.0:
        return math.nan
    return math.sqrt(gap_sq / mean_sq)


def step_norm(old: Adapter, new: Adapter) -> float:
    """|| W_new - W_old || in product space, over all modules (Frobenius)."""
    return float(torch.linalg.vector_norm(flat_update(old, new)))
