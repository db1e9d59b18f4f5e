"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray instance for one test module (never an already running cluster)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024**2,
             include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()
