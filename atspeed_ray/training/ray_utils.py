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
    Train V2 logs a flood of warnings without it. The private instance binds the loopback address
    (GCS, raylet, workers, dashboard): it runs without auth, so no other host may reach it.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, namespace=namespace)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard,
                 log_to_driver=True, namespace=namespace, object_store_memory=object_store_memory,
                 _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK)


@contextlib.contextmanager
def library_output_to_stderr() -> Iterator[None]:
    """DeepSpeed prints its setup messages (``... built successfully``) and logs through a handler
    on stdout: send both to stderr while it is set up (and its logger for good)."""
    for handler in logging.getLogger("DeepSpeed").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):
        yield
