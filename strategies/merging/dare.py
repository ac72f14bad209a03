"""DARE (Drop And REscale), then a linear merge, on LoRA factors.

Paper: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch", ICML 2024 (arXiv:2311.03099). Each entry of each task's tensor is dropped with
probability p and the survivors are rescaled by 1 / (1 - p); the results are summed with
lambda_t = fuse_weight * T * p_t. The drop masks come from a CPU generator seeded by
(seed, module, factor), so the result is the same on every device and every run.

Round form (``form="round"``, docs/algorithm.md, "Round forms"): the lambda-weighted *mean*
lambda sum_t p_t drop(X_t) instead of the sum, and each client's mask seeded by (seed, module,
factor, a digest of that client's tensor), so T clients that trained identically drop the same
entries and move the global exactly as far as one of them, whatever their order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from strategies.merging.method import (
    MergeMethod,
    PairMerge,
    check_form,
    check_fuse_weight,
    task_coefficients,
)
from strategies.merging.registry import register_method


def drop_and_rescale(stack: torch.Tensor, drop_rate: float, seed: int) -> torch.Tensor:
    """Zero each entry with probability drop_rate (seeded), rescale the rest by 1/(1-drop_rate)."""
    if drop_rate == 0.0:
        return stack
    generator = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.rand(stack.shape, generator=generator) >= drop_rate
    return stack * keep.to(stack.device) / (1.0 - drop_rate)


def drop_each_by_content(stack: torch.Tensor, drop_rate: float, seed: int) -> torch.Tensor:
    """``drop_and_rescale`` of each task's slice with a seed mixed with a digest of that slice,
    so equal slices get equal masks wherever they sit in the stack."""
    if drop_rate == 0.0:
        return stack
    slices = []
    for task in stack:
        digest = hashlib.blake2b(task.detach().cpu().contiguous().numpy().tobytes(), digest_size=7)
        mixed = (seed * 0x9E3779B1 + int.from_bytes(digest.digest(), "little")) % (2**63)
        slices.append(drop_and_rescale(task, drop_rate, mixed))
    return torch.stack(slices)


@register_method("dare")
class Dare(MergeMethod):
    """Random drop with rescale, then a lambda-weighted sum.

    Parameters
    ----------
    drop_rate : float, default 0.5
        Probability p that an entry is dropped, in [0, 1).
    fuse_weight : float or sequence of float, default 1.0
    seed : int, default 0
    form : {"one-shot", "round"}, default "one-shot"
        "round": mean instead of sum, masks keyed by each client's content (see above).
    """

    def __init__(
        self,
        drop_rate: float = 0.5,
        fuse_weight: float | Sequence[float] = 1.0,
        seed: int = 0,
        form: str = "one-shot",
    ) -> None:
        rate = float(drop_rate)
        if not (math.isfinite(rate) and 0.0 <= rate < 1.0):
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        self.drop_rate = rate
        self.fuse_weight = check_fuse_weight(fuse_weight)
        self.seed = int(seed)
        self.form = check_form(form)

    @classmethod
    def run_config_options(cls) -> dict[str, str]:
        """Run config ``dare-drop-rate`` is the drop probability p."""
        return {"dare-drop-rate": "drop_rate"}

    def sums_scaled_a(self) -> bool:
        """The one-shot form sums lambda_t drop(A_t): a shared initial A survives the drops in
        expectation (the rescale), so the merged A is about lambda T times it. The round form
        takes the mean."""
        return self.form == "one-shot"

    def round_form(self) -> Dare:
        return Dare(self.drop_rate, self.fuse_weight, self.seed, form="round")

    def merge_pair(
        self,
        a_stack: torch.Tensor,
        b_stack: torch.Tensor,
        weights: torch.Tensor,
        *,
        module_index: int,
    ) -> PairMerge:
        lambdas = task_coefficients(self.fuse_weight, weights)
        base = (self.seed * 1_000_003 + module_index) * 2
        if self.form == "round":
            lambdas = lambdas / lambdas.shape[0]
            a_kept = drop_each_by_content(a_stack, self.drop_rate, base)
            b_kept = drop_each_by_content(b_stack, self.drop_rate, base + 1)
        else:
            a_kept = drop_and_rescale(a_stack, self.drop_rate, base)
            b_kept = drop_and_rescale(b_stack, self.drop_rate, base + 1)
        return PairMerge(
            a=torch.tensordot(lambdas, a_kept, dims=1), b=torch.tensordot(lambdas, b_kept, dims=1)
        )

    def describe(self) -> dict[str, object]:
        return {
            "method": "dare",
            "drop_rate": self.drop_rate,
            "fuse_weight": self.fuse_weight,
            "seed": self.seed,
            "form": self.form,
        }
