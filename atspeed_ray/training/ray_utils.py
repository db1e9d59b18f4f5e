"""Connecting to Ray from the training commands, and keeping the libraries' output on stderr.

The commands write their own report (stage lines, progress, tables) to stdout and leave stderr to
Ray, DeepSpeed and the other libraries, so that ``2> file`` (what ``jobs/demo.py`` does per stage)
separates the two. Ray logs to stderr already, and so do its actors' forwarded log lines."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator


LOOPBACK = "127.0.0.1"


def init_ray(address: str | None = None, num_cpus: int | None = None,
             include_dashboard: bool = True, namespace: str | None = None,
             object_store_memory: int | None = None) -> None:
    """Connect to Ray once.

    Inside ``ray job submit`` (``RAY_ADDRESS`` is set) or with an explicit ``address`` it joins
    that cluster. Otherwise it starts a private local instance (``address="local"``) rather than
    attaching to whatever cluster happens to run on this machine. The dashboard stays on: Ray
    Train V2 logs a flood of warnings without it. The private instance listens on loopback only
    (``loopback_only``): no other host can reach it, whatever its auth mode.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, namespace=namespace)
    else:
        with loopback_only():
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard,
                     log_to_driver=True, namespace=namespace,
                     object_store_memory=object_store_memory, dashboard_host=LOOPBACK)


# Ray's single-machine mode (its default on macOS and Windows): the node address is 127.0.0.1,
# and with it GCS, raylet, object manager, workers and agents listen on loopback only.
# ``ray.init(_node_ip_address="127.0.0.1")`` does not do it: Ray swaps a loopback address for
# the machine's reachable one.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Single-machine mode while a local instance starts (its processes inherit it); restored
    afterwards, so that a later ``ray start`` from this process is not refused."""
    from ray._private import ray_constants

    saved_env, saved = os.environ.get(SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import; ray is imported by now
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = saved_env


@contextlib.contextmanager
def library_output_to_stderr() -> Iterator[None]:
    """DeepSpeed prints its setup messages (``... built successfully``) and logs through a handler
    on stdout: send both to stderr while it is set up (and its logger for good)."""
    for handler in logging.getLogger("DeepSpeed").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):
        yield
