"""Faults: what the ingress does when a model replica dies, and replicas that cannot start.

* ``with_retries``: a target call whose replica died under it (``ActorDiedError``, or the
  replica became unavailable) is sent again, at most ``RetryConfig.attempts`` times in all with
  a short doubling backoff. Serve's router has dropped the dead replica by then, so the retry
  goes to another replica, or waits for the restarted one (within the call's own timeout). The
  rounds are stateless, so a retried call gives the same answer. Other errors (a bug, a
  timeout) are not retried.
* ``DraftBreaker``: after a draft failure the ingress answers with the target alone for
  ``draft_cooldown_s`` (doubling while the draft keeps failing, up to ``draft_cooldown_max_s``)
  instead of making every request wait for a draft deadline while no draft replica runs. After
  the cooldown one request tries the draft; its success closes the breaker.
* ``start_errors``: a replica constructor that fails raises one line naming the replica, the
  path and the cause (Serve shows it in ``serve status``; ``atspeed-ray serve`` prints it and
  exits), not a library's deep traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from atspeed_ray.serving.config import RetryConfig

T = TypeVar("T")

logger = logging.getLogger("ray.serve")


class ReplicaStartError(RuntimeError):
    """A replica constructor failed; the message is the whole story, in one line."""


@contextlib.contextmanager
def start_errors(what: str) -> Iterator[None]:
    """Any exception inside becomes ``ReplicaStartError("WHAT: Type: first line")``."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised as one line
        text = str(e).strip().splitlines()
        raise ReplicaStartError(f"{what}: {type(e).__name__}: {text[0][:300] if text else ''}") from None


def replica_failure(e: BaseException) -> bool:
    """True when ``e`` says the replica serving the call is gone (not that the call failed)."""
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(e, RayActorError):  # ActorDiedError, ActorUnavailableError
        return True
    return isinstance(e, RayTaskError) and isinstance(getattr(e, "cause", None), RayActorError)


async def with_retries(call: Callable[[], Awaitable[T]], config: RetryConfig,
                       retryable: Callable[[BaseException], bool] = replica_failure,
                       on_retry: Callable[[BaseException], None] | None = None) -> T:
    """``await call()``, again (a new call each time) while it fails with a ``retryable`` error,
    at most ``config.attempts`` tries; ``on_retry(error)`` before each new try."""
    delay = config.backoff_s
    for attempt in range(1, config.attempts + 1):
        try:
            return await call()
        except Exception as e:  # noqa: BLE001 - re-raised unless retryable and budget left
            if attempt == config.attempts or not retryable(e):
                raise
            if on_retry is not None:
                on_retry(e)
        if attempt > 1:  # the first retry goes at once: the router has dropped the dead replica
            await asyncio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")  # the last attempt returned or raised


class Retries:
    """``with_retries`` for one deployment's calls, counted (``retries`` in each of ``counts``
    and the metric ``atspeed_retries``, by method) and logged."""

    def __init__(self, config: RetryConfig, deployment: str):
        from ray.serve.metrics import Counter

        self.config, self.deployment = config, deployment
        # "deployment" is a tag Ray Serve sets itself (and refuses as a user tag)
        self.metric = Counter("atspeed_retries", description="model calls sent again because their "
                              "replica died", tag_keys=("callee", "method"))

    async def call(self, make: Callable[[], Awaitable[T]], method: str,
                   counts: list[dict[str, object]]) -> T:
        def retried(e: BaseException) -> None:
            for c in counts:
                c["retries"] = int(c.get("retries", 0)) + 1  # type: ignore[call-overload]
            self.metric.inc(tags={"callee": self.deployment, "method": method})
            logger.warning("%s.%s: replica gone (%s), sending again", self.deployment, method,
                           type(e).__name__)

        return await with_retries(make, self.config, on_retry=retried)


class DraftBreaker:
    """Target alone for a cooldown after a draft failure; ``clock``: seconds.

    ``allow()`` gives a request a ticket (its start time) to try the draft, or None: answer with
    the target alone. Once the cooldown is over one request at a time tries the draft (the
    others keep to the target for ``draft_cooldown_s`` while it does); its success closes the
    breaker, its failure opens it for twice as long (up to ``draft_cooldown_max_s``). Failures
    of requests that began before the breaker opened (in flight when the draft died) do not
    count again."""

    def __init__(self, config: RetryConfig, clock: Callable[[], float] = time.monotonic):
        self.config, self.clock = config, clock
        self.cooldown = config.draft_cooldown_s  # of the next opening
        self.open_until = 0.0  # 0: closed
        self.opened_at = float("-inf")
        self.trips = 0

    @property
    def enabled(self) -> bool:
        return self.config.draft_cooldown_s > 0

    def allow(self) -> float | None:
        now = self.clock()
        if not self.enabled or self.open_until == 0:
            return now
        if now < self.open_until:
            return None
        self.open_until = now + self.config.draft_cooldown_s  # this one tries; the others wait
        return now

    def failed(self, ticket: float) -> None:
        if not self.enabled or ticket < self.opened_at:
            return
        now = self.clock()
        self.opened_at, self.open_until = now, now + self.cooldown
        self.cooldown = min(2 * self.cooldown, self.config.draft_cooldown_max_s)
        self.trips += 1

    def succeeded(self) -> None:
        self.open_until, self.cooldown = 0.0, self.config.draft_cooldown_s

    def snapshot(self) -> dict[str, float | int | bool]:
        open_ = self.open_until != 0 and self.clock() < self.open_until
        return {"open": open_, "trips": self.trips, "next_cooldown_s": self.cooldown}
