"""RobustMerge: pruning, complementary scaling and cross-task normalisation of LoRA factors.

Paper: Zeng, Guo, Zhu, Shen, Tang, "RobustMerge: Parameter-Efficient Model Merging for MLLMs
with Direction Robustness", NeurIPS 2025 (arXiv:2502.17159, earlier "CoPA-Merging").

Per module, for T adapters with A_t (r x d_in) and B_t (d_out x r):

1. prune each tensor: keep |x| >= tau, tau the k-th smallest |x|, k = floor(n (1 - rho));
2. s_t[i] = sum_j |A_t[i, j]| / sum_j |A^_t[i, j]|; floor at the ascending element at
   position min(floor(r (1 - a)), r - 1): s~_t = max(s_t, q_t);
3. A_m = sum_t lambda_t A^_t;
4. B_m[:, i] = sum_t lambda_t s~_t[i] B^_t[:, i] / sum_t s~_t[i].

Implementation notes matched to the official release ("paper-exact" mode):
- ties at the threshold are kept, so n - k + 1 entries survive when there are none;
- lambda multiplies both factors (the product carries lambda^2, 4 by default);
- reference defaults: keep ratio 0.2, scale quantile 0.2, fuse weight 2.0.
Where the release is fragile this implementation defines the behaviour: A and B are paired by
module name, a row whose kept mass is zero gets s = 1, scale_quantile = 0 uses position r - 1,
keep_ratio = 1 keeps everything, ratios outside their ranges are refused.

Round form (``form="round"``, what federated rounds use; docs/algorithm.md, "Round forms"):
step 3 becomes A_m = sum_t (lambda_t / T) A^_t = lambda sum_t p_t A^_t, a weighted mean, so T
clients that trained identically move the global as far as one of them (the released code's sum
multiplies the step by T when clients share A, as federated clients do). Step 4 is already
invariant. The one-shot form stays bit-exact to the release.

"paper-equation" mode is the paper's own formula, lambda applied once and the normalised scale
between each task's own factors:
    delta_W = sum_t lambda_t B^_t diag(s_t / sum_u s_u) A^_t     (rank up to T r),
factored back to rank r by truncated SVD (B = U sqrt(S), A = sqrt(S) V^T). The price of handing
clients an ordinary rank-r adapter is the discarded spectrum: each module's
``relative_error`` = ||B A - delta_W||_F / ||delta_W||_F is reported by
``merge_lora_with_report``. It is zero when T = 1 and grows with how little the tasks' subspaces
overlap (for T independent random adapters it approaches sqrt(1 - 1/T)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from strategies.merging.lowrank import truncate_product
from strategies.merging.method import (
    MergeMethod,
    PairMerge,
    check_form,
    check_fuse_weight,
    check_unit_interval,
    task_coefficients,
)
from strategies.merging.pruning import (
    prune_by_magnitude,
    prune_with_row_mass,
    scale_from_row_mass,
)
from strategies.merging.registry import register_method

Mode = Literal["paper-exact", "paper-equation"]
MODES: tuple[str, ...] = ("paper-exact", "paper-equation")


@register_method("robustmerge")
class RobustMerge(MergeMethod):
    """RobustMerge with the released code's numbers (default) or the paper's equation.

    Parameters
    ----------
    keep_ratio : float, default 0.2
        Fraction of each tensor's entries that survive pruning, in (0, 1].
    scale_quantile : float, default 0.2
        Fraction of rank directions that keep their own scale, in [0, 1).
    fuse_weight : float or sequence of float, default 2.0
        lambda, shared or one per adapter; caller weights p reshape it to lambda T p_t.
    mode : {"paper-exact", "paper-equation"}, default "paper-exact"
    scale_floor : bool, optional
        Whether the floor of step 2 applies; always on in paper-exact mode, off by default in
        paper-equation mode (the paper has none).
    form : {"one-shot", "round"}, default "one-shot"
        "round" averages A over clients instead of summing it (paper-exact mode; see above).
    """

    def __init__(
        self,
        keep_ratio: float = 0.2,
        scale_quantile: float = 0.2,
        fuse_weight: float | Sequence[float] = 2.0,
        mode: str = "paper-exact",
        scale_floor: bool | None = None,
        form: str = "one-shot",
    ) -> None:
        self.keep_ratio = check_unit_interval(
            "keep_ratio", keep_ratio, low_open=True, high_open=False
        )
        self.scale_quantile = check_unit_interval(
            "scale_quantile", scale_quantile, low_open=False, high_open=True
        )
        self.fuse_weight = check_fuse_weight(fuse_weight)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.mode = mode
        if mode == "paper-exact" and scale_floor is False:
            raise ValueError("scale_floor=False is only meaningful in mode 'paper-equation'")
        self.scale_floor = mode == "paper-exact" if scale_floor is None else bool(scale_floor)
        self.form = check_form(form)

    def round_form(self) -> RobustMerge:
        return RobustMerge(
            keep_ratio=self.keep_ratio,
            scale_quantile=self.scale_quantile,
            fuse_weight=self.fuse_weight,
            mode=self.mode,
            scale_floor=self.scale_floor,
            form="round",
        )

    def merges_products(self) -> bool:
        return self.mode == "paper-equation"

    def propagates_non_finite(self) -> bool:
        """Paper-exact mode: a NaN or Inf in any input of a pair reaches the merged pair.

        A NaN fails the threshold comparison and is kept as NaN * 0 = NaN; an Inf is kept; the
        sums and products of steps 3-4 carry either into A_m or B_m (times a zero weight: NaN).
        So ``merge_lora`` checks finiteness on the merged pair, 1/T of the data, instead of on
        every stack. The paper's equation factors its product by SVD, which refuses NaN: no.
        """
        return self.mode == "paper-exact"

    def sums_client_terms(self) -> bool:
        """Paper-exact mode: steps 3-4 are sums over clients of per-client terms (lambda A^_t,
        lambda s~_t[i] B^_t[:, i], s~_t[i]) and one division, in either form (the round form
        divides A's sum by T), so SecAgg+ can sum them (``merging.decomposed``). The paper's
        equation multiplies each client's own factors: no."""
        return self.mode == "paper-exact"

    def prunes_on_client(self) -> bool:
        """Paper-exact mode: steps 1-2 read one client's tensors only, and steps 3-4 need only
        the pruned factors and scales, so each client prunes its own delta (sparse uplink).
        The paper's equation in round form multiplies the pruned B delta by the client's whole
        A_t, which a pruned reply does not carry: no."""
        return self.mode == "paper-exact"

    def keeps_one_shot_on_adapters(self) -> bool:
        """Paper-exact mode: with merge-target 'adapter' rounds keep the released code's
        one-shot sum, so that round 1 is exactly the paper's one-shot merge."""
        return self.mode == "paper-exact"

    def sums_scaled_a(self) -> bool:
        """Paper-exact one-shot: A_m = sum_t lambda_t A^_t, so adapters sharing one initial A
        give about lambda T times it (pruning keeps its large entries). The round form and the
        paper's equation do not sum A."""
        return self.mode == "paper-exact" and self.form == "one-shot"

    def dp_sensitivity_factor(self, server_lr: float, clients: int, rank: int) -> float | None:
        """Paper-exact mode: factor max(1, eta lambda m sqrt(1 + (1 + sqrt(r))^2)), about
        4 eta lambda m at r = 8 (eta the server step, lambda the largest fuse weight, m the
        clients, r the rank); the paper's equation: None (products; no bound derived).

        Flower's noise (std z C / m) is calibrated for a mean of m updates clipped to C, which
        one client moves by at most C / m. Adding or removing one client whose update has norm
        <= C: A_m = sum_t lambda A^_t moves by up to lambda C (pruning only shrinks norms); the
        round form's A_m = lambda sum_t p_t A^_t moves less (at most 2 lambda C / (m + 1)), so
        the sum's bound kept here is valid but loose. Each column of B_m is lambda times a convex
        combination (weights s~_t[i] / sum_u s~_u[i]) of the clients' columns; the new client
        can shift column i by up to lambda (|b_i| + |c_i|) <= lambda (|b_i| + max_t
        |B^_t[:, i]|), at most lambda C (1 + sqrt(r)) over the r columns. Together, relative to
        a mean's C / m: eta lambda m sqrt(1 + (1 + sqrt(r))^2).
        """
        if self.mode != "paper-exact":
            return None
        fuse = self.fuse_weight
        weight = abs(float(max(fuse)) if isinstance(fuse, tuple) else float(fuse))
        base = server_lr * weight * clients
        return max(1.0, base * math.sqrt(1.0 + (1.0 + math.sqrt(rank)) ** 2))

    def merge_pair(
        self,
        a_stack: torch.Tensor,
        b_stack: torch.Tensor,
        weights: torch.Tensor,
        *,
        module_index: int,
    ) -> PairMerge:
        a_pruned, b_pruned, scale = self.prune_and_scale(a_stack, b_stack)
        # The pruned stacks are this call's own buffers: B's numerator may scale them in place.
        return self._combine(a_pruned, b_pruned, scale, weights, own_buffers=True)

    def prune_and_scale(
        self, a_stack: torch.Tensor, b_stack: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 1-2, each task on its own: pruned A (T x r x d_in), pruned B, s~ (T x r)."""
        a_pruned, total, kept = prune_with_row_mass(a_stack, self.keep_ratio)
        b_pruned = prune_by_magnitude(b_stack, self.keep_ratio)
        scale = scale_from_row_mass(total, kept, self.scale_quantile if self.scale_floor else None)
        return a_pruned, b_pruned, scale

    def combine(
        self,
        a_pruned: torch.Tensor,
        b_pruned: torch.Tensor,
        scale: torch.Tensor,
        weights: torch.Tensor,
    ) -> PairMerge:
        """Steps 3-4 (or the paper's equation) from pruned factors and their scales."""
        return self._combine(a_pruned, b_pruned, scale, weights, own_buffers=False)

    def _combine(
        self,
        a_pruned: torch.Tensor,
        b_pruned: torch.Tensor,
        scale: torch.Tensor,
        weights: torch.Tensor,
        *,
        own_buffers: bool,
    ) -> PairMerge:
        """``combine``; with ``own_buffers`` it may overwrite ``b_pruned`` (one buffer less)."""
        lambdas = task_coefficients(self.fuse_weight, weights)
        if self.mode == "paper-exact":
            a_coefficients = lambdas if self.form == "one-shot" else lambdas / lambdas.shape[0]
            a_merged = torch.tensordot(a_coefficients, a_pruned, dims=1)
            terms = _scale_columns(b_pruned, lambdas[:, None] * scale, in_place=own_buffers)
            return PairMerge(a=a_merged, b=terms.sum(dim=0) / scale.sum(dim=0))
        left, right = self._equation_terms(a_pruned, b_pruned, scale, lambdas)
        return truncate_product(left, right, a_pruned.shape[1])

    def product_terms(
        self, a_stack: torch.Tensor, b_stack: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's equation over finished adapters: sum_t lambda_t B^_t diag(c_t) A^_t."""
        self._require_equation()
        a_pruned, b_pruned, scale = self.prune_and_scale(a_stack, b_stack)
        lambdas = task_coefficients(self.fuse_weight, weights)
        return self._equation_terms(a_pruned, b_pruned, scale, lambdas)

    def update_terms(
        self,
        a_global: torch.Tensor,
        b_global: torch.Tensor,
        a_stack: torch.Tensor,
        b_stack: torch.Tensor,
        weights: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's equation in round terms (docs/algorithm.md, "Round forms").

        Client t's update is U_t = B_t A_t - B_G A_G = dB_t A_t + B_G dA_t. Steps 1-2 run on what
        the client learned (dA_t, dB_t); the carriers (its A_t, the global B_G) stay whole:
            M = sum_t lambda_t [dB^_t diag(c_t) A_t + B_G diag(c_t) dA^_t],  c_t = s_t / sum_u s_u.
        With nothing pruned, s = 1 and M = lambda sum_t p_t U_t, the lambda-scaled exact mean.
        """
        self._require_equation()
        a_delta = a_stack - a_global
        b_delta = b_stack - b_global
        a_pruned, b_pruned, scale = self.prune_and_scale(a_delta, b_delta)
        lambdas = task_coefficients(self.fuse_weight, weights)
        share = lambdas[:, None] * scale / scale.sum(dim=0)
        count, rank, d_in = a_stack.shape
        left = (b_pruned * share[:, None, :]).permute(1, 0, 2).reshape(-1, count * rank)
        carried = (a_pruned * share[:, :, None]).sum(dim=0)
        return (
            torch.cat([left, b_global], dim=1),
            torch.cat([a_stack.reshape(count * rank, d_in), carried], dim=0),
        )

    def _equation_terms(
        self,
        a_pruned: torch.Tensor,
        b_pruned: torch.Tensor,
        scale: torch.Tensor,
        lambdas: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        share = lambdas[:, None] * scale / scale.sum(dim=0)
        count, rank, d_in = a_pruned.shape
        d_out = b_pruned.shape[1]
        left = (b_pruned * share[:, None, :]).permute(1, 0, 2).reshape(d_out, count * rank)
        return left, a_pruned.reshape(count * rank, d_in)

    def _require_equation(self) -> None:
        if self.mode != "paper-equation":
            raise TypeError("paper-exact RobustMerge merges factors; products are paper-equation's")

    def describe(self) -> dict[str, object]:
        return {
            "method": "robustmerge",
            "mode": self.mode,
            "keep_ratio": self.keep_ratio,
            "scale_quantile": self.scale_quantile,
            "fuse_weight": self.fuse_weight,
            "scale_floor": self.scale_floor,
            "form": self.form,
        }


def _scale_columns(
    b_stack: torch.Tensor, coefficients: torch.Tensor, *, in_place: bool
) -> torch.Tensor:
    """B_t[:, i] * c_t[i] for a T x d_out x r stack and T x r coefficients.

    The same products as ``b_stack * coefficients[:, None, :]``, but rows of B are taken
    ``group`` at a time (coefficients repeated ``group`` times), so the broadcast's inner
    loop runs over group * r entries instead of r = 16, which vectorises better on CPU.
    ``in_place`` overwrites ``b_stack`` (the caller's own buffer).
    """
    count, d_out, rank = b_stack.shape
    group = _row_group(d_out, rank)
    tiled = coefficients.repeat(1, group)[:, None, :]
    if in_place and b_stack.is_contiguous() and not b_stack.requires_grad:
        b_stack.view(count, d_out // group, group * rank).mul_(tiled)
        return b_stack
    return (b_stack.reshape(count, d_out // group, group * rank) * tiled).reshape(b_stack.shape)


def _row_group(d_out: int, rank: int) -> int:
    """The largest g <= 256 / rank dividing d_out (at least 1): rows of B scaled together."""
    for group in range(max(256 // max(rank, 1), 1), 0, -1):
        if d_out % group == 0:
            return group
    return 1
