"""Adaptive routing of strict requests: speculative decoding or the target's beam search alone.

Speculation pays only when the draft is accepted often enough: with a weak draft a speculative
request costs more target work than plain beam search (every rejected round still verifies a
whole tree). In strict mode both paths return the same top-k, so the ingress may pick the faster
one per request without changing any answer. ``Router`` does that with two arms per ``(mode, k)``:

* it keeps an exponentially weighted mean of the latency of each arm (``alpha``);
* until each arm has ``warmup`` observations it alternates (speculative first);
* then it sends each request to the arm with the lower mean, except every ``probe_every``-th
  request, which goes to the other arm so that a draft that got better (or a load change) is seen;
* a probe that leaves the same arm best doubles the probe interval, up to ``probe_every *
  max_backoff`` requests (probes cost latency while one arm keeps winning); any observation that
  flips the best arm (a probe's or not) resets it to ``probe_every``, so that a flip caused by a
  transient is re-checked soon;
* once an arm has an estimate, a sample counts as at most ``clip`` times that estimate, and a
  sample below ``1 / clip`` of it replaces it: requests stalled by an outage (a model replica
  died and was replaced) come back seconds late, and would otherwise keep the arm's mean up for
  hundreds of requests; one answer that fast shows the arm is fast again. A real slowdown still
  shows, at up to ``1 + alpha * (clip - 1)`` times per sample. Failed requests are not samples.

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
PROBE_BACKOFF = 8
OUTLIER_CLIP = 2.0  # a latency sample counts as at most this multiple of its arm's mean


@dataclass
class ArmStats:
    mean_ms: float | None = None  # EWMA of latency
    n: int = 0

    def observe(self, ms: float, alpha: float, clip: float) -> None:
        if self.mean_ms is None or ms * clip < self.mean_ms:
            self.mean_ms = ms
        else:
            self.mean_ms = (1 - alpha) * self.mean_ms + alpha * min(ms, clip * self.mean_ms)
        self.n += 1


@dataclass
class KeyState:
    arms: dict[str, ArmStats] = field(default_factory=lambda: {a: ArmStats() for a in ARMS})
    requests: int = 0
    interval: int = 0  # requests between probes (probe_every, doubled while probes confirm)
    last_probe: int = 0  # request number of the last probe
    probes: int = 0  # probes sent and not yet observed


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
        """The arm with the lower mean latency (speculative while either is unmeasured)."""
        s = self._key(mode, k).arms
        spec, plain = s["speculative"].mean_ms, s["target_only"].mean_ms
        if spec is None or plain is None:
            return "speculative"
        return "speculative" if spec <= plain else "target_only"

    def choose(self, mode: str, k: int) -> Arm:
        st = self._key(mode, k)
        st.requests += 1
        spec, plain = st.arms["speculative"], st.arms["target_only"]
        if not self._warm(st):  # fill both arms, speculative first
            st.last_probe = st.requests
            return "speculative" if spec.n <= plain.n else "target_only"
        best = self.best(mode, k)
        if st.requests - st.last_probe >= st.interval:
            st.last_probe = st.requests
            st.probes += 1
            return "target_only" if best == "speculative" else "speculative"
        return best

    def observe(self, mode: str, k: int, arm: Arm, latency_ms: float) -> None:
        st = self._key(mode, k)
        warm, before = self._warm(st), self.best(mode, k)
        st.arms[arm].observe(latency_ms, self.alpha, self.clip)
        if not warm:
            return
        probe = arm != before and st.probes > 0  # late answers of the old best arm are no probes
        st.probes -= int(probe)
        if self.best(mode, k) != before:  # a flip: probe again soon, whatever caused it
            st.interval, st.last_probe = self.probe_every, st.requests
        elif probe:  # a probe that confirmed the best arm: back off
            st.interval = min(2 * st.interval, self.probe_every * self.max_backoff)

    def snapshot(self) -> dict[str, dict[str, float | int | str | None]]:
        """``{"strict/k=10": {"speculative_ms": .., "target_only_ms": .., "best": ..}}`` for /stats."""
        out: dict[str, dict[str, float | int | str | None]] = {}
        for (mode, k), st in sorted(self.state.items()):
            out[f"{mode}/k={k}"] = {
                "requests": st.requests, "best": self.best(mode, k), "probe_interval": st.interval,
                **{f"{a}_ms": None if s.mean_ms is None else round(s.mean_ms, 3) for a, s in st.arms.items()},
                **{f"{a}_n": s.n for a, s in st.arms.items()}}
        return out
