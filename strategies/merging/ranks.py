"""Heterogeneous LoRA ranks: each site trains the rank it can afford (issue 16).

Pure tensor functions for one module; no Flower, no I/O. A module's LoRA pair is B (d_out x r)
and A (r x d_in), and everything here works on the product W = B A as it acts on the model.
PEFT scales a rank-r adapter by alpha/r, which ``rounds.py`` leaves out because every client
shares it; with mixed ranks it differs per site, so the caller folds it in: B_t times
alpha_t / r_t before merging, and a site is sent B divided by its own alpha_t / r_t.

What a site receives
--------------------
The server holds the global (B_G, A_G) at rank r_G, the largest rank in the federation.

- product-space methods (FlexLoRA's rule): a site of rank k < r_G gets
  ``truncate_to_rank(B_G, A_G, k)``, the best rank-k factors of B_G A_G (Eckart-Young),
  balanced: B_k = U_k sqrt(S_k), A_k = sqrt(S_k) V_k^T. A site of rank k >= r_G gets the global's
  own factors zero-padded to k (decision: not a balanced refactorisation, so a site whose rank
  equals the global's receives the global bit for bit, an equal-rank federation is unchanged,
  and paper-equation's pruning of dB_t = B_t - B_G sees the same B_G as ``merge_round``);
- the zero-padding baseline (HetLoRA's rule): the leading k directions, ``slice_to_rank``. For a
  balanced global (what every product-space merge produces) the two rules agree.

A zero-padded direction (zero column of B and zero row of A) is dead for training: the
gradient of B's column is g (A x)^T restricted to that row, zero, and the gradient of A's row is
B's column times g x^T, zero. ``dead_directions`` finds them; the site must initialise those
rows of A (PEFT's Kaiming init, say) before training, which leaves the product unchanged since
the B columns are zero. The same happens when B_G A_G has rank below k, e.g. round 0 with
PEFT's zero B: the truncation of a zero product is all zero, A included.

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

Keep the global factored at r_max, or as a product?
---------------------------------------------------
Factored at r_max (``merge_mixed_ranks`` does that). Measured 2026-11-30 on this project's
2-core CPU VM while a benchmark ran beside it (load 6-8, so the times are loose), one module,
float32, six sites of ranks 4, 4, 8, 8, 16, 16, equal weights, eta 1, ten rounds from a zero
global. Each site "trains" in product space: it returns the rank-r_t truncation of
0.7 W_sent + 0.3 W*_t, W*_t = W* + E_t, W* of rank 32 with singular values 1/i, E_t the site's
own rank-4 part at a fifth of W*'s norm. Sites get the global's rank-r_t truncation; the
product server keeps W <- W + M exactly (the script is not in the repository; the setup above
is all of it).

================================  ==========================  ==========================
384 x 384, r_max 16               factored at r_max           product
================================  ==========================  ==========================
global per module, fp32           48 KiB                      576 KiB (12 x)
round merge, median of 10         74 ms                       254 ms (with one full SVD)
truncation error against P        3.3 % (round 1) -> 0.5 %    0
same, against the step eta M      3 % -> 32 % (step shrinks)  0
final global, factored vs product 6.4 %                       --
a rank-4 / 8 / 16 site receives   0.00 / 0.04 / 2.5 % off the product server's
distance to W* after 10 rounds    0.198                       0.205
================================  ==========================  ==========================

The product ends at numerical rank 45: it keeps the sites' own parts E_t and the tail, which
no site (at most r_max directions) ever receives, and it is no closer to W*. The loss against
the step grows only because the steps shrink as the sites converge; against P it falls.

4096 x 4096 at r_max 16: 512 KiB factored against 64 MiB as a product (128 x); a factored
merge of the six sites took 0.08-1.5 s (three runs, loaded machine); the product server needs
0.9 s for the six dense products and an SVD of the 4096 x 4096 matrix to hand out truncations:
94 s in float32 (0.2 s approximately, with ``torch.svd_lowrank``). A 7B model with LoRA on the
seven projections of 32 layers would hold 6.5e9 floats (26 GB fp32, the model's own size) as
products against 4.0e7 (160 MB) factored at rank 16. Every round reports the truncation
(``relative_error``, ``update_relative_error``), so a federation where it matters shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from strategies.merging.api import normalised_weights
from strategies.merging.errors import MergeInputError
from strategies.merging.exact_mean import ExactMean
from strategies.merging.lora_keys import parse_layout
from strategies.merging.lowrank import low_rank_energy, truncate_product
from strategies.merging.method import MergeMethod, PairMerge, task_coefficients
from strategies.merging.robustmerge import RobustMerge
from strategies.merging.server_step import ServerStep

Factors = tuple[torch.Tensor, torch.Tensor]
"""A LoRA pair as (B: d_out x r, A: r x d_in), in the order of the product B A."""

_FACTORWISE_DETAIL: dict[str, str] = {
    "fedavg": "it averages A_t and B_t entry by entry",
    "ties": "its sign election and disjoint mean run entry by entry over A_t and B_t",
    "dare": "its drop masks and rescaled sums run entry by entry over A_t and B_t",
    "task_arithmetic": "it sums A_t and B_t entry by entry (and has no round form)",
}


class MixedRankError(ValueError):
    """A merge method asked to merge clients of different ranks that it cannot merge."""


@dataclass(frozen=True)
class RankSupport:
    """Whether a merge method takes clients of different LoRA ranks in one round, and why."""

    mixed_ranks: bool
    reason: str


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


def mixed_rank_support(method: MergeMethod) -> RankSupport:
    """Whether ``method`` can merge a round whose clients trained different LoRA ranks.

    Product-space methods (exact-mean, svd, paper-equation RobustMerge) can: a client's update
    B_t A_t - B_Gt A_Gt is d_out x d_in at any rank. Factor-wise methods (fedavg, ties, dare,
    task_arithmetic, paper-exact RobustMerge) cannot: they combine A_t (r_t x d_in) and B_t
    (d_out x r_t) entry by entry, and entries of different ranks do not line up.
    """
    name = str(method.describe().get("method", type(method).__name__))
    if isinstance(method, RobustMerge):
        if method.merges_products():
            return RankSupport(
                True,
                "paper-equation RobustMerge merges the clients' updates as products; each "
                "client's pruning and complementary scale run at its own rank",
            )
        return RankSupport(
            False,
            "paper-exact RobustMerge merges A and B factor-wise (A_t averaged, B normalised per "
            "rank direction), so every client needs the same rank; use merge-mode "
            "'paper-equation', which merges products",
        )
    if isinstance(method, ExactMean):
        return RankSupport(
            True,
            f"{name} merges the products B_t A_t, which are d_out x d_in whatever a client's rank",
        )
    if method.merges_products():
        return RankSupport(
            False,
            f"{name} merges products but has no mixed-rank form yet (known: exact-mean, svd, "
            "robustmerge paper-equation)",
        )
    detail = _FACTORWISE_DETAIL.get(name, "it merges A_t and B_t factor-wise")
    return RankSupport(
        False,
        f"{name} cannot merge clients of different ranks: {detail}, and factors of different "
        "ranks do not line up (zero-padding them is the HetLoRA baseline, merge_zero_padded, not "
        "the mean of the updates); use 'svd', 'exact-mean' or robustmerge 'paper-equation'",
    )


def slice_to_rank(b: torch.Tensor, a: torch.Tensor, rank: int) -> Factors:
    """The leading ``rank`` directions of (B, A), zero-padded when ``rank`` exceeds r (HetLoRA).

    Returns float32 (B: d_out x rank, A: rank x d_in). For a balanced, sorted pair (what
    ``truncate_to_rank`` and ``truncate_product`` return) this is the best rank-``rank`` pair.
    """
    _check_pair(b, a)
    _check_rank(rank)
    kept = min(rank, a.shape[0])
    b_out = torch.zeros(b.shape[0], rank, dtype=torch.float32, device=b.device)
    a_out = torch.zeros(rank, a.shape[1], dtype=torch.float32, device=a.device)
    b_out[:, :kept] = b[:, :kept]
    a_out[:kept] = a[:kept]
    return b_out, a_out


def truncate_to_rank(b: torch.Tensor, a: torch.Tensor, rank: int) -> PairMerge:
    """Rank-``rank`` factors of W = B A (B: d_out x r, A: r x d_in), what a site of that rank gets.

    ``rank`` < r: the best rank-``rank`` approximation, B_k = U_k sqrt(S_k), A_k = sqrt(S_k) V_k^T,
    from QR of B and A^T and the SVD of an r x r core (``truncate_product``; O((d_out + d_in) r^2),
    W is never formed). ``rank`` >= r: B and A unchanged, zero-padded to ``rank`` (exact; the
    padded directions are dead for training, see ``dead_directions``).

    Returns float32 factors with ``relative_error`` = ||W - B_k A_k||_F / ||W||_F (0 when W = 0)
    and the dropped and total squared norms.
    """
    _check_pair(b, a)
    _check_rank(rank)
    if rank >= a.shape[0]:
        b_out, a_out = slice_to_rank(b, a, rank)
        total = low_rank_energy(b, a)
        return PairMerge(a=a_out, b=b_out, relative_error=0.0, total_energy=total)
    return truncate_product(b, a, rank)


def truncate_matrix(weight: torch.Tensor, rank: int) -> PairMerge:
    """Rank-``rank`` balanced factors of a dense d_out x d_in matrix, by its full SVD (float64).

    Same convention as ``truncate_to_rank`` (B = U sqrt(S), A = sqrt(S) V^T, the largest-magnitude
    entry of each column of U positive, zero-padded past min(d_out, d_in)); costs
    O(d_out d_in min(d_out, d_in)), so use it for a global held as a product, not for factors.
    """
    if weight.dim() != 2:
        raise MergeInputError(f"weight must be a d_out x d_in matrix, got shape {weight.shape}")
    _check_rank(rank)
    u, s, vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
    kept = min(rank, s.shape[0])
    root = s[:kept].sqrt()
    left = u[:, :kept]
    pivots = left.abs().argmax(dim=0)
    signs = torch.sign(left[pivots, torch.arange(kept, device=weight.device)])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    b = torch.zeros(weight.shape[0], rank, dtype=torch.float64, device=weight.device)
    a = torch.zeros(rank, weight.shape[1], dtype=torch.float64, device=weight.device)
    b[:, :kept] = left * (signs * root)
    a[:kept] = (signs * root)[:, None] * vh[:kept]
    energy = s.square()
    total = float(energy.sum())
    dropped = float(energy[kept:].sum())
    return PairMerge(
        a=a.to(torch.float32),
        b=b.to(torch.float32),
        relative_error=(dropped / total) ** 0.5 if total > 0.0 else 0.0,
        truncated_energy=dropped,
        total_energy=total,
    )


def dead_directions(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Boolean mask (r,) of directions whose B column and A row are both all zero.

    Such a direction gets zero gradients in both factors, so it never trains: a site must
    initialise those rows of A (with B's column still zero the product does not change).
    """
    _check_pair(b, a)
    return (b == 0).all(dim=0) & (a == 0).all(dim=1)


