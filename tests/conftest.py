"""Fixtures shared across the test packages, and the Hypothesis profile every run uses."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import settings

# Derandomised by default: each property test draws the same examples on every run and every
# machine (seeded by the test itself), so a failure in CI reproduces locally as it was. Set
# HYPOTHESIS_PROFILE=explore to let Hypothesis draw fresh examples when hunting for new bugs.
settings.register_profile("derandomized", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "derandomized"))


@pytest.fixture
def flower_task_identity() -> Iterator[None]:
    """Flower stamps instruction messages with the identity of the running ServerApp task;
    tests that build instructions outside a ServerApp set one (and restore the old)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def flower_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog on Flower's logger "flwr" (progress lines and the strategy's log go there): when
    that logger does not propagate, caplog's handler is attached to it for the test."""
    flower = logging.getLogger("flwr")
    attach = not flower.propagate  # else caplog's root handler sees the records already
    if attach:
        flower.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="flwr")
    try:
        yield caplog
    finally:
        if attach:
            flower.removeHandler(caplog.handler)
