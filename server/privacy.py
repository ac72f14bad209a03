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

import math
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore import log

from strategies.fed_robustmerge import FedRobustMerge

DP_MODES = ("none", "server-clipping", "client-clipping")


class _ScreenedReplies:
    """Drops replies FedRobustMerge would reject before the DP wrapper clips them."""

    strategy: Strategy

    def _screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        core = core_strategy(self.strategy)
        kept, rejected = core.screen_train_replies(server_round, replies)
        core.pending_rejections = rejected
        return kept


class ServerSideClipping(_ScreenedReplies, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, after FedRobustMerge's per-reply checks."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, clip each update to ``clipping_norm``, merge, add noise."""
        return super().aggregate_train(server_round, self._screen(server_round, replies))


class ClientSideClipping(_ScreenedReplies, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (clients run ``fixedclipping_mod``), screened."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, check the clients clipped, merge, add noise."""
        return super().aggregate_train(server_round, self._screen(server_round, replies))


def wrap_with_privacy(
    strategy: FedRobustMerge,
    mode: str,
    *,
    clipping_norm: float,
    noise_multiplier: float,
    num_sampled_clients: int,
    rank: int = 8,
) -> Strategy:
    """``strategy`` inside the DP wrapper ``mode`` names ("none" returns it unchanged).

    ``rank`` (the LoRA rank) enters RobustMerge's sensitivity bound, logged at start.
    """
    if mode == "none":
        return strategy
    wrapper = {"server-clipping": ServerSideClipping, "client-clipping": ClientSideClipping}.get(
        mode
    )
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
            strategy.merge_method,
            strategy.merge_hyperparameters,
        )
    elif factor > 1.0:
        log(
            WARNING,
            "DP: Flower calibrates noise for a mean of %d clipped updates; with merge method "
            "%r one client can move the released adapter up to %.3g times as much, so the "
            "effective noise multiplier is at most %.3g, not %.3g (README: Privacy and "
            "communication)",
            num_sampled_clients,
            strategy.merge_method,
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
    return wrapper(strategy, noise_multiplier, clipping_norm, num_sampled_clients)


def robustmerge_sensitivity_factor(
    strategy: FedRobustMerge, num_sampled_clients: int, rank: int
) -> float | None:
    """How much further one clipped client can move the released adapter than a mean allows.

    Flower's noise (std z C / m) is calibrated for a mean of m updates clipped to C, which one
    client moves by at most C / m: factor 1 (fedavg). For the other merges, with the server step
    eta and fuse weight lambda (add or remove one client whose update has norm <= C):

    - task_arithmetic sums lambda * delta over clients: the client moves the merge by up to
      lambda C; factor eta lambda m.
    - robustmerge paper-exact: A_m = sum_t lambda A^_t moves by up to lambda C (pruning only
      shrinks norms). Each column of B_m is lambda times a convex combination (weights
      s~_t[i] / sum_u s~_u[i]) of the clients' columns; the new client can shift column i by up
      to lambda (|b_i| + |c_i|) <= lambda (|b_i| + max_t |B^_t[:, i]|), at most lambda C (1 +
      sqrt(r)) over the r columns. Together: factor eta lambda m sqrt(1 + (1 + sqrt(r))^2),
      about 4 eta lambda m at r = 8.
    - paper-equation, ties, dare, svd: products, sign elections, random drops or an SVD; no
      bound is derived here (None).

    The effective noise multiplier is z / factor; it is an upper bound on the privacy the run
    gets, since the bounds above are worst cases.
    """
    method = strategy.merge_method
    if method == "fedavg":
        return 1.0
    fuse = strategy.merge_hyperparameters.get("fuse_weight", 1.0)
    weight = abs(float(max(fuse)) if isinstance(fuse, tuple) else float(fuse))
    base = strategy.server_lr * weight * num_sampled_clients
    if method == "task_arithmetic":
        return max(1.0, base)
    if method == "robustmerge" and strategy.merge_hyperparameters.get("mode") == "paper-exact":
        return max(1.0, base * math.sqrt(1.0 + (1.0 + math.sqrt(rank)) ** 2))
    return None


def core_strategy(strategy: Strategy) -> FedRobustMerge:
    """The FedRobustMerge inside any number of wrappers."""
    inner: object = strategy
    while not isinstance(inner, FedRobustMerge):
        inner = getattr(inner, "strategy", None)
        if inner is None:
            raise TypeError(f"{type(strategy).__name__} wraps no FedRobustMerge")
    return inner
