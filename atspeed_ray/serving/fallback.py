"""The fallback policy of the ingress: when speculation gives way to the target alone.

A request tries the draft only with a ticket from the draft breaker (``retry.DraftBreaker``:
after a draft failure the target answers alone for a cooldown); a draft that fails or misses its
deadline, or a speculative path whose target call failed, falls back to the target's own beam
search (the strict answer). ``FallbackPolicy`` owns the breaker and the counting: the ingress
counters (``fallbacks``, ``fallback_<reason>``), the metric (any ``CounterLike``: Ray's
``Counter`` in the app, a list in tests) and the request's ``stats``. Pure Python, no Ray.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from atspeed_ray.serving.retry import DraftBreaker

logger = logging.getLogger("ray.serve")

# the breaker is open: the draft failed moments ago (logged once, when the breaker opened)
DRAFT_DOWN = "draft_down"
DETAIL_CHARS = 200  # stats.fallback_detail keeps this much of the cause


class CounterLike(Protocol):
    """What the policy needs of a metric (``ray.serve.metrics.Counter`` has it)."""

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None: ...


class FallbackPolicy:
    """The draft breaker, and the count of every fallback (see the module docstring)."""

    def __init__(self, breaker: DraftBreaker, counts: dict[str, float], metric: CounterLike):
        self.breaker, self.counts, self.metric = breaker, counts, metric

    def ticket(self) -> float | None:
        """A ticket to try the draft (its start time), or None: the breaker is open."""
        return self.breaker.allow()

    def draft_ok(self) -> None:
        """The draft answered every call of a request: the breaker closes."""
        self.breaker.succeeded()

    def draft_failed(self, ticket: float) -> None:
        """A draft call of the request holding ``ticket`` failed: the breaker opens."""
        self.breaker.failed(ticket)

    def note(self, reason: str, detail: str, stats: dict[str, Any]) -> None:
        """Count a fallback to the target alone and note it in the request's ``stats``."""
        self.counts["fallbacks"] = self.counts.get("fallbacks", 0) + 1
        self.counts[f"fallback_{reason}"] = self.counts.get(f"fallback_{reason}", 0) + 1
        self.metric.inc(tags={"reason": reason})
        if reason != DRAFT_DOWN:
            logger.warning("target-only fallback (%s): %s", reason, detail)
        stats.update(path="fallback", fallback_reason=reason, fallback_detail=detail[:DETAIL_CHARS])

    def snapshot(self) -> dict[str, float | int | bool]:
        return self.breaker.snapshot()
