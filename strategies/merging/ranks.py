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

The round that merges such sites is ``rank_rounds`` (the formulas are there).

Keep the global factored at r_max, or as a product?
---------------------------------------------------
Factored at r_max (``rank_rounds.merge_mixed_ranks`` does that). Measured 2026-11-30 on this
project's 2-core CPU VM while a benchmark ran beside it (load 6-8, so the times are loose), one
module, float32, six sites of ranks 4, 4, 8, 8, 16, 16, equal weights, eta 1, ten rounds from a zero
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

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from strategies.merging.errors import MergeInputError
from strategies.merging.exact_mean import ExactMean
from strategies.merging.lora_keys import parse_layout
from strategies.merging.lowrank import low_rank_energy, truncate_product
from strategies.merging.method import MergeMethod, PairMerge
from strategies.merging.robustmerge import RobustMerge

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
    check_pair(b, a)
    check_rank(rank)
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
    check_pair(b, a)
    check_rank(rank)
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
    check_rank(rank)
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
    check_pair(b, a)
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
    check_rank(rank)
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


# --- helpers ----------------------------------------------------------------------------------


def check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")


def check_pair(b: torch.Tensor, a: torch.Tensor) -> None:
    if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
        raise MergeInputError(
            f"expected B (d_out x r) and A (r x d_in) with one r; got B {tuple(b.shape)} and "
            f"A {tuple(a.shape)} (pass them as (B, A), the order of the product B A)"
        )
