"""Adaptive routing across ingress replicas: the app's one router, and each replica's copy of it.

The app's ``Routing`` deployment holds one ``routing.Router`` (``AppRouter``), so the probe
schedule, the warm-up, the verdicts and the in-flight count that tells the load are the app's,
not one replica's: with two ingress replicas each learning alone, half the probes reached each,
each backed off half as fast, and a lone probe's verdict rested on half the samples (on the
Beauty target at concurrency 8, 20 of 192 requests took the slower path).

Asking it for every request put a handle call on every strict request's path (about 7 ms on 2
busy cores; on tiny models, 35 ms requests, the adaptive app reached 0.65-0.82x the target-only
app's throughput although its routes were right: ``results/serving-routing``). So a replica
routes from a **copy** (``Plan``): for each key with nothing pending (warm, no probe, no trial)
the app's router gives a standing ``routing.Order``, the best arm for the replica's share of
the requests left before the next probe, and the count of routed requests in flight elsewhere
(the load). A request whose key has an order goes at once, no call; one that has none (warm-up,
a probe due, a trial, a plan older than ``PLAN_TTL_S``) asks, and the answer brings a fresh
plan. Answers go back in batches (``sync``, off the requests' paths): ``SYNC_S`` after the
first one waiting, or with the next ask; at once (``SOON_S``: once the answer's response has
left, as a call costs the event loop a few ms of CPU) for an asked request (it may be a sample
a verdict waits for) and, where the app has several ingress replicas, when the replica has
nothing left in flight (so the others do not take a finished request for load: at
concurrency 1 one call per request, off its path). Each sync returns a fresh plan. A
replica's requests in flight on orders count for the app's load through what it last reported.

When the ``Routing`` replica does not answer within ``SHARED_TIMEOUT_S`` (it died and Serve is
replacing it, or it is overloaded), the replica drops its plan and routes with its own ``Router``
(its tickets say so, and their answers go back to it), and asks again after ``SHARED_RETRY_S``:
a routing outage costs at most one timeout per ``SHARED_RETRY_S``, never a request. Pure
asyncio, no Ray: ``RouterService`` is what the deployment's handle offers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Literal, Protocol

from atspeed_ray.serving.routing import ORDERED, Key, Load, Order, Route, Router

logger = logging.getLogger("ray.serve")

SHARED_TIMEOUT_S = 1.0  # the app's router answers within this, or this replica routes alone
SHARED_RETRY_S = 5.0  # after a miss, this replica routes alone for this long before asking again
SYNC_S = 0.2  # answers wait at most this long before they go to the app's router (one call)
SOON_S = 0.01  # "at once": after the answer's response has left (the call costs the event loop CPU)
PLAN_TTL_S = 1.0  # a plan older than this is not used (its load is stale): the request asks
REPLICA_TTL_S = 60.0  # a replica not heard from for this long gets no share of the orders
MAX_REPORTS = 10_000  # answers kept while the app's router does not answer (the oldest go)

Snapshot = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Report:
    """A routed request's answer: its latency (ms), or None (failed, or fell back: no sample)."""

    route: Route
    ms: float | None


@dataclass(frozen=True)
class Plan:
    """What a replica routes from until the next one: standing orders per key, and the routed
    requests in flight at the app's other replicas (for the load)."""

    orders: dict[Key, Order]
    others: int
    replicas: int = 1  # ingress replicas routing from the app's plans (heard from lately)


@dataclass(frozen=True)
class Heard:
    """What the app's router last heard from an ingress replica."""

    ordered: int  # its requests in flight on standing orders
    in_flight: int  # its routed requests in flight (asked and ordered)
    at: float  # when it got its last plan (the app router's clock)


