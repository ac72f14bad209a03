"""Direction-robustness diagnostics: does the merged update keep each client's top directions?

RobustMerge's claim is that LoRA's few large singular directions are task-specific and must
survive the merge. For one module, a client's update is U_t = B_t A_t - B_g A_g (its trained
product minus the global one) and the merged update is M = B_m A_m - B_g A_g. With U_t's top-k
singular triplets (sigma_i, u_i, v_i):

- cosine: cos(P(U_t), P(M)), P projecting onto span(u_1..u_k) x span(v_1..v_k), i.e. how well
  the merged update points along the client's top directions;
- retained: sum_i u_i^T M v_i / sum_i sigma_i, the fraction of the client's top singular values
  that the merged update still carries along those directions (1 = all, 0 = none, < 0 = reversed).

Both are computed from the low-rank factors (QR of [B_t, -B_g] and [A_t; A_g]), never forming
a d_out x d_in matrix's SVD, so they stay cheap for 7B-sized modules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from strategies.merging.lora_keys import parse_layout
from strategies.merging.lowrank import low_rank_energy


@dataclass(frozen=True)
class DirectionScore:
    """Cosine and retained fraction of one client's top-k directions in one module."""

    cosine: float
    retained: float


def _low_rank_difference(
    b_new: torch.Tensor, a_new: torch.Tensor, b_old: torch.Tensor, a_old: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (L, R) with L @ R = b_new @ a_new - b_old @ a_old."""
    return torch.cat([b_new, -b_old], dim=1), torch.cat([a_new, a_old], dim=0)


def direction_score(
    client: tuple[torch.Tensor, torch.Tensor],
    merged: tuple[torch.Tensor, torch.Tensor],
    reference: tuple[torch.Tensor, torch.Tensor],
    top_k: int = 4,
) -> DirectionScore | None:
    """Score one client's module; pairs are (A, B). None when the client's update is zero."""
    a_ref, b_ref = (t.to(torch.float64) for t in reference)
    a_cli, b_cli = (t.to(torch.float64) for t in client)
    a_mrg, b_mrg = (t.to(torch.float64) for t in merged)
    left, right = _low_rank_difference(b_cli, a_cli, b_ref, a_ref)
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    u_core, sigma, vh_core = torch.linalg.svd(r_left @ r_right.T)
    k = min(top_k, int((sigma > sigma[0] * 1e-12).sum())) if sigma.numel() and sigma[0] > 0 else 0
    if k == 0:
        return None
    u = q_left @ u_core[:, :k]
    v = q_right @ vh_core[:k].T
    m_left, m_right = _low_rank_difference(b_mrg, a_mrg, b_ref, a_ref)
    projected = (u.T @ m_left) @ (m_right @ v)
    top = sigma[:k]
    along = torch.diagonal(projected)
    norm = float(projected.norm())
    cosine = float((top * along).sum()) / (float(top.norm()) * norm) if norm > 0 else 0.0
    retained = float(along.sum() / top.sum())
    return DirectionScore(cosine=cosine, retained=retained)


@dataclass(frozen=True)
class FactorwiseGap:
    """Squared Frobenius norms, one module: ``gap`` = ||factor-wise mean - exact mean||^2 of the
    updates, ``exact`` = ||exact mean update||^2 (sum them over modules, then take the root)."""

    gap: float
    exact: float


def factorwise_gap(
    global_factors: tuple[torch.Tensor, torch.Tensor],
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    weights: torch.Tensor,
) -> FactorwiseGap:
    """How far averaging A and B separately is from averaging the updates, for one module.

    global_factors is (A_G, B_G); stacks are the clients' full factors (T x r x d_in,
    T x d_out x r); weights p sum to 1. The factor-wise mean's product minus the exact mean
    sum_t p_t B_t A_t is -sum_t p_t (B_t - B_mean)(A_t - A_mean), a weighted covariance of the
    factors; the exact mean update is sum_t p_t B_t A_t - B_G A_G. Both from low-rank factors.
    """
    a_global, b_global = (t.to(torch.float64) for t in global_factors)
    a64 = a_stack.to(torch.float64)  # no copy for float64 stacks (``score_directions``' own)
    b64 = b_stack.to(torch.float64)
    p = weights.to(torch.float64)
    count, rank, _ = a64.shape
    # One float64 working copy of the stacks at a time: the exact mean's factors first, freed
    # before the centred ones are formed (at 8 clients of a 7B MLP module each copy is 15 MB).
    exact_left = torch.cat([_blocks(b64 * p[:, None, None]), -b_global], dim=1)
    exact_right = torch.cat([a64.reshape(count * rank, -1), a_global], dim=0)
    exact = low_rank_energy(exact_left, exact_right)
    del exact_left, exact_right
    a_centred = a64 - torch.tensordot(p, a64, dims=1)
    b_centred = (b64 - torch.tensordot(p, b64, dims=1)).mul_(p[:, None, None])
    gap = low_rank_energy(_blocks(b_centred), a_centred.reshape(count * rank, -1))
    return FactorwiseGap(gap=gap, exact=exact)


def _blocks(b_stack: torch.Tensor) -> torch.Tensor:
    """[B_1 | ... | B_T]: the stack's B factors side by side (d_out x T r); a view, not a copy,
    when the stack is laid out d_out x T x r in memory (as ``score_directions`` builds it)."""
    return b_stack.permute(1, 0, 2).reshape(b_stack.shape[1], -1)


def shared_a_similarity(adapters: Sequence[Mapping[str, torch.Tensor]]) -> float | None:
    """Mean cosine similarity of the adapters' A factors with the first adapter's (all modules).

    Near 1 when the adapters started from one initial adapter and moved little, as federated
    clients' do: then RobustMerge's paper-exact A_m = sum_t lambda A^_t is about lambda T times
    one adapter's, where the paper's independently initialised adapters partly cancel. None for
    fewer than two adapters or no LoRA module.
    """
    if len(adapters) < 2:
        return None
    modules = parse_layout(adapters[0]).modules
    if not modules:
        return None
    first = torch.cat([adapters[0][m.a_key].detach().flatten().double() for m in modules])
    similarities = []
    for adapter in adapters[1:]:
        other = torch.cat([adapter[m.a_key].detach().flatten().double() for m in modules])
        similarities.append(float(torch.nn.functional.cosine_similarity(first, other, dim=0)))
    return sum(similarities) / len(similarities)
