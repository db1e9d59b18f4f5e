"""Connecting to Ray from the training commands."""

from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None,
             include_dashboard: bool = True) -> None:
    """Connect to Ray once.

    Inside ``ray job submit`` (``RAY_ADDRESS`` is set) or with an explicit ``address`` it joins
    that cluster. Otherwise it starts a private local instance (``address="local"``) rather than
    attaching to whatever cluster happens to run on this machine. The dashboard stays on: Ray
    Train V2 logs a flood of warnings without it (STACK.md).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard,
                 log_to_driver=True)
