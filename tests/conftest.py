"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that gets Ray through ``ray_local`` carries the ``ray`` marker."""
    unmarked = [item.nodeid for item in items
                if "ray_local" in getattr(item, "fixturenames", ()) and item.get_closest_marker("ray") is None]
    if unmarked:
        raise pytest.UsageError("tests using ray_local need @pytest.mark.ray: " + ", ".join(unmarked))


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray instance for one test module (never an already running cluster)."""
    ray = pytest.importorskip("ray")
    from atspeed_ray.training.ray_utils import private_token, unniced_workers

    private_token()  # token auth, a token of the test process's own (nothing in ~/.ray)
    unniced_workers()  # the product's own setting: workers at the test process's priority
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024**2,
             include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Offline references in one thread: on a busy 2-core machine, 2-thread OpenMP kernels stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
