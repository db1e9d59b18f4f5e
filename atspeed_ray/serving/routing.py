"""Adaptive routing of strict requests: speculative decoding or the target's beam search alone.

Speculation pays only when the draft is accepted often enough: with a weak draft a speculative
request costs more target work than plain beam search (every rejected round still verifies a
whole tree). In strict mode both paths return the same top-k, so the ingress may pick the faster
one per request without changing any answer. ``Router`` does that with two arms per ``(mode, k)``:

* it keeps an exponentially weighted mean of the latency of each arm (``alpha``);
* until each arm has ``warmup`` observations it alternates by requests sent (speculative first),
  so that concurrent first requests do not all take one arm;
* then it sends each request to the current best arm, except a probe to the other arm every
  ``probe_every``-th request, so that a draft that got better (or a load change) is seen. At most
  one probe is in flight per key: under concurrency the probes stay a bounded share of the
  requests (a probe that never answers stops counting after ``probe_every * max_backoff``);
* the best arm changes only after ``SWITCH_CONFIRM`` probes in a row answered faster than its
  mean by ``SWITCH_MARGIN`` (after a winning probe the next one goes at once). Latency grows
  with load, and the other arm's mean may date from a lighter load: when the best arm merely got
  slower than that stale mean, the router probes the other arm at once instead of sending
  traffic there; and one lucky answer (an easy history) proves little. Switching on any
  observation that flipped the means sent 14.5-19% of strict requests down the slower path at
  concurrency 16 (issue #32), 12.6% in ``test_adaptive_routing_holds_under_concurrency``;
* a probe that leaves the same arm best doubles the probe interval, up to ``probe_every *
  max_backoff`` requests; a switch resets it to ``probe_every``, so that it is re-checked soon;
* once an arm has an estimate, a sample counts as at most ``clip`` times that estimate, and a
  sample below ``1 / clip`` of the best arm's replaces it: requests stalled by an outage (a
  model replica died and was replaced) come back seconds late, and would otherwise keep the
  arm's mean up for hundreds of requests; one answer that fast shows the arm is fast again (the
  other arm's samples count as at least ``1 / clip`` of its mean). A real slowdown still shows,
  at up to ``1 + alpha * (clip - 1)`` times per sample. Failed requests are not samples;
* a probe answer slower than the other arm's mean replaces it: that mean may date from a
  lighter load, and clipped it took about 8 slow probes (each sent at once by the recheck above)
  to catch up on the served app (``jobs/serve_routing.py``: 12.5% of the requests down the
  slower path at concurrency 8, 1% with the replacement; ``results/serving-routing/RUN.md``).

Relaxed requests are never routed: their answer is a sample, and plain beam search is not one.
Pure Python, no Ray: the ingress owns one ``Router``; tests drive it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Arm = Literal["speculative", "target_only"]
ARMS: tuple[Arm, Arm] = ("speculative", "target_only")

# defaults of the app's ``probe_every`` / ``probe_backoff`` (``AppArgs``) and of ``Router``
PROBE_EVERY = 10
PROBE_BACKOFF = 16  # at most every 160th request probes while one arm keeps winning (< 1%: p99)
OUTLIER_CLIP = 2.0  # a latency sample counts as at most this multiple of its arm's mean
SWITCH_MARGIN = 0.05  # a probe answer this much faster than the best arm's mean is a win
SWITCH_CONFIRM = 3  # consecutive winning probes that move the traffic to the other arm


def other(arm: Arm) -> Arm:
    return "target_only" if arm == "speculative" else "speculative"


@dataclass
class ArmStats:
    mean_ms: float | None = None  # EWMA of latency
    n: int = 0  # observations
    sent: int = 0  # requests sent to it

    def observe(self, ms: float, alpha: float, clip: float, reset: Literal["down", "up"]) -> None:
        """EWMA of ``ms`` clipped to [1 / ``clip``, ``clip``] times the mean, except that a
        sample replaces the mean when it is under ``1 / clip`` of it (``reset="down"``) or above
        it (``"up"``)."""
        m = self.mean_ms
        if m is None or (ms * clip < m if reset == "down" else ms > m):
            self.mean_ms = ms
        else:
            self.mean_ms = (1 - alpha) * m + alpha * min(max(ms, m / clip), clip * m)
        self.n += 1


@dataclass
class KeyState:
    arms: dict[str, ArmStats] = field(default_factory=lambda: {a: ArmStats() for a in ARMS})
    best: Arm = "speculative"  # the arm that takes the traffic (once warm)
    requests: int = 0
    interval: int = 0  # requests between probes (probe_every, doubled while probes confirm)
    last_probe: int = 0  # request number of the last probe
    probing: bool = False  # a probe is in flight
    recheck: bool = False  # probe the other arm now: the best one got slower than its stale mean
    wins: int = 0  # consecutive probe answers faster than the best arm


class Router:
    def __init__(self, probe_every: int = PROBE_EVERY, warmup: int = 3, alpha: float = 0.2,
                 max_backoff: int = PROBE_BACKOFF, clip: float = OUTLIER_CLIP):
        if (probe_every < 2 or warmup < 1 or not 0.0 < alpha <= 1.0 or max_backoff < 1
                or clip <= 1.0):
            raise ValueError("need probe_every >= 2, warmup >= 1, 0 < alpha <= 1, max_backoff >= 1, "
                             "clip > 1")
        self.probe_every, self.warmup, self.alpha = probe_every, warmup, alpha
        self.max_backoff, self.clip = max_backoff, clip
        self.state: dict[tuple[str, int], KeyState] = {}

    def _key(self, mode: str, k: int) -> KeyState:
        return self.state.setdefault((mode, k), KeyState(interval=self.probe_every))

    def _warm(self, st: KeyState) -> bool:
        return min(a.n for a in st.arms.values()) >= self.warmup

    def best(self, mode: str, k: int) -> Arm:
        """The arm that takes the traffic (speculative until both arms are warm)."""
        return self._key(mode, k).best

    def choose(self, mode: str, k: int) -> Arm:
        st = self._key(mode, k)
        st.requests += 1
        spec, plain = st.arms["speculative"], st.arms["target_only"]
        if not self._warm(st):  # fill both arms, speculative first, by requests sent
            st.last_probe = st.requests
            arm: Arm = "speculative" if spec.sent <= plain.sent else "target_only"
        else:
            since = st.requests - st.last_probe
            stuck = st.probing and since >= self.probe_every * self.max_backoff  # never answered
            due = since >= st.interval or st.recheck
            if (not st.probing or stuck) and due:
                st.last_probe, st.probing, st.recheck = st.requests, True, False
                arm = other(st.best)
            else:
                arm = st.best
        st.arms[arm].sent += 1
        return arm

    def observe(self, mode: str, k: int, arm: Arm, latency_ms: float) -> None:
        st = self._key(mode, k)
        warm = self._warm(st)
        # a fast sample resets the best arm's mean (it recovered from an outage); one lucky
        # answer of the other arm must not make it look faster, but a slow one is fresh news:
        # it replaces a mean that may date from a lighter load (clipped, a stale mean took
        # about 8 slow probes to catch up on the served app, each sent at once by the recheck)
        st.arms[arm].observe(latency_ms, self.alpha, self.clip,
                             "down" if not warm or arm == st.best else "up")
        if not warm:
            if self._warm(st):  # warm now: the faster arm takes the traffic
                spec, plain = (st.arms[a].mean_ms for a in ARMS)
                st.best = "speculative" if spec <= plain else "target_only"  # type: ignore[operator]
            return
        probe = arm != st.best  # the other arm's answer: a probe (or a late one from before a switch)
        best_ms = st.arms[st.best].mean_ms
        assert best_ms is not None
        if probe:
            st.probing = False
            faster = latency_ms < best_ms * (1 - SWITCH_MARGIN)
            st.wins = st.wins + 1 if faster else 0
            if st.wins >= SWITCH_CONFIRM:  # fresh samples say the other arm is faster: switch
                st.best, st.wins, st.recheck = arm, 0, False
                st.interval, st.last_probe = self.probe_every, st.requests  # re-check soon
            elif faster:  # confirm it with the next probe, now
                st.recheck = True
            else:  # a probe that confirmed the best arm: back off
                st.interval = min(2 * st.interval, self.probe_every * self.max_backoff)
        other_ms = st.arms[other(st.best)].mean_ms
        assert other_ms is not None
        if not probe and other_ms < st.arms[st.best].mean_ms * (1 - SWITCH_MARGIN):  # type: ignore[operator]
            st.recheck = True  # the best arm got slower than the other's (maybe stale) mean: look

    def snapshot(self) -> dict[str, dict[str, float | int | str | None]]:
        """``{"strict/k=10": {"speculative_ms": .., "target_only_ms": .., "best": ..}}`` for /stats."""
        out: dict[str, dict[str, float | int | str | None]] = {}
        for (mode, k), st in sorted(self.state.items()):
            out[f"{mode}/k={k}"] = {
                "requests": st.requests, "best": st.best, "probe_interval": st.interval,
                **{f"{a}_ms": None if s.mean_ms is None else round(s.mean_ms, 3) for a, s in st.arms.items()},
                **{f"{a}_n": s.n for a, s in st.arms.items()},
                **{f"{a}_sent": s.sent for a, s in st.arms.items()}}
        return out
