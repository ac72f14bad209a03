"""Rank-r factors of a sum of low-rank products, by truncated SVD (FlexLoRA's factorisation)."""

from __future__ import annotations

import torch

from strategies.merging.method import PairMerge


def truncate_product(left: torch.Tensor, right: torch.Tensor, rank: int) -> PairMerge:
    """Best rank-``rank`` factors of left @ right (d_out x K times K x d_in, K = T * r).

    The product is never formed: QR of both sides reduces the SVD to a K x K core, so the cost
    is O((d_out + d_in) K^2), not O(d_out d_in min(d_out, d_in)). Returns B = U sqrt(S) and
    A = sqrt(S) V^T with the relative Frobenius error of B @ A against the full product.
    Each singular pair's sign is fixed (the largest-magnitude entry of each column of U is
    positive), so the factors, not only their product, do not depend on the order of the
    clients' blocks in ``left`` and ``right``.
    """
    q_left, r_left = torch.linalg.qr(left.to(torch.float64))
    q_right, r_right = torch.linalg.qr(right.to(torch.float64).T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    kept = min(rank, s.shape[0])
    root = s[:kept].sqrt()
    b = torch.zeros(left.shape[0], rank, dtype=torch.float64, device=left.device)
    a = torch.zeros(rank, right.shape[1], dtype=torch.float64, device=right.device)
    left_vectors = q_left @ u[:, :kept]
    pivots = left_vectors.abs().argmax(dim=0)
    signs = torch.sign(left_vectors[pivots, torch.arange(kept, device=left.device)])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    b[:, :kept] = left_vectors * (signs * root)
    a[:kept] = (signs * root)[:, None] * (vh[:kept] @ q_right.T)
    energy = s.square()
    total = float(energy.sum())
    dropped = float(energy[kept:].sum())
    error = (dropped / total) ** 0.5 if total > 0.0 else 0.0
    return PairMerge(
        a=a.to(torch.float32),
        b=b.to(torch.float32),
        relative_error=error,
        truncated_energy=dropped,
        total_energy=total,
    )


# Rows of ``left`` multiplied at once when the energy is taken from the product itself: at most
# this many float64 entries of the product exist at a time (64 MiB).
PRODUCT_BLOCK_ELEMENTS = 1 << 23


def low_rank_energy(left: torch.Tensor, right: torch.Tensor) -> float:
    """||left @ right||_F^2 (left d_out x K, right K x d_in), in float64, in memory that does
    not grow with K beyond the inputs themselves.

    While K (d_out + d_in) <= d_out d_in (K below about the smaller side) the two K x K Gram
    matrices are the cheaper route and hold at most one dense module; past that (K = T * r
    grows with the clients) they would grow as K^2 (2 GiB each at T = 1,024, r = 16), so the
    product is formed block of rows by block and never whole. Both are exact up to rounding.
    The Gram sum cancels where the product is (nearly) zero and can come out a rounding error
    below zero; an energy is never negative, so it is clamped at 0 (its square root stays
    real)."""
    rows, inner = left.shape
    cols = right.shape[1]
    if inner * (rows + cols) <= rows * cols:
        return energy_by_grams(left, right)
    return energy_by_product(left, right)


def energy_by_grams(left: torch.Tensor, right: torch.Tensor) -> float:
    """||left @ right||_F^2 as sum((L^T L) * (R R^T)), clamped at 0: O(K^2 (d_out + d_in))."""
    left64 = left.to(torch.float64)
    right64 = right.to(torch.float64)
    return max(0.0, float(((left64.T @ left64) * (right64 @ right64.T)).sum()))


def energy_by_product(
    left: torch.Tensor, right: torch.Tensor, block_elements: int = PRODUCT_BLOCK_ELEMENTS
) -> float:
    """||left @ right||_F^2 summed over blocks of the product's rows, each block at most
    ``block_elements`` float64 entries: O(d_out K d_in) time, O(K d_in) extra memory."""
    right64 = right.to(torch.float64)
    step = max(1, block_elements // max(1, right.shape[1]))
    total = 0.0
    for start in range(0, left.shape[0], step):
        block = left[start : start + step].to(torch.float64) @ right64
        total += float(block.square().sum())
    return total
