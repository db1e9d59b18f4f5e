"""The ingress side of adaptive routing: the app's one router, and this replica's own meanwhile.

Every ingress replica asks the app's ``Routing`` deployment (one ``routing.Router`` for the
whole app) for each strict request's route, so the probe schedule, the warm-up, the verdicts and
the in-flight count that tells the load are the app's, not one replica's: with two ingress
replicas each learning alone, half the probes reached each, each backed off half as fast, and
a lone probe's verdict rested on half the samples (on the Beauty target at concurrency 8, 20 of
192 requests took the slower path). Answers go back off the request's path (fire and forget).

When the ``Routing`` replica does not answer within ``SHARED_TIMEOUT_S`` (it died and Serve is
replacing it, or it is overloaded), the request is routed by this replica's own ``Router`` (its
tickets say so, and their answers go back to it), and the shared one is asked again after
``SHARED_RETRY_S``: a routing outage costs at most one timeout per ``SHARED_RETRY_S``, never a
request. Pure asyncio, no Ray: ``RouterService`` is what the deployment's handle offers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

from atspeed_ray.serving.routing import Route, Router

logger = logging.getLogger("ray.serve")

SHARED_TIMEOUT_S = 1.0  # the app's router answers a choice within this, or this replica routes it
SHARED_RETRY_S = 5.0  # after a miss, this replica routes alone for this long before asking again

Snapshot = dict[str, dict[str, Any]]


class RouterService(Protocol):
    """The app's router as an ingress replica reaches it (the ``Routing`` deployment's methods)."""

    def choose(self, mode: str, k: int) -> Awaitable[Route]: ...

    def observe(self, route: Route, ms: float) -> Awaitable[None]: ...

    def forget(self, route: Route) -> Awaitable[None]: ...

    def snapshot(self) -> Awaitable[Snapshot]: ...


@dataclass(frozen=True)
class Ticket:
    """A request's route and the router that chose it (its answer goes back there)."""

    route: Route
    shared: bool  # chosen by the app's router (else by this replica's own)


class RouterClient:
    def __init__(self, local: Router, shared: RouterService | None,
                 send: Callable[[Awaitable[Any]], None], clock: Callable[[], float] = time.monotonic):
        """``local``: this replica's router; ``shared``: the app's (None: this replica's alone);
        ``send`` runs an answer's call off the request's path."""
        self.local, self.shared, self.send, self.clock = local, shared, send, clock
        self.down_until = float("-inf")  # while the app's router is skipped (it missed a choice)
        self.misses = 0  # choices the app's router did not answer in time

    def _shared_up(self) -> bool:
        return self.shared is not None and self.clock() >= self.down_until

    async def choose(self, mode: str, k: int) -> Ticket:
        if self.shared is not None and self._shared_up():
            try:
                return Ticket(await asyncio.wait_for(self.shared.choose(mode, k), SHARED_TIMEOUT_S), True)
            except Exception as e:  # noqa: BLE001 - a timeout or a dead replica: route here
                self.misses += 1
                self.down_until = self.clock() + SHARED_RETRY_S
                logger.warning("adaptive routing: the app's router did not answer (%s); this "
                               "ingress replica routes alone for %.0f s", type(e).__name__, SHARED_RETRY_S)
        return Ticket(self.local.choose(mode, k), False)

    def observe(self, ticket: Ticket, ms: float) -> None:
        """A routed request's answer and its latency (ms), to the router that chose it."""
        if ticket.shared and self.shared is not None:
            self.send(self.shared.observe(ticket.route, ms))
        else:
            self.local.observe(ticket.route, ms)

    def forget(self, ticket: Ticket) -> None:
        """A routed request failed (or fell back): no sample."""
        if ticket.shared and self.shared is not None:
            self.send(self.shared.forget(ticket.route))
        else:
            self.local.forget(ticket.route)

    async def snapshot(self) -> tuple[str, Snapshot]:
        """``("app", the app's router's state)``, or ``("replica", this replica's)`` while the
        app's does not answer."""
        if self.shared is not None and self._shared_up():
            try:
                return "app", await asyncio.wait_for(self.shared.snapshot(), SHARED_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - shown from this replica instead
                pass
        return "replica", self.local.snapshot()
