"""Differential privacy for FedRobustMerge: Flower's fixed-clipping wrappers, made reply-safe.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` clips every reply's update to an L2 norm
(all tensors together) before the inner strategy sees it and adds Gaussian noise of standard
deviation ``noise_multiplier * clipping_norm / num_sampled_clients`` to the aggregate;
``DifferentialPrivacyClientSideFixedClipping`` leaves the clipping to the clients
(``fixedclipping_mod``) and only adds the noise. Both are used as they are; the subclasses here
add one thing: replies our checks would reject (errors, wrong keys or shapes, non-finite
values) are dropped and logged before Flower's clipping code touches them, so one bad client
is rejected like in a run without DP instead of crashing the clipping or skipping the round.

Noise is calibrated by Flower for a mean of ``num_sampled_clients`` clipped updates; we pass
``min-train-nodes`` (the fewest clients a round samples), which over-estimates the noise a mean
needs. RobustMerge is not a mean: see ``robustmerge_sensitivity_factor``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore import log

from server.config import DP_MODES
from strategies.fed_robustmerge import FedRobustMerge


class PrivacyLedger:
    """The cumulative (epsilon, delta) of the released adapters.

    Flower's RDP accountant, composed once per released (noised) global adapter with the
    *effective* noise multiplier (``dp-noise-multiplier`` / the merge's sensitivity factor),
    no amplification by sampling, add-or-remove-one-client neighbours.
    """

    def __init__(self, effective_noise_multiplier: float, sampled: int, delta: float) -> None:
        from flwr.supercore.privacy_accounting import (
            GaussianPrivacyEvent,
            NeighboringRelation,
            PrivacyConfig,
            SamplingMethod,
        )
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        self.delta = delta
        self.effective_noise_multiplier = effective_noise_multiplier
        self._accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=delta,
                population_size=sampled,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
        self._event = GaussianPrivacyEvent(
            noise_multiplier=effective_noise_multiplier,
            sample_size=sampled,
            population_size=sampled,
        )

    @property
    def releases(self) -> int:
        """Noised adapters released so far."""
        return self._accountant.num_releases

    def record_release(self, count: int = 1) -> float:
        """Compose ``count`` releases; the cumulative epsilon at ``delta`` after them."""
        self._accountant.compose(self._event, count)
        return self.epsilon()

    def epsilon(self) -> float:
        """The cumulative epsilon at ``delta`` (0 before any release)."""
        if self.releases == 0:
            return 0.0
        return float(self._accountant.get_privacy_spent(self.delta).epsilon)


class _ScreenedReplies:
    """Drops replies FedRobustMerge would reject before the DP wrapper clips them, and accounts
    each released adapter in the ledger (when there is one)."""

    strategy: Strategy
    ledger: PrivacyLedger | None = None

    def _screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        kept, _ = core_strategy(self.strategy).screen_train_replies(server_round, replies)
        return kept

    def _account(
        self, arrays: ArrayRecord | None, metrics: MetricRecord | None
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if arrays is None or self.ledger is None:
            return arrays, metrics
        epsilon = self.ledger.record_release()
        record = metrics if metrics is not None else MetricRecord()
        record["dp-epsilon"] = epsilon
        record["dp-delta"] = self.ledger.delta
        log(
            INFO,
            "DP: epsilon %.4g at delta %g after %d released adapters (effective noise "
            "multiplier %.4g)",
            epsilon,
            self.ledger.delta,
            self.ledger.releases,
            self.ledger.effective_noise_multiplier,
        )
        return arrays, record


class ServerSideClipping(_ScreenedReplies, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, after FedRobustMerge's per-reply checks."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, clip each update to ``clipping_norm``, merge, add noise, account."""
        return self._account(
            *super().aggregate_train(server_round, self._screen(server_round, replies))
        )


class ClientSideClipping(_ScreenedReplies, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (clients run ``fixedclipping_mod``), screened."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, check the clients clipped, merge, add noise, account."""
        return self._account(
            *super().aggregate_train(server_round, self._screen(server_round, replies))
        )


def wrap_with_privacy(
    strategy: FedRobustMerge,
    mode: str,
    *,
    clipping_norm: float,
    noise_multiplier: float,
    num_sampled_clients: int,
    rank: int = 8,
    delta: float = 1e-5,
) -> Strategy:
    """``strategy`` inside the DP wrapper ``mode`` names ("none" returns it unchanged).

    ``rank`` (the LoRA rank) enters RobustMerge's sensitivity bound, logged at start. With
    noise and a known bound, every released adapter is accounted: round metrics carry
    ``dp-epsilon`` (cumulative, at ``delta``).
    """
    if mode == "none":
        return strategy
    wrappers: dict[str, type[ServerSideClipping] | type[ClientSideClipping]] = {
        "server-clipping": ServerSideClipping,
        "client-clipping": ClientSideClipping,
    }
    wrapper = wrappers.get(mode)
    if wrapper is None:
        raise ValueError(f"dp mode must be one of {list(DP_MODES)}; got {mode!r}")
    factor = robustmerge_sensitivity_factor(strategy, num_sampled_clients, rank)
    if factor is None:
        log(
            WARNING,
            "DP: Flower calibrates noise for a mean of %d clipped updates; no sensitivity bound "
            "is derived for merge method %r with %s, so the DP guarantee of this run is not "
            "established (README: Privacy and communication)",
            num_sampled_clients,
            strategy.settings.merge_method,
            strategy.settings.hyperparameters,
        )
    elif factor > 1.0:
        log(
            WARNING,
            "DP: Flower calibrates noise for a mean of %d clipped updates; with merge method "
            "%r one client can move the released adapter up to %.3g times as much, so the "
            "effective noise multiplier is at most %.3g, not %.3g (README: Privacy and "
            "communication)",
            num_sampled_clients,
            strategy.settings.merge_method,
            factor,
            noise_multiplier / factor,
            noise_multiplier,
        )
    log(
        INFO,
        "DP: %s, clipping norm %g, noise multiplier %g, noise std %g per entry",
        mode,
        clipping_norm,
        noise_multiplier,
        noise_multiplier * clipping_norm / num_sampled_clients,
    )
    wrapped = wrapper(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
    if noise_multiplier > 0 and factor is not None:
        wrapped.ledger = PrivacyLedger(noise_multiplier / factor, num_sampled_clients, delta)
    return wrapped


def restore_privacy_ledger(strategy: Strategy, history: Sequence[Mapping[str, Any]]) -> int:
    """On resume: compose the releases the history records (rounds with ``dp-epsilon``)."""
    ledger = getattr(strategy, "ledger", None)
    if not isinstance(ledger, PrivacyLedger):
        return 0
    releases = sum(1 for entry in history if "dp-epsilon" in entry.get("train", {}))
    if releases:
        ledger.record_release(releases)
    return releases


def robustmerge_sensitivity_factor(
    strategy: FedRobustMerge, num_sampled_clients: int, rank: int
) -> float | None:
    """How much further one clipped client can move the released adapter than a mean allows:
    the merge method's own declaration (``MergeMethod.dp_sensitivity_factor``), for the
    strategy's server step eta, ``num_sampled_clients`` (m) and the LoRA ``rank`` (r).

    Flower's noise (std z C / m) is calibrated for a mean of m updates clipped to C, which one
    client moves by at most C / m: factor 1 (fedavg). The bounds the methods declare:

    - robustmerge paper-exact: eta lambda m sqrt(1 + (1 + sqrt(r))^2), about 4 eta lambda m at
      r = 8 (lambda the fuse weight; the derivation is in ``RobustMerge.dp_sensitivity_factor``);
    - task_arithmetic does not run in rounds (it has no size-invariant form);
    - paper-equation, ties, dare, svd, exact-mean: products, sign elections, random drops or an
      SVD; no bound is derived (None).

    The effective noise multiplier is z / factor; it is an upper bound on the privacy the run
    gets, since the bounds are worst cases.
    """
    settings = strategy.settings
    return settings.method.dp_sensitivity_factor(settings.server_lr, num_sampled_clients, rank)


def core_strategy(strategy: Strategy) -> FedRobustMerge:
    """The FedRobustMerge inside any number of wrappers."""
    inner: object = strategy
    while not isinstance(inner, FedRobustMerge):
        inner = getattr(inner, "strategy", None)
        if inner is None:
            raise TypeError(f"{type(strategy).__name__} wraps no FedRobustMerge")
    return inner