class AppRouter:
    """The app's router as the ``Routing`` deployment holds it: a ``Router`` plus what each
    ingress replica has in flight on standing orders."""

    def __init__(self, router: Router, clock: Callable[[], float] = time.monotonic):
        self.router, self.clock = router, clock
        self.replicas: dict[str, Heard] = {}

    def _take(self, replica: str, reports: list[Report], ordered: int, in_flight: int) -> None:
        for r in reports:
            if r.ms is None:
                self.router.forget(r.route)
            else:
                self.router.observe(r.route, r.ms)
        self.replicas[replica] = Heard(ordered, in_flight, self.clock())

    def _fresh(self) -> dict[str, Heard]:
        """The replicas heard from within ``stale_s`` (an ingress that died counts no longer)."""
        now = self.clock()
        return {r: h for r, h in self.replicas.items() if now - h.at <= self.router.config.stale_s}

    def _plan(self, replica: str) -> Plan:
        fresh, now = self._fresh(), self.clock()
        active = [h.at for h in fresh.values() if now - h.at <= REPLICA_TTL_S]  # sharing the orders
        self.router.settle(min(active, default=now))
        total = len(self.router.in_flight) + sum(h.ordered for h in fresh.values())
        mine = fresh[replica].in_flight if replica in fresh else 0
        return Plan(self.router.orders(max(1, len(active))), max(0, total - mine), max(1, len(active)))

    def choose(self, replica: str, mode: str, k: int, reports: list[Report], ordered: int,
               in_flight: int) -> tuple[Route, Plan]:
        """A route for ``replica``'s request, after its answers so far; ``ordered`` /
        ``in_flight``: its requests in flight on orders / in all (before this one)."""
        self._take(replica, reports, ordered, in_flight + 1)
        others = sum(h.ordered for h in self._fresh().values())
        route = self.router.choose(mode, k, others)
        return route, self._plan(replica)

    def sync(self, replica: str, reports: list[Report], ordered: int, in_flight: int) -> Plan:
        """``replica``'s answers; its fresh plan."""
        self._take(replica, reports, ordered, in_flight)
        return self._plan(replica)


class RouterService(Protocol):
    """The app's router as an ingress replica reaches it (the ``Routing`` deployment's methods)."""

    def choose(self, replica: str, mode: str, k: int, reports: list[Report], ordered: int,
               in_flight: int) -> Awaitable[tuple[Route, Plan]]: ...

    def sync(self, replica: str, reports: list[Report], ordered: int, in_flight: int) -> Awaitable[Plan]: ...

    def snapshot(self) -> Awaitable[Snapshot]: ...


Source = Literal["app", "order", "replica"]  # who routed: the app's router, its order, this replica's router
Send = Literal["now", "later", "never"]  # when an answer goes to the app's router (``SOON_S``, ``SYNC_S``)


@dataclass(frozen=True)
class Ticket:
    """A request's route and who chose it (its answer goes back there)."""

    route: Route
    source: Source