def site_pair(b: torch.Tensor, a: torch.Tensor, rank: int) -> PairMerge:
    """The pair a site of rank ``rank`` starts its round from (what it was "sent").

    ``truncate_to_rank(B, A, rank)``, then every dead direction (``dead_directions``: zero B
    column and zero A row, because B A has rank below ``rank``) takes the global's own A row
    of that index (``slice_to_rank``), so it trains. The product is unchanged (those B columns
    stay zero), so ``relative_error`` is the truncation's. At round 0 (PEFT's B = 0) every
    direction is dead and this is the global's leading ``rank`` rows of A with B = 0, the
    slice; a site whose rank equals the global's gets the global bit for bit. Deterministic,
    so the server recomputes exactly what a site started from. float32.
    """
    pair = truncate_to_rank(b, a, rank)
    dead = dead_directions(pair.b, pair.a)
    if bool(dead.any()):
        _, a_slice = slice_to_rank(b, a, rank)
        a_start = pair.a.clone()
        a_start[dead] = a_slice[dead].to(a_start.device)
        return PairMerge(
            a=a_start,
            b=pair.b,
            relative_error=pair.relative_error,
            truncated_energy=pair.truncated_energy,
            total_energy=pair.total_energy,
        )
    return pair


@dataclass(frozen=True)
class SiteAdapter:
    """A whole adapter at one site's rank: ``tensors`` (float32, the global's keys and order)
    and the truncation's ``relative_error`` over every module, sqrt(sum dropped / sum total)."""

    tensors: dict[str, torch.Tensor]
    relative_error: float


