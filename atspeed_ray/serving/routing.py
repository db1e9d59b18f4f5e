"""Adaptive routing of strict requests: speculative decoding or the target's beam search alone.

Speculation pays only when the draft is accepted often enough: with a weak draft a speculative
request costs more target work than plain beam search (every rejected round still verifies a
whole tree). In strict mode both paths return the same top-k, so the ingress may pick the faster
one per request without changing any answer. ``Router`` does that with two arms per ``(mode, k)``:

* it keeps an exponentially weighted mean of the latency of each arm (``alpha``);
* until each arm has ``warmup`` observations it alternates (speculative first);
* then it sends each request to the arm with the lower mean, except every ``probe_every``-th
  request, which goes to the other arm so that a draft that got better (or a load change) is seen.

Relaxed requests are never routed: their answer is a sample, and plain beam search is not one.
Pure Python, no Ray: the ingress owns one ``Router``; tests drive it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Arm = Literal["speculative", "target_only"]
ARMS: tuple[Arm, Arm] = ("speculative", "target_only")


@dataclass
class ArmStats:
    mean_ms: float | None = None  # EWMA of latency
    n: int = 0

    def observe(self, ms: float, alpha: float) -> None:
        self.mean_ms = ms if self.mean_ms is None else (1 - alpha) * self.mean_ms + alpha * ms
        self.n += 1


@dataclass
class KeyState:
    arms: dict[str, ArmStats] = field(default_factory=lambda: {a: ArmStats() for a in ARMS})
    requests: int = 0


class Router:
    def __init__(self, probe_every: int = 10, warmup: int = 3, alpha: float = 0.2):
        if probe_every < 2 or warmup < 1 or not 0.0 < alpha <= 1.0:
            raise ValueError("need probe_every >= 2, warmup >= 1 and 0 < alpha <= 1")
        self.probe_every, self.warmup, self.alpha = probe_every, warmup, alpha
        self.state: dict[tuple[str, int], KeyState] = {}

    def _key(self, mode: str, k: int) -> KeyState:
        return self.state.setdefault((mode, k), KeyState())

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
        if min(spec.n, plain.n) < self.warmup:  # fill both arms, speculative first
            return "speculative" if spec.n <= plain.n else "target_only"
        best = self.best(mode, k)
        if st.requests % self.probe_every == 0:
            return "target_only" if best == "speculative" else "speculative"
        return best

    def observe(self, mode: str, k: int, arm: Arm, latency_ms: float) -> None:
        self._key(mode, k).arms[arm].observe(latency_ms, self.alpha)

    def snapshot(self) -> dict[str, dict[str, float | int | str | None]]:
        """``{"strict/k=10": {"speculative_ms": .., "target_only_ms": .., "best": ..}}`` for /stats."""
        out: dict[str, dict[str, float | int | str | None]] = {}
        for (mode, k), st in sorted(self.state.items()):
            out[f"{mode}/k={k}"] = {
                "requests": st.requests, "best": self.best(mode, k),
                **{f"{a}_ms": None if s.mean_ms is None else round(s.mean_ms, 3) for a, s in st.arms.items()},
                **{f"{a}_n": s.n for a, s in st.arms.items()}}
        return out