class Replica:
    """One ingress replica's side, without I/O: its plan, its requests in flight, the answers
    waiting to go back (``RouterClient`` does the calls; the simulations drive this directly)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.orders: dict[Key, Order] = {}
        self.others = 0
        self.replicas = 1  # the app's ingress replicas, as the last plan counted them
        self.plan_at = float("-inf")
        self.in_flight = 0  # routed requests in flight here (asked and ordered)
        self.ordered = 0  # of which routed from orders
        self.reports: list[Report] = []
        self.dropped = 0  # answers dropped while the app's router did not answer
        self.asked = self.from_orders = 0

    def load(self) -> Load:
        return "batched" if self.in_flight + self.others > 0 else "alone"

    def apply(self, plan: Plan) -> None:
        self.orders, self.others, self.plan_at = dict(plan.orders), plan.others, self.clock()
        self.replicas = plan.replicas

    def clear(self) -> None:
        """No plan (the app's router does not answer)."""
        self.orders, self.others, self.plan_at = {}, 0, float("-inf")

    def decide(self, mode: str, k: int) -> Ticket | None:
        """The request's ticket from a standing order, or None: ask the app's router."""
        load = self.load()
        order = self.orders.get((mode, k, load))
        if order is None or order.budget < 1 or self.clock() - self.plan_at > PLAN_TTL_S:
            return None
        self.orders[(mode, k, load)] = Order(order.arm, order.budget - 1)
        return Ticket(Route(mode, k, order.arm, ORDERED, False, load), "order")

    def sent(self, ticket: Ticket) -> None:
        self.in_flight += 1
        self.ordered += ticket.source == "order"
        self.from_orders += ticket.source == "order"
        self.asked += ticket.source == "app"

    def done(self, ticket: Ticket, ms: float | None) -> Send:
        """A request's answer, and when it goes to the app's router."""
        self.in_flight -= 1
        self.ordered -= ticket.source == "order"
        if ticket.source == "replica":
            return "never"
        self.reports.append(Report(ticket.route, ms))
        self._trim()
        # an asked request may be a sample (warm-up, probe, its references, trial): its verdict
        # waits for it; an idle replica tells the other replicas' load it has nothing in flight
        idle = self.in_flight == 0 and self.replicas > 1
        return "now" if ticket.source == "app" or idle else "later"

    def drain(self) -> list[Report]:
        out, self.reports = self.reports, []
        return out

    def restore(self, reports: list[Report]) -> None:
        """Answers whose call failed go back in the queue (the oldest first)."""
        self.reports[:0] = reports
        self._trim()

    def _trim(self) -> None:
        """At most ``MAX_REPORTS`` answers wait; the oldest go first."""
        if len(self.reports) > MAX_REPORTS:
            self.dropped += len(self.reports) - MAX_REPORTS
            del self.reports[:-MAX_REPORTS]


class RouterClient:
    def __init__(self, local: Router, shared: RouterService | None,
                 send: Callable[[Awaitable[Any]], None], clock: Callable[[], float] = time.monotonic,
                 name: str = "replica"):
        """``local``: this replica's router; ``shared``: the app's (None: this replica's alone);
        ``send`` runs a call off the request's path; ``name``: this replica's, unique in the app."""
        self.local, self.shared, self.send, self.clock, self.name = local, shared, send, clock, name
        self.replica = Replica(clock)
        self.down_until = float("-inf")  # while the app's router is skipped (it missed a call)
        self.misses = 0  # calls the app's router did not answer in time
        self.flush_at: float | None = None  # when the next sync is due (a task waits for it)

    def _shared_up(self) -> bool:
        return self.shared is not None and self.clock() >= self.down_until

    def _missed(self, e: BaseException) -> None:
        self.misses += 1
        self.down_until = self.clock() + SHARED_RETRY_S
        self.replica.clear()
        logger.warning("adaptive routing: the app's router did not answer (%s); this ingress "
                       "replica routes alone for %.0f s", type(e).__name__, SHARED_RETRY_S)

    async def choose(self, mode: str, k: int) -> Ticket:
        rep, up = self.replica, self._shared_up()
        ticket = rep.decide(mode, k) if up else None
        if ticket is None and up:
            reports = rep.drain()
            try:
                route, plan = await asyncio.wait_for(
                    self.shared.choose(self.name, mode, k, reports, rep.ordered, rep.in_flight),
                    SHARED_TIMEOUT_S)
                rep.apply(plan)
                ticket = Ticket(route, "app")
            except Exception as e:  # noqa: BLE001 - a timeout or a dead replica: route here
                rep.restore(reports)
                self._missed(e)
        if ticket is None:
            ticket = Ticket(self.local.choose(mode, k), "replica")
        rep.sent(ticket)
        return ticket

    def observe(self, ticket: Ticket, ms: float) -> None:
        """A routed request's answer and its latency (ms), to the router that chose it."""
        self._done(ticket, ms)

    def forget(self, ticket: Ticket) -> None:
        """A routed request failed (or fell back): no sample."""
        self._done(ticket, None)

    def _done(self, ticket: Ticket, ms: float | None) -> None:
        when = self.replica.done(ticket, ms)
        if when == "never":
            if ms is None:
                self.local.forget(ticket.route)
            else:
                self.local.observe(ticket.route, ms)
        elif self.shared is None:
            return
        else:
            at = time.monotonic() + (SOON_S if when == "now" else SYNC_S)
            if self.flush_at is None or at < self.flush_at:  # else the sync due sooner takes it
                self.flush_at = at
                self.send(self._flush_at(at))

    async def _flush_at(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        if self.flush_at == at:
            self.flush_at = None
        if self.replica.reports:  # else a sync due sooner took them
            await self.flush()

    async def flush(self) -> None:
        """Send the waiting answers now; take the fresh plan."""
        rep = self.replica
        if not self._shared_up():
            return
        reports = rep.drain()
        try:
            rep.apply(await asyncio.wait_for(
                self.shared.sync(self.name, reports, rep.ordered, rep.in_flight), SHARED_TIMEOUT_S))
        except Exception as e:  # noqa: BLE001 - kept for the next call
            rep.restore(reports)
            self._missed(e)

    async def snapshot(self) -> tuple[str, Snapshot]:
        """``("app", the app's router's state)`` after this replica's waiting answers, or
        ``("replica", this replica's)`` while the app's does not answer."""
        if self._shared_up():
            await self.flush()
            try:
                if self._shared_up():
                    return "app", await asyncio.wait_for(self.shared.snapshot(), SHARED_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - shown from this replica instead
                pass
        return "replica", self.local.snapshot()

    def counts(self) -> dict[str, int]:
        """For /stats: routes asked of the app's router, taken from its orders, answers dropped."""
        r = self.replica
        return {"asked": r.asked, "from_orders": r.from_orders, "dropped_answers": r.dropped}
