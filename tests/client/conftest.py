"""Fixtures for the client tests: the workload tests' tiny model and one torch thread."""

from tests.workload.conftest import one_torch_thread, tiny_model_dir

__all__ = ["one_torch_thread", "tiny_model_dir"]
