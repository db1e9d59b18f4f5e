"""Where a speculative search spends its time: an optional per-phase timer.

``speculative_search(..., timings=Timings(device))`` adds the wall time of every phase of every
round to one ``Timings`` (seconds, summed over rounds and calls):

* ``draft``: the draft phase (the draft's forwards and its width-N beam steps);
* ``verify``: the verification pass (the target's one forward and its column log-probs);
* ``accept``: acceptance (strict or relaxed) of the drafted steps;
* ``bookkeeping``: cache compaction (both tree caches drop rejected branches and finished
  requests), per-request counters, retiring finished requests;
* ``total``: the whole call; ``rest`` = total - the four phases (root beams, the loop itself,
  the result).

Off (``timings=None``, the default) a phase costs one ``nullcontext``. On CUDA the timer waits
for the device at each phase boundary (only when timing is on), so a phase's time is its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

PHASES = ("draft", "verify", "accept", "bookkeeping")


@dataclass
class Timings:
    """Seconds per phase (``PHASES``) and in total, summed over the calls it was passed to."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seconds: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    total: float = 0.0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def _clock(self, name: str | None) -> Iterator[None]:
        """Time the block into phase ``name``, or into ``total`` when ``name`` is None."""
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            dt = time.perf_counter() - t0
            if name is None:
                self.total += dt
            else:
                self.seconds[name] += dt

    def phase(self, name: str) -> AbstractContextManager[None]:
        """Around one phase of a search (one of ``PHASES``)."""
        return self._clock(name)

    def whole(self) -> AbstractContextManager[None]:
        """Around a whole search call: adds to ``total``."""
        return self._clock(None)

    @property
    def rest(self) -> float:
        return max(self.total - sum(self.seconds.values()), 0.0)

    def per_request(self, n_requests: int) -> dict[str, float]:
        """Milliseconds per request: ``<phase>_ms`` for each phase, ``rest_ms`` and ``total_ms``."""
        ms = {f"{p}_ms": 1e3 * s / n_requests for p, s in self.seconds.items()}
        ms["rest_ms"] = 1e3 * self.rest / n_requests
        ms["total_ms"] = 1e3 * self.total / n_requests
        return ms


def phase(timings: Timings | None, name: str) -> AbstractContextManager[None]:
    """``timings.phase(name)``, or a no-op when timing is off."""
    return nullcontext() if timings is None else timings.phase(name)


def whole(timings: Timings | None) -> AbstractContextManager[None]:
    """``timings.whole()``, or a no-op when timing is off."""
    return nullcontext() if timings is None else timings.whole()
