"""The server step against the clients' local work: a start-up warning where the measured
benchmarks saw that step overshoot (issue 31, the regime map).

What and why
------------
A client's update grows with the local steps it trains per round, so the server step that
works shrinks as they grow. Tuned on the seen tasks' dev splits at 7 clients with one task
each, FedAvg's best server lr was 16 at 2 local steps per round (quality v2,
``benchmarks/results/quality.md``, 5 rounds) and 2 at 64 steps (the regime map,
``benchmarks/results/regimes.md``, 1 and 3 rounds; 4 lost 8 dev points at 1 round). Between
and beyond those points the rule interpolates in log-log space, lr(s) = 16 (s / 2)^k with
k = log(2 / 16) / log(64 / 2) = -0.6: 4.6 at the app's default 16 steps, where the default
server lr is 4. A run whose server lr is more than ``OVERSHOOT`` times lr(s) gets a warning
naming both numbers: at the default server lr 4, raising ``local-epochs`` to 4 (64 steps)
warns, and that setting took the final adapter below the base model on unseen tasks in a
trial. It warns and does not refuse: the rule rests on one seed's dev scores at two points,
and a user may have measured their own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# (local steps per round, FedAvg's tuned server lr), 7 clients one task each (module docstring).
MEASURED_STEPS_LR = ((2, 16.0), (64, 2.0))
# Warn above this multiple of the interpolated tuned server lr.
OVERSHOOT = 1.5
# Merge methods whose tuned server lr was measured below FedAvg's at the same local work, as
# the ratio (the regime map, 7 clients one task each, 64 steps, dev): TIES (fuse weight 2) was
# best at 0.5 where FedAvg was best at 2, and collapsed at 2 (7.6 % dev after 3 rounds).
METHOD_LR_SCALE: Mapping[str, float] = {"ties": 0.25}


def local_steps(train_examples: int, batch_size: int, local_epochs: int) -> int:
    """Optimiser steps a client takes per round: ceil(examples / batch) per epoch."""
    return math.ceil(train_examples / batch_size) * local_epochs


def tuned_server_lr(steps: int) -> float:
    """The server lr the benchmarks found best at ``steps`` local steps per round
    (log-log interpolation through ``MEASURED_STEPS_LR``, extrapolated beyond them; at most the
    value measured at the fewest steps)."""
    (s0, lr0), (s1, lr1) = MEASURED_STEPS_LR
    slope = math.log(lr1 / lr0) / math.log(s1 / s0)
    return float(min(lr0, lr0 * (max(steps, 1) / s0) ** slope))


def server_lr_warning(server_lr: float, steps: int, merge_method: str = "fedavg") -> str | None:
    """A warning when ``server_lr`` is over ``OVERSHOOT`` times the tuned lr at ``steps`` (for
    ``merge_method``: FedAvg's, times its ``METHOD_LR_SCALE`` where one was measured)."""
    scale = METHOD_LR_SCALE.get(merge_method, 1.0)
    tuned = tuned_server_lr(steps) * scale
    if server_lr <= OVERSHOOT * tuned:
        return None
    method = "" if scale == 1.0 else f"; {merge_method} needs {scale:g}x FedAvg's"
    return (
        f"server-lr {server_lr:g} with {steps} local steps per client and round is more than "
        f"{OVERSHOOT:g}x the server lr the benchmarks found best at that much local work "
        f"(about {tuned:.2g}; FedAvg: 16 at 2 steps, 2 at 64{method}): a client that trains "
        "longer moves further, so a large server step overshoots (the final adapter fell below "
        "the base model on unseen tasks in one such run). Consider server-lr "
        f"{tuned:.2g}; docs/quality.md, 'The server step and local work'"
    )


def run_config_warning(run_config: Mapping[str, Any]) -> str | None:
    """``server_lr_warning`` for a run config (its server-lr, train-examples, batch-size and
    local-epochs, and merge-method; None when a number is missing or not a number)."""
    keys = ("server-lr", "train-examples", "batch-size", "local-epochs")
    values: list[float] = []
    for key in keys:
        value = run_config.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None
        values.append(float(value))
    server_lr, examples, batch, epochs = values
    if batch <= 0:
        return None
    method = run_config.get("merge-method")
    return server_lr_warning(
        server_lr,
        local_steps(int(examples), int(batch), int(epochs)),
        method if isinstance(method, str) else "fedavg",
    )
