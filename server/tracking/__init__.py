"""Experiment tracking: a run's config, rounds, clients and final adapter in TensorBoard or MLflow.

Run config ``tracking`` picks the backend ("none", "tensorboard", "mlflow"; docs/tracking.md),
``tracking-uri`` where MLflow writes. The backends' libraries are an optional extra
(``pip install '.[tracking]'``, which ``scripts/setup.sh`` installs) and are imported only when
a run asks for them; ``backend_refusal`` names the missing one at start-up.

- ``base``: the ``Tracker`` protocol, the per-client ``ClientRow``, ``NoTracker``;
- ``scalars``: a round's history entry -> the scalars and rows logged (pure);
- ``replies``: ``ReplyTap``, the grid that notes each client's train loss and examples;
- ``guard``: ``GuardedTracker``, which turns a backend failure into a warning and a count;
- ``tensorboard_backend``, ``mlflow_backend``: the two writers;
- ``observer``: ``RunTracking``, what the round loop calls at its four points.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from server.tracking.base import ClientRow, NoTracker, Tracker
from server.tracking.guard import GuardedTracker
from server.tracking.observer import RunTracking

__all__ = [
    "BACKEND_MODULES",
    "ClientRow",
    "GuardedTracker",
    "NoTracker",
    "RunTracking",
    "Tracker",
    "backend_refusal",
    "open_tracking",
]

# Backend -> the packages it imports (the ``tracking`` extra of pyproject.toml).
BACKEND_MODULES: dict[str, tuple[str, ...]] = {
    "none": (),
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow",),
}
INSTALL_HINT = "pip install '.[tracking]' (or bash scripts/setup.sh)"


def backend_refusal(backend: str) -> str | None:
    """Why run config ``tracking`` = ``backend`` cannot run here (a package it needs is not
    installed: which, and how to install it); None when it can."""
    missing = [name for name in BACKEND_MODULES[backend] if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (
        f"run config 'tracking' = {backend!r} needs the {', '.join(missing)} package, which is "
        f"not installed in this environment; install the tracking extra: {INSTALL_HINT}, "
        "or set tracking = 'none'"
    )


def open_tracking(backend: str, uri: str, run_dir: Path) -> RunTracking:
    """The run's tracking: ``backend`` writing under ``run_dir`` (MLflow at ``uri``, "" = the
    SQLite file there), its failures caught and counted."""
    tracker: Tracker
    if backend == "tensorboard":
        from server.tracking.tensorboard_backend import TensorBoardTracker

        tracker = TensorBoardTracker(run_dir)
    elif backend == "mlflow":
        from server.tracking.mlflow_backend import MlflowTracker

        tracker = MlflowTracker(run_dir, uri)
    elif backend == "none":
        tracker = NoTracker()
    else:
        raise ValueError(f"unknown tracking backend {backend!r}; one of {list(BACKEND_MODULES)}")
    return RunTracking(GuardedTracker(tracker))
