"""The orderly stop of ``atspeed-ray serve``: refuse new requests, answer the accepted ones, exit.

``serve.shutdown()`` alone kills Serve's HTTP proxy at once (only replicas drain), so requests in
flight lose their connection. Before it, the server process (``process.py``) calls ``drain``:

1. ``announce_stop``: writes the stop time under ``STOP_KEY`` in Ray's internal key-value store
   and puts Serve's proxies in their draining state (Serve's own ``/-/healthz`` turns 503). Each
   ingress replica (``Recommender``) reads the key at most every ``STOP_CHECK_S`` (``StopFlag``):
   ``/readyz`` answers 503 at once; a ``/recommend`` that reaches it within ``STOP_GRACE_S`` of
   the stop is still answered (it was on its way: sent before the stop, or before a load
   balancer saw the 503), a later one gets a 503 with ``Retry-After`` and ``Connection: close``.
2. After the grace, it waits until no proxy holds an HTTP request (``ProxyActor.is_drained``),
   at most ``DRAIN_S``.

Needs Ray connected (``ray.init`` in the process, a Serve replica).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

STOP_KEY = b"atspeed-serve-stopping"
KV_NAMESPACE = "atspeed"
STOP_CHECK_S = 0.2  # an ingress replica reads the stop key at most this often
STOP_GRACE_S = 1.0  # /recommend is still answered this long after the stop (requests on their way)
DRAIN_S = 30.0  # the longest the accepted requests are given to finish
DRAIN_POLL_S = 0.2
# Serve's proxy reports "drained" only after draining this long (Serve's default, 30 s, is for
# node draining); set in the environment of the private instance before its proxy starts
PROXY_MIN_DRAINING_ENV = "RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S"
PROXY_MIN_DRAINING_S = 0.5
STOPPING_DETAIL = "the server is stopping; retry"


def stopped_at() -> float | None:
    """The stop's wall-clock time, or None before ``announce_stop``."""
    from ray.experimental.internal_kv import _internal_kv_get

    value = _internal_kv_get(STOP_KEY, namespace=KV_NAMESPACE)
    return None if value is None else float(value)


class StopFlag:
    """``await flag.since()``: the stop's time once announced, else None; read at most every
    ``STOP_CHECK_S`` (one GCS read off the event loop), kept once seen."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.checked = float("-inf")

    async def since(self) -> float | None:
        now = time.monotonic()
        if self.at is None and now - self.checked >= STOP_CHECK_S:
            self.checked = now
            self.at = await asyncio.to_thread(stopped_at)
        return self.at

    async def refuses(self) -> bool:
        """A new request is refused: the stop began over ``STOP_GRACE_S`` ago."""
        at = await self.since()
        return at is not None and time.time() - at > STOP_GRACE_S


def proxies() -> list[Any]:
    """Serve's proxy actors (one per node)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    return list(ray.get(controller.get_proxies.remote()).values())


def announce_stop() -> list[Any]:
    """Tell the ingress replicas and Serve's proxies; returns the proxies."""
    import ray
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(STOP_KEY, repr(time.time()).encode(), overwrite=True, namespace=KV_NAMESPACE)
    actors = proxies()
    ray.get([p.update_draining.remote(True) for p in actors])
    return actors


def drain(limit_s: float = DRAIN_S) -> bool:
    """``announce_stop``, the grace, then wait for the proxies to hold no request: True once
    none does, False after ``limit_s`` (grace included)."""
    import ray

    deadline = time.monotonic() + limit_s
    actors = announce_stop()
    time.sleep(STOP_GRACE_S + STOP_CHECK_S)
    while not all(ray.get([p.is_drained.remote() for p in actors])):
        if time.monotonic() > deadline:
            return False
        time.sleep(DRAIN_POLL_S)
    return True
