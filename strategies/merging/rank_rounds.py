"""One round of sites at different LoRA ranks (issue 16): the merge of their updates.

Pure tensor functions for one module; no Flower, no I/O. What each site is sent, and why the
global is kept factored at the largest rank, is ``ranks``'s part.

One round, mixed ranks
----------------------
Client t (rank r_t, weight p_t, sum p_t = 1) was sent (B_Gt, A_Gt) and returns (B_t, A_t). Its
true update is U_t = B_t A_t - B_Gt A_Gt, a d_out x d_in matrix whatever r_t is, so methods that
merge products take mixed ranks:

- exact-mean: M = sum_t p_t U_t; the new global is P = B_G A_G + eta M factored back to the
  target rank (default the largest in use) by ``truncate_product``, never forming P;
- svd (FlexLoRA, Bai et al. NeurIPS 2024): the same M and the same truncation, one code path
  (``ExactMean`` is ``SvdMerge``'s base class): FlexLoRA's merge is the truncated weighted mean,
  and its heterogeneity is the broadcast rule above. The paper averages the sites' full
  products, P_flex = sum_t p_t B_t A_t (``target="adapter"`` in ``rounds.py``); the round form
  here steps by the updates, and the two differ by eta (B_G A_G - sum_t p_t B_Gt A_Gt), the part
  of the global that lower-rank sites were not sent, times their weight. FlexLoRA's form shrinks
  the global's trailing directions by that weight every round; this one keeps them. With every
  site at r_G the difference is zero;
- paper-equation RobustMerge: M = sum_t lambda_t [dB^_t diag(c_t) A_t + B_Gt diag(c_t) dA^_t]
  with each client's own pruning and complementary scale s_t (length r_t). Direction i exists
  only for the T_i clients with r_t > i (the received directions are nested, the leading ones of
  the same balanced global), so the per-direction normalisation becomes
      c_t[i] = s_t[i] / (T * mean_{u: r_u > i} s_u[i]) = (T_i / T) s_t[i] / sum_{u: r_u > i} s_u[i].
  At equal ranks T_i = T and this is the paper's s_t / sum_u s_u. With keep-ratio 1 (s = 1) it
  gives c_t = 1/T and M = lambda sum_t p_t U_t, the lambda-scaled exact mean, as at equal ranks
  (docs/algorithm.md, "Paper-equation in rounds"). The other reading, normalising over the
  owners only (c = s / sum_owners s), would step direction i T / T_i times as far as the exact
  mean even with nothing pruned: a rank reweighting hidden in the pruning method, so not taken.
- zero padding (HetLoRA-style baseline, Cho et al. EMNLP 2024): each client's factor deltas
  (against the leading r_t directions it was sent) are zero-padded to the target rank and
  averaged factor-wise: B <- B_G + eta sum_t p_t pad(dB_t), A likewise. At equal ranks this is
  fedavg's round form. The report gives its distance from the exact mean's P.

The equal-rank path of ``rounds.merge_round`` is the special case: with every r_t = r_G the
terms handed to ``truncate_product`` are the same tensors, and the new global is bit for bit the
same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from strategies.merging.api import normalised_weights
from strategies.merging.errors import MergeInputError
from strategies.merging.exact_mean import ExactMean
from strategies.merging.lowrank import low_rank_energy, truncate_product
from strategies.merging.method import MergeMethod, task_coefficients
from strategies.merging.ranks import (
    Factors,
    MixedRankError,
    check_pair,
    check_rank,
    mixed_rank_support,
    slice_to_rank,
    truncate_to_rank,
)
from strategies.merging.robustmerge import RobustMerge
from strategies.merging.server_step import ServerStep


@dataclass(frozen=True)
class MixedRankMerge:
    """The new global pair of one module after a mixed-rank round.

    ``b`` (d_out x rank) and ``a`` (rank x d_in) are float32. ``relative_error`` is
    ||B A - P||_F / ||P||_F and ``update_relative_error`` ||B A - P||_F / ||eta M||_F, with
    P = B_G A_G + eta M the full-rank result of the method (for ``merge_zero_padded``: of the
    exact mean, so they measure the baseline's gap from it). The energies (squared norms) let
    a caller sum over modules the way ``rounds.merge_round`` does.
    """

    b: torch.Tensor
    a: torch.Tensor
    relative_error: float
    update_relative_error: float
    dropped_energy: float
    total_energy: float
    update_energy: float


def mixed_rank_update_terms(
    method: MergeMethod,
    a_global: torch.Tensor,
    b_global: torch.Tensor,
    a_clients: Sequence[torch.Tensor],
    b_clients: Sequence[torch.Tensor],
    weights: torch.Tensor,
    *,
    sent: Mapping[int, Factors] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank factors (L: d_out x K, R: K x d_in) of the round update M = L @ R, clients of
    mixed ranks (client t: A_t r_t x d_in, B_t d_out x r_t; ``weights``: p, normalised).

    ``sent`` maps each rank to the (B, A) its sites were sent; by default
    ``truncate_to_rank(B_G, A_G, r)``. Clients are grouped by rank and each group goes through the
    method's own ``update_terms`` where the method is separable over clients (exact-mean, svd:
    group k contributes P_k * update_terms(sent_k, group k, p / P_k), P_k its total weight), so
    K = sum_t r_t + sum over distinct ranks. Paper-equation RobustMerge couples clients through
    its per-direction normalisation, so its terms are assembled here from the method's own
    ``prune_and_scale`` (see the module docstring). With one rank in use this hands back
    ``method.update_terms`` of all clients unchanged. Tensors: float32 on one device (what
    ``merge_mixed_ranks`` passes).
    """
    support = mixed_rank_support(method)
    if not support.mixed_ranks:
        raise MixedRankError(support.reason)
    ranks = [int(a.shape[0]) for a in a_clients]
    groups = _rank_groups(ranks)
    sent_pairs = {
        rank: _sent_pair(b_global, a_global, rank, sent)
        for rank in groups  # sorted ascending
    }
    if isinstance(method, RobustMerge):
        return _equation_terms(method, a_clients, b_clients, weights, groups, sent_pairs)
    left_parts: list[torch.Tensor] = []
    right_parts: list[torch.Tensor] = []
    for rank, members in groups.items():
        b_sent, a_sent = sent_pairs[rank]
        share = weights[members]
        if len(groups) == 1:
            left, right = method.update_terms(
                a_sent, b_sent, _stack(a_clients, members), _stack(b_clients, members), share
            )
        else:
            total = share.sum()
            if float(total) == 0.0:
                continue  # a rank whose clients all weigh zero adds nothing
            left, right = method.update_terms(
                a_sent,
                b_sent,
                _stack(a_clients, members),
                _stack(b_clients, members),
                share / total,
            )
            left = left * total
        left_parts.append(left)
        right_parts.append(right)
    return torch.cat(left_parts, dim=1), torch.cat(right_parts, dim=0)


def merge_mixed_ranks(
    method: MergeMethod,
    a_global: torch.Tensor,
    b_global: torch.Tensor,
    a_clients: Sequence[torch.Tensor],
    b_clients: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    server_lr: float = 1.0,
    rank: int | None = None,
    sent: Mapping[int, Factors] | None = None,
    labels: Sequence[int | str] | None = None,
) -> MixedRankMerge:
    """One module's new global after a round whose clients trained different ranks.

    P = B_G A_G + eta M (M from ``mixed_rank_update_terms``), factored back to ``rank``
    (default: the largest of the global's and the clients' ranks) by ``truncate_product``, the
    same call ``rounds.merge_round`` makes, so equal ranks give its result bit for bit.
    ``method``: exact-mean, svd or paper-equation RobustMerge in its round form. ``weights``:
    per-client weights, normalised here (equal when None). Tensors are used as float32 on the
    global's device.
    """
    a_g, b_g, a_list, b_list = _checked_round(a_global, b_global, a_clients, b_clients, labels)
    target = _target_rank(a_g, a_list, rank)
    p = normalised_weights(weights, len(a_list), a_g.device)
    left, right = mixed_rank_update_terms(method, a_g, b_g, a_list, b_list, p, sent=sent)
    step_left = ServerStep(server_lr).scale_update(left)
    pair = truncate_product(
        torch.cat([b_g, step_left], dim=1), torch.cat([a_g, right], dim=0), target
    )
    update_energy = low_rank_energy(step_left, right)
    dropped = pair.truncated_energy
    return MixedRankMerge(
        b=pair.b,
        a=pair.a,
        relative_error=pair.relative_error if pair.relative_error is not None else 0.0,
        update_relative_error=(dropped / update_energy) ** 0.5 if update_energy > 0 else 0.0,
        dropped_energy=dropped,
        total_energy=pair.total_energy,
        update_energy=update_energy,
    )


def merge_zero_padded(
    a_global: torch.Tensor,
    b_global: torch.Tensor,
    a_clients: Sequence[torch.Tensor],
    b_clients: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    server_lr: float = 1.0,
    rank: int | None = None,
    labels: Sequence[int | str] | None = None,
) -> MixedRankMerge:
    """The zero-padding baseline (HetLoRA-style): factor-wise mean of zero-padded deltas.

    Client t was sent the leading r_t directions of the global (``slice_to_rank``); its deltas
    dB_t = B_t - B_G[:, :r_t], dA_t = A_t - A_G[:r_t] are zero-padded to ``rank`` (default: the
    largest in use; at least every client's) and B <- B_G + eta sum_t p_t pad(dB_t), A likewise.
    At equal ranks this is fedavg's round form. The errors report the gap from the exact mean's
    P = B_G A_G + eta sum_t p_t (B_t A_t - B_Gt A_Gt), with the same sent factors.
    """
    a_g, b_g, a_list, b_list = _checked_round(a_global, b_global, a_clients, b_clients, labels)
    target = _target_rank(a_g, a_list, rank)
    widest = max(a.shape[0] for a in a_list)
    if target < widest:
        raise MergeInputError(
            f"rank {target} is below a client's rank {widest}: zero-padding cannot shrink a "
            f"client's factors; pass rank >= {widest} (or leave it None)"
        )
    p = normalised_weights(weights, len(a_list), a_g.device)
    b_new, a_new = slice_to_rank(b_g, a_g, target)
    b_step = torch.zeros_like(b_new)
    a_step = torch.zeros_like(a_new)
    for share, a_t, b_t in zip(p, a_list, b_list, strict=True):
        r_t = a_t.shape[0]
        b_sent, a_sent = slice_to_rank(b_g, a_g, r_t)
        b_step[:, :r_t] += share * (b_t - b_sent)
        a_step[:r_t] += share * (a_t - a_sent)
    step = ServerStep(server_lr)
    b_new = step.moved_by(b_new, b_step)
    a_new = step.moved_by(a_new, a_step)
    sent = {r: slice_to_rank(b_g, a_g, r) for r in {a.shape[0] for a in a_list}}
    left, right = mixed_rank_update_terms(ExactMean(), a_g, b_g, a_list, b_list, p, sent=sent)
    step_left = ServerStep(server_lr).scale_update(left)
    gap = max(
        low_rank_energy(
            torch.cat([b_new, -b_g, -step_left], dim=1), torch.cat([a_new, a_g, right], dim=0)
        ),
        0.0,
    )
    total = low_rank_energy(torch.cat([b_g, step_left], dim=1), torch.cat([a_g, right], dim=0))
    update_energy = low_rank_energy(step_left, right)
    return MixedRankMerge(
        b=b_new,
        a=a_new,
        relative_error=(gap / total) ** 0.5 if total > 0 else 0.0,
        update_relative_error=(gap / update_energy) ** 0.5 if update_energy > 0 else 0.0,
        dropped_energy=gap,
        total_energy=total,
        update_energy=update_energy,
    )


def _equation_terms(
    method: RobustMerge,
    a_clients: Sequence[torch.Tensor],
    b_clients: Sequence[torch.Tensor],
    weights: torch.Tensor,
    groups: dict[int, list[int]],
    sent_pairs: dict[int, Factors],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper-equation RobustMerge's round terms over mixed ranks, in ``update_terms``'s layout.

    Per rank group: prune the deltas against what the group was sent and take each client's
    complementary scale (``method.prune_and_scale``, per client). Then
    share_t[i] = lambda_t * s_t[i] * (T_i / T) / sum_{u: r_u > i} s_u[i], and the group adds
    [dB^ diag(share) | B_sent] @ [A_t; sum_t diag(share_t) dA^_t].
    """
    count = len(a_clients)
    widest = max(groups)
    lambdas = task_coefficients(method.fuse_weight, weights)
    pruned: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    scales = torch.zeros(count, widest, dtype=weights.dtype, device=weights.device)
    owners = torch.zeros(count, widest, dtype=weights.dtype, device=weights.device)
    for rank, members in groups.items():
        b_sent, a_sent = sent_pairs[rank]
        a_delta = _stack(a_clients, members) - a_sent
        b_delta = _stack(b_clients, members) - b_sent
        pruned[rank] = method.prune_and_scale(a_delta, b_delta)
        scales[members, :rank] = pruned[rank][2]
        owners[members, :rank] = 1.0
    present = owners.sum(dim=0) / count  # T_i / T
    denominator = scales.sum(dim=0)
    left_parts: list[torch.Tensor] = []
    right_parts: list[torch.Tensor] = []
    for rank, members in groups.items():
        b_sent, _ = sent_pairs[rank]
        a_pruned, b_pruned, scale = pruned[rank]
        share = lambdas[members][:, None] * scale * present[:rank] / denominator[:rank]
        size = len(members)
        a_stack = _stack(a_clients, members)
        left = (b_pruned * share[:, None, :]).permute(1, 0, 2).reshape(-1, size * rank)
        carried = (a_pruned * share[:, :, None]).sum(dim=0)
        left_parts += [left, b_sent]
        right_parts += [a_stack.reshape(size * rank, -1), carried]
    return torch.cat(left_parts, dim=1), torch.cat(right_parts, dim=0)


def _rank_groups(ranks: Sequence[int]) -> dict[int, list[int]]:
    """Client indices by rank, ranks ascending, clients in input order within a rank."""
    groups: dict[int, list[int]] = {}
    for index, rank in sorted(enumerate(ranks), key=lambda item: (item[1], item[0])):
        groups.setdefault(rank, []).append(index)
    return groups


def _sent_pair(
    b_global: torch.Tensor, a_global: torch.Tensor, rank: int, sent: Mapping[int, Factors] | None
) -> Factors:
    if sent is None:
        pair = truncate_to_rank(b_global, a_global, rank)
        return pair.b.to(b_global.device), pair.a.to(a_global.device)
    if rank not in sent:
        raise MergeInputError(
            f"no sent factors for rank {rank}: sent has ranks {sorted(sent)}; give the (B, A) "
            "that sites of every rank in the round were sent, or None to recompute them"
        )
    b_sent, a_sent = sent[rank]
    if tuple(b_sent.shape) != (b_global.shape[0], rank) or tuple(a_sent.shape) != (
        rank,
        a_global.shape[1],
    ):
        raise MergeInputError(
            f"sent factors for rank {rank} have shapes B {tuple(b_sent.shape)}, A "
            f"{tuple(a_sent.shape)}; expected B ({b_global.shape[0]}, {rank}), "
            f"A ({rank}, {a_global.shape[1]})"
        )
    return b_sent.to(torch.float32), a_sent.to(torch.float32)


def _stack(tensors: Sequence[torch.Tensor], members: Sequence[int]) -> torch.Tensor:
    return torch.stack([tensors[index] for index in members])


def _target_rank(
    a_global: torch.Tensor, a_clients: Sequence[torch.Tensor], rank: int | None
) -> int:
    if rank is None:
        return max([a_global.shape[0], *(a.shape[0] for a in a_clients)])
    check_rank(rank)
    return rank


def _checked_round(
    a_global: torch.Tensor,
    b_global: torch.Tensor,
    a_clients: Sequence[torch.Tensor],
    b_clients: Sequence[torch.Tensor],
    labels: Sequence[int | str] | None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Float32 copies on the global's device; every client's (B_t, A_t) checked against it."""
    check_pair(b_global, a_global)
    if len(a_clients) == 0:
        raise MergeInputError("nothing to merge: zero clients were given")
    if len(a_clients) != len(b_clients):
        raise MergeInputError(
            f"{len(a_clients)} A factors but {len(b_clients)} B factors; give one of each per "
            "client"
        )
    if labels is not None and len(labels) != len(a_clients):
        raise MergeInputError(f"labels has {len(labels)} entries for {len(a_clients)} clients")
    names: Sequence[int | str] = labels if labels is not None else range(len(a_clients))
    device = a_global.device
    d_out, d_in = b_global.shape[0], a_global.shape[1]
    a_list: list[torch.Tensor] = []
    b_list: list[torch.Tensor] = []
    for name, a_t, b_t in zip(names, a_clients, b_clients, strict=True):
        if a_t.dim() != 2 or b_t.dim() != 2 or b_t.shape[1] != a_t.shape[0] or a_t.shape[0] < 1:
            raise MergeInputError(
                f"expected B (d_out x r_t) and A (r_t x d_in) with one r_t >= 1; got B "
                f"{tuple(b_t.shape)} and A {tuple(a_t.shape)}",
                adapter=name,
            )
        if a_t.shape[1] != d_in or b_t.shape[0] != d_out:
            raise MergeInputError(
                f"module is {d_out} x {d_in} in the global but B {tuple(b_t.shape)}, A "
                f"{tuple(a_t.shape)} here; a client's rank may differ, its module's size may not",
                adapter=name,
            )
        a_list.append(a_t.detach().to(device=device, dtype=torch.float32))
        b_list.append(b_t.detach().to(device=device, dtype=torch.float32))
    a_g = a_global.detach().to(dtype=torch.float32)
    b_g = b_global.detach().to(dtype=torch.float32)
    return a_g, b_g, a_list, b_list
