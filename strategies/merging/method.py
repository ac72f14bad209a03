"""The interface every merge method implements, and the hyperparameter checks they share."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

FORMS: tuple[str, ...] = ("one-shot", "round")


@dataclass(frozen=True)
class PairMerge:
    """A merged LoRA pair (A: r x d_in, B: d_out x r).

    ``relative_error`` is ||B A - full-rank merge||_F / ||full-rank merge||_F for methods that
    factor a higher-rank merged update back to rank r (0.0 when nothing was truncated), else None.
    """

    a: torch.Tensor
    b: torch.Tensor
    relative_error: float | None = None
    truncated_energy: float = 0.0
    total_energy: float = 0.0


class MergeMethod(ABC):
    """Merges one module at a time across T adapters; stacks have the task dimension first.

    ``weights`` is always the normalised per-adapter weight p (T entries summing to 1, equal
    when the caller gave none), on the device the stacks live on.
    """

    @abstractmethod
    def merge_pair(
        self,
        a_stack: torch.Tensor,
        b_stack: torch.Tensor,
        weights: torch.Tensor,
        *,
        module_index: int,
    ) -> PairMerge:
        """Merge the A (T x r x d_in) and B (T x d_out x r) factors of one module."""

    def merge_other(self, stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Non-LoRA trainable tensors (spec step 5): the (weighted) mean over adapters."""
        merged: torch.Tensor = torch.tensordot(weights, stack, dims=1)
        return merged

    def describe(self) -> dict[str, object]:
        """The method's name and hyperparameters, for logs and merge reports."""
        return {}

    def round_form(self) -> MergeMethod:
        """The method as federated rounds run it (docs/algorithm.md, "Round forms").

        Rounds need size invariance: T clients that trained identically must move the global as
        far as one of them. Methods that already are invariant return themselves; a method whose
        round form differs from its one-shot form returns that variant; a method with no
        sensible round form raises ``RoundFormError`` saying what to use instead.
        """
        return self

    def propagates_non_finite(self) -> bool:
        """True when a NaN or Inf in any input of a pair always reaches the merged pair and the
        merge raises nothing on it; ``merge_lora`` then checks finiteness on the merged pair
        (1/T of the data) instead of on every stack. False (the safe default): inputs are
        checked before the merge."""
        return False

    def weights_by_examples(self) -> bool:
        """True when the method is an example-weighted mean by definition (FedAvg and the
        product-space means), so federated rounds weight its clients by num-examples whatever
        ``weight-by-examples`` says; False: equal weights unless asked."""
        return False

    def merges_products(self) -> bool:
        """True when the method merges the products B_t A_t (then it implements
        ``product_terms`` and ``update_terms``), False when it merges A and B separately."""
        return False

    def sums_client_terms(self) -> bool:
        """True when the round merge is a sum over clients of terms each client computes from
        its own delta, followed by one division, in the form ``merging.decomposed`` implements
        (``client_terms`` on the client, ``finish_from_sums`` on the server: RobustMerge
        paper-exact's steps 3-4). Secure aggregation (SecAgg+) shows the server only such sums,
        so it runs exactly these methods. False (the safe default): the merge needs the
        individual updates (a sign election, per-client drops, a factorisation, a product)."""
        return False

    def prunes_on_client(self) -> bool:
        """True when a client can run the method's per-client steps on its own delta and the
        server finish the round from what survived (RobustMerge paper-exact's steps 1-2 and 3-4
        split by ``merging.decomposed``: ``prune_adapter`` on the client, ``merge_pruned`` on the
        server), so the sparse uplink sends only the pruned deltas and scales. False (the safe
        default): clients send their dense factors."""
        return False

    def keeps_one_shot_on_adapters(self) -> bool:
        """True when rounds that merge whole adapters (merge-target 'adapter') run the one-shot
        form instead of ``round_form()``, so that round 1 is exactly the published one-shot
        merge (paper-exact RobustMerge's released sum). False (the default): rounds always run
        the size-invariant round form."""
        return False

    def sums_scaled_a(self) -> bool:
        """True when this merge sums lambda_t A_t over the adapters (not a mean: one-shot forms
        such as task arithmetic's), so adapters sharing one initial A (as federated clients do)
        give a merged A about lambda T times one adapter's; the CLI warns when it sees such
        adapters. False (the default): A is averaged, elected or factored, and a shared A keeps
        its size."""
        return False

    def dp_sensitivity_factor(self, server_lr: float, clients: int, rank: int) -> float | None:
        """How much further one clipped client can move the released adapter than a mean of
        ``clients`` updates allows (1.0: the method is such a mean), for the server step
        ``server_lr`` and LoRA rank ``rank``; the DP wrappers divide the noise multiplier by
        it (``server.privacy``). None (the safe default): no bound is derived for this method,
        so a DP run's guarantee is not established."""
        return None

    @classmethod
    def run_config_options(cls) -> dict[str, str]:
        """The run-config keys that feed this method's hyperparameters: run-config key ->
        constructor keyword (dare: ``{"dare-drop-rate": "drop_rate"}``). The server passes
        each key's value as that keyword (``ServerSettings.merge_options``); the key must be
        one ``server.config.ServerSettings`` reads. Empty (the default): the method takes only
        the shared merge keys (mode, keep-ratio, scale-quantile, fuse-weight)."""
        return {}

    def product_terms(
        self, a_stack: torch.Tensor, b_stack: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank factors (L: d_out x K, R: K x d_in) of the one-shot merged product L @ R."""
        raise TypeError(f"{self.describe().get('method')} merges factors, not products")

    def update_terms(
        self,
        a_global: torch.Tensor,
        b_global: torch.Tensor,
        a_stack: torch.Tensor,
        b_stack: torch.Tensor,
        weights: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank factors (L, R) of the merged round update M = L @ R, from the global's
        factors (A_G: r x d_in, B_G: d_out x r) and the clients' full trained factors.

        Client t's weight update is B_t A_t - B_G A_G (times alpha/r, common to all).
        """
        raise TypeError(f"{self.describe().get('method')} merges factors, not products")


class RoundFormError(ValueError):
    """A merge method that has no size-invariant form for federated rounds."""


def check_form(form: str) -> str:
    """A merge form: "one-shot" (merge finished adapters once) or "round" (federated rounds)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}; got {form!r}")
    return form


def check_unit_interval(name: str, value: float, *, low_open: bool, high_open: bool) -> float:
    """Reject a ratio outside its interval, naming it and the allowed range."""
    number = float(value)
    low_ok = number > 0.0 if low_open else number >= 0.0
    high_ok = number < 1.0 if high_open else number <= 1.0
    if not (math.isfinite(number) and low_ok and high_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return number


def check_fuse_weight(value: float | Sequence[float]) -> float | tuple[float, ...]:
    """A finite fuse weight, shared (a number) or per adapter (a sequence)."""
    if isinstance(value, (int, float)):
        if not math.isfinite(float(value)):
            raise ValueError(f"fuse_weight must be finite, got {value!r}")
        return float(value)
    values = tuple(float(v) for v in value)
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"fuse_weight must be a finite number or one per adapter, got {value!r}")
    return values


def task_coefficients(
    fuse_weight: float | tuple[float, ...], weights: torch.Tensor
) -> torch.Tensor:
    """lambda_t = fuse_weight_t * T * p_t: equal weights give every task its fuse weight."""
    count = weights.shape[0]
    if isinstance(fuse_weight, tuple):
        if len(fuse_weight) != count:
            raise ValueError(
                f"fuse_weight has {len(fuse_weight)} entries but {count} adapters were given"
            )
        base = torch.tensor(fuse_weight, dtype=weights.dtype, device=weights.device)
    else:
        base = torch.full((count,), fuse_weight, dtype=weights.dtype, device=weights.device)
    return base * count * weights
