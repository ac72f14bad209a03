"""Fixtures shared across the test packages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def flower_task_identity() -> Iterator[None]:
    """Flower stamps instruction messages with the identity of the running ServerApp task;
    tests that build instructions outside a ServerApp set one (and restore the old)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