def adapter_at_rank(tensors: Mapping[str, torch.Tensor], rank: int) -> SiteAdapter:
    """Every LoRA module of an adapter through ``site_pair`` at ``rank`` (other keys as they are).

    ``tensors``: a saved adapter's keys (``lora_A``: r x d_in, ``lora_B``: d_out x r, 2-D). A
    module already at ``rank`` is passed through unchanged (same tensor objects, cast to
    float32), so at the global's rank this is the global itself.
    """
    _check_rank(rank)
    layout = parse_layout(tensors.keys())
    out: dict[str, torch.Tensor] = {}
    dropped = total = 0.0
    for module in layout.modules:
        a, b = tensors[module.a_key], tensors[module.b_key]
        if a.dim() != 2 or b.dim() != 2:
            raise MergeInputError(
                f"{module.name}: rank truncation needs 2-D factors (Linear LoRA); got A "
                f"{tuple(a.shape)}, B {tuple(b.shape)}"
            )
        if a.shape[0] == rank:
            out[module.a_key] = a.to(torch.float32)
            out[module.b_key] = b.to(torch.float32)
            continue
        pair = site_pair(b.to(torch.float32), a.to(torch.float32), rank)
        out[module.a_key] = pair.a.contiguous()
        out[module.b_key] = pair.b.contiguous()
        dropped += pair.truncated_energy
        total += pair.total_energy
    for key in layout.other_keys:
        out[key] = tensors[key].to(torch.float32)
    return SiteAdapter(
        tensors={key: out[key] for key in tensors},
        relative_error=(dropped / total) ** 0.5 if total > 0.0 else 0.0,
    )


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


# --- helpers ----------------------------------------------------------------------------------


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


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")


def _check_pair(b: torch.Tensor, a: torch.Tensor) -> None:
    if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
        raise MergeInputError(
            f"expected B (d_out x r) and A (r x d_in) with one r; got B {tuple(b.shape)} and "
            f"A {tuple(a.shape)} (pass them as (B, A), the order of the product B A)"
        )


def _target_rank(
    a_global: torch.Tensor, a_clients: Sequence[torch.Tensor], rank: int | None
) -> int:
    if rank is None:
        return max([a_global.shape[0], *(a.shape[0] for a in a_clients)])
    _check_rank(rank)
    return rank


def _checked_round(
    a_global: torch.Tensor,
    b_global: torch.Tensor,
    a_clients: Sequence[torch.Tensor],
    b_clients: Sequence[torch.Tensor],
    labels: Sequence[int | str] | None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Float32 copies on the global's device; every client's (B_t, A_t) checked against it."""
    _check_pair(b_global, a_global)
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
