"""Adaptive routing of strict requests: speculative decoding or the target's beam search alone.

Speculation pays only when the draft is accepted often enough: with a weak draft a speculative
request costs more target work than plain beam search (every rejected round still verifies a
whole tree). In strict mode both paths return the same top-k, so the ingress may pick the faster
one per request without changing any answer. ``Router`` does that per ``(mode, k, load)``:
the **load** of a request is ``alone`` when no other routed request is in flight as it is sent,
``batched`` otherwise. The two differ on purpose: a model replica batches concurrent requests,
and on a compute-bound device a batch of verification trees costs far more than a batch of
beam-search steps, so a draft that wins alone can lose under load (the Beauty target on 2 CPU
cores: a toss-up alone, 1.6x slower at concurrency 8). Each load keeps what it learned while the
other carries the traffic. One ``Router`` serves the whole app (the ``Routing`` deployment: every
ingress replica routes from its plans, ``router_client.py``), so its in-flight count is the
app's. Latency grows with load, so it never compares latencies measured under different loads:

* **warm-up**: requests alternate between the two arms, speculative first; the first ``2 *
  warmup`` are the sample, and once they are answered the arm with the lower mean takes the
  traffic (the ``best`` arm). A ``(k, load)`` with a **calibrated start** (``start``, what the
  app's builder measured on example histories one at a time and in batches, ``calibrated_start``)
  skips it: its measured faster arm takes the traffic from the first request and the other is
  probed as below, so a draft known to lose sends no warm-up requests down the slower path. A
  start on the target alone also starts the probe interval at its cap (``max_interval``): the
  builder times speculation in process, without the served graph's handle calls per round,
  so served speculation is at best as fast as calibrated and a "target alone" verdict only gets
  truer; and under a batched load a lone speculative probe rides on the batches of beam-search
  steps around it and looks faster than speculation carrying the traffic (on the Beauty target
  at concurrency 8: 5 probes won, the trial that followed lost, 22 of 192 requests on the
  slower path). A start on speculation is probed from ``probe_every`` on. A load without a
  calibrated start, when its k has warmed up at the other load, starts on that arm (no second
  warm-up; its probes move it: in the simulation about 80 requests where the two loads differ);
* **probes**: the other arm gets a probe at most every ``interval`` requests (``probe_every``
  at first). At most one probe is in flight per key, the next one waits for its verdict, and two
  probes are at least ``probe_every`` requests apart: probes are at most ``1 / probe_every`` of
  the requests, whatever the concurrency or the load. Nothing sends a probe "at once";
* **paired verdict**: a probe's latency is divided by the mean latency of the ``pair`` requests
  sent right after it (all to the best arm): at any concurrency these ran under the load the
  probe saw (alongside it, or just after it at concurrency 1). They are a block by request
  number, not the first answers to come back: under concurrency the short requests come back
  first. A probe whose ratio is under ``1 - margin`` wins, and the next probe follows
  ``probe_every`` requests later; one that loses doubles the interval, up to ``probe_every *
  max_backoff`` requests;
* **switch and trial**: when the mean ratio of the last ``confirm`` probes is under ``1 -
  margin`` (a mean: a draft can win through its easy requests alone), or, alone, each of the
  last ``decisive`` probes' ratios is under ``1 - 2 * margin`` (a start that was plainly
  wrong: on the Beauty target at concurrency 1 every probe of the target alone won by about
  20%, and 64 requests held 4 probes, too few for ``confirm``; batched probes are biased toward
  speculation, below, and a losing draft at concurrency 8 took the traffic on 3 of them: p99
  3x; and not after a trial undid a switch: such probes lie), the other arm takes the traffic,
  on trial: the mean of its ``trial`` requests sent right after the switch against the
  old arm's last ``trial`` answers. A lone probe can be faster than the same path carrying the
  traffic (speculation's draft replica idles while only probes use it): if the new arm is
  ``margin`` slower, the traffic goes back at once and the next probe waits ``probe_every *
  max_backoff`` requests, twice that after a second such trial in a row, and so on up to
  ``revert_backoff`` times.

A draft that becomes faster takes the traffic within about ``probe_every * max_backoff`` +
``confirm * (probe_every + pair + concurrency)`` requests
(``test_a_draft_that_becomes_faster_takes_the_traffic_quickly``). An outage that stalls every
request (a model replica died) moves nothing: a stalled probe is compared with requests that
stalled too. Failed, cancelled and fallback requests are no samples (``forget``; a failed
probe frees its slot). The previous router compared answers with exponentially weighted means
that could date from another load, and probed again "at once" when the best arm got slower
than the other arm's mean and after each winning probe: moving from concurrency 8 to 16 on the
served app it sent 31 of 200 requests down the slower path (``results/serving-routing/RUN.md``);
in the simulations of ``tests/test_serving_parts.py`` it sent a burst of probes after a load
rise (3 of the first 200 requests), and a draft that loses by 1.6x took 21-32% of the traffic
of a load level for 2 seeds in 10.

Relaxed requests are never routed: their answer is a sample, and plain beam search is not one.
Pure Python, no Ray: the ``Routing`` deployment (and each ingress replica, for when it does not
answer) owns one ``Router``; tests drive it directly.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

Arm = Literal["speculative", "target_only"]
ARMS: tuple[Arm, Arm] = ("speculative", "target_only")
Load = Literal["alone", "batched"]  # no other routed request in flight as it is sent / some
LOADS: tuple[Load, Load] = ("alone", "batched")
Starts = Mapping[Load, Mapping[int, Arm]]  # load -> k -> the arm its strict requests start on
Key = tuple[str, int, Load]  # (mode, k, load): what the router keeps one state for

# defaults of the app's ``probe_every`` / ``probe_backoff`` (``AppArgs``) and of ``RouterConfig``
PROBE_EVERY = 10  # requests between two probes, at least: probes <= 10% of the requests
PROBE_BACKOFF = 32  # every 320th request probes while one arm keeps winning (0.3%: out of p99)


def calibrated_start(q1: float, q3: float, margin: float) -> Arm | None:
    """The arm a k starts on from a paired calibration (speculation's speedup over beam search
    per example history: its quartiles ``q1``, ``q3``): the target alone when even the upper
    quartile loses by ``margin``, speculation when even the lower one wins by it, else None
    (no clear winner: the warm-up decides)."""
    if q3 < 1 - margin:
        return "target_only"
    if q1 > 1 + margin:
        return "speculative"
    return None


def other(arm: Arm) -> Arm:
    return "target_only" if arm == "speculative" else "speculative"


@dataclass(frozen=True)
class RouterConfig:
    probe_every: int = PROBE_EVERY  # requests between two probes, at least (the first interval)
    max_backoff: int = PROBE_BACKOFF  # a losing probe doubles the interval, up to probe_every * this
    warmup: int = 3  # requests of each arm in the warm-up sample
    pair: int = 5  # best-arm requests, sent right after a probe, that it is compared with
    confirm: int = 5  # probes whose mean latency ratio to their references decides a switch
    decisive: int = 3  # ... or this many in a row, each winning by twice the margin
    trial: int = 10  # answers of each arm that check a switch (mean before against after)
    revert_backoff: int = 8  # undone switches in a row double the wait after one, up to this many times
    margin: float = 0.05  # a probe wins when its latency ratio is under 1 - margin
    alpha: float = 0.2  # EWMA weight of the latencies shown in ``snapshot`` (not used to route)
    stale_s: float = 900.0  # a route unanswered this long no longer counts as in flight (its ingress died)

    def __post_init__(self) -> None:
        if (self.probe_every < 2 or min(self.max_backoff, self.warmup, self.pair, self.confirm,
                                         self.decisive, self.trial, self.revert_backoff) < 1
                or not 0.0 <= self.margin < 1.0 or not 0.0 < self.alpha <= 1.0
                or not self.stale_s > 0):
            raise ValueError("need probe_every >= 2; max_backoff, warmup, pair, confirm, "
                             "decisive, trial, revert_backoff >= 1; "
                             "0 <= margin < 1; 0 < alpha <= 1; stale_s > 0")

    @property
    def max_interval(self) -> int:
        return self.probe_every * self.max_backoff


@dataclass(frozen=True)
class Route:
    """One request's route, handed back to ``Router.observe`` / ``forget`` with its answer."""

    mode: str
    k: int
    arm: Arm
    seq: int  # the request's number for its key, from 1; ORDERED: routed from a standing order
    probe: bool  # sent to the other arm to measure it
    load: Load = "alone"  # other routed requests in flight when it was sent, or not

    @property
    def key(self) -> Key:
        return self.mode, self.k, self.load


ORDERED = 0  # ``Route.seq`` of a request an ingress replica routed from a standing ``Order``


@dataclass(frozen=True)
class Order:
    """What an ingress replica may route without asking the app's router: up to ``budget``
    requests of a key to its best ``arm``. The router gives one only while nothing needs it
    (the key is warm, no probe or trial pending), the budget its requests left before the next
    probe, shared out among the replicas (``Router.orders``)."""

    arm: Arm
    budget: int


@dataclass
class ArmStats:
    mean_ms: float | None = None  # EWMA of its answers' latency (shown, not used to route)
    n: int = 0  # answers
    sent: int = 0  # requests sent to it
    warmup_ms: list[float] = field(default_factory=list)  # its answers in the warm-up sample

    def record(self, ms: float, alpha: float) -> None:
        self.mean_ms = ms if self.mean_ms is None else (1 - alpha) * self.mean_ms + alpha * ms
        self.n += 1


@dataclass
class Sample:
    """The answers (ms) of the requests numbered ``first`` .. ``first + size - 1``: a block by
    request number, not the first answers to come back (under concurrency the short requests come
    back first, and would make the arm look faster than it is)."""

    first: int
    size: int
    ms: list[float] = field(default_factory=list)
    lost: int = 0  # requests of the block that failed

    def holds(self, seq: int) -> bool:
        return self.first <= seq < self.first + self.size

    def done(self) -> bool:
        return len(self.ms) + self.lost >= self.size


@dataclass
class Probe:
    seq: int  # the probe's request number
    n: int  # the key's requests routed when it was sent (``KeyState.n``)
    refs: Sample  # the best arm's requests sent right after it (nothing else is sent meanwhile)
    ms: float | None = None  # its latency, once answered


@dataclass
class Trial:
    """The check of a switch: the new arm's answers once it carries the traffic."""

    old: Arm  # the arm that carried the traffic before
    before: list[float]  # the old arm's last answers (ms)
    after: Sample | None  # the new arm's requests sent right after the switch (no probe meanwhile);
    # None until every ingress replica routes from a plan made after it (``Router.settle``)
    at: float = 0.0  # when the switch was made (the router's clock)


@dataclass
class KeyState:
    config: RouterConfig
    interval: int  # requests between probes (probe_every, doubled by each losing probe)
    arms: dict[Arm, ArmStats] = field(default_factory=lambda: {a: ArmStats() for a in ARMS})
    best: Arm = "speculative"  # the arm that takes the traffic (once warm)
    warm: bool = False
    warmup_left: int = 0  # requests of the warm-up sample not answered yet (set in __post_init__)
    seq: int = 0  # requests routed by this router (numbered)
    ordered: int = 0  # requests routed by ingress replicas from its standing orders (answered)
    next_probe: int = 0  # the first ``n`` at which a request may probe
    probe: Probe | None = None  # the probe in flight or waiting for its verdict
    trial: Trial | None = None
    recent: deque[float] = field(init=False)  # the best arm's last ``trial`` answers (ms)
    ratios: deque[float] = field(init=False)  # the last probes' latency / their refs' mean
    probes: int = 0
    switches: int = 0
    reverts: int = 0  # switches undone by their trial
    reverts_in_row: int = 0  # since the last switch that held or probe that lost

    def __post_init__(self) -> None:
        self.warmup_left = 2 * self.config.warmup
        self.recent = deque(maxlen=self.config.trial)
        self.ratios = deque(maxlen=max(self.config.confirm, self.config.decisive))

    @property
    def n(self) -> int:
        """Requests of the key so far, routed here or from an order (the probe schedule's count)."""
        return self.seq + self.ordered

    def quiet(self) -> bool:
        """Nothing but the best arm to send: warm, no probe or trial pending."""
        return self.warm and self.probe is None and self.trial is None

    def sampling(self) -> bool:
        """A probe's or a trial's sample still needs request numbers (or the warm-up does)."""
        if not self.warm:
            return True
        return any(s is not None and self.seq < s.first + s.size - 1
                   for s in (self.probe and self.probe.refs, self.trial and self.trial.after))


class Router:
    def __init__(self, config: RouterConfig = RouterConfig(), start: Starts | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """``start``: load -> k -> the arm its strict requests start on (a calibrated start, no
        warm-up); ``clock`` (s) ages the routes in flight (``RouterConfig.stale_s``)."""
        self.config = config
        self.start = {load: dict(ks) for load, ks in (start or {}).items()}
        self.clock = clock
        # standing orders were handed out (``orders``): a switch's trial then waits until no
        # ingress replica holds one made before it (``settle``)
        self.ordering = False
        self.state: dict[Key, KeyState] = {}
        # route -> when it was sent (s), in the order sent
        self.in_flight: dict[tuple[str, int, Load, int], float] = {}

    def _key(self, mode: str, k: int, load: Load) -> KeyState:
        c = self.config
        st = self.state.get((mode, k, load))
        if st is None:
            st = self.state[(mode, k, load)] = KeyState(c, interval=c.probe_every)
            start = self.start.get(load, {}).get(k) if mode == "strict" else None
            learned = [s.best for (m, kk, _), s in self.state.items() if (m, kk) == (mode, k) and s.warm]
            if start is not None or learned:  # warm, on that arm; the first probe waits
                st.warm, st.warmup_left = True, 0
                st.best = start if start is not None else learned[0]
                if start == "target_only":  # measured: served speculation is no faster
                    st.interval = c.max_interval
                st.next_probe = st.interval + 1
        return st

    def load(self, others: int = 0) -> Load:
        """``batched`` while any routed request is in flight (one unanswered for ``stale_s``
        no longer counts: its ingress died) or ``others`` are (requests the ingress replicas
        routed from standing orders), else ``alone``."""
        now = self.clock()
        while self.in_flight:  # oldest first (insertion order): stop at the first one still fresh
            key, sent = next(iter(self.in_flight.items()))
            if now - sent <= self.config.stale_s:
                break
            del self.in_flight[key]
        return "batched" if self.in_flight or others > 0 else "alone"

    def best(self, mode: str, k: int, load: Load = "alone") -> Arm:
        """The arm that takes the traffic (speculative until both arms are warm, unless the
        key has a calibrated or learned start)."""
        return self._key(mode, k, load).best

    def choose(self, mode: str, k: int, others: int = 0) -> Route:
        """A request's route; ``others``: requests in flight that ingress replicas routed from
        standing orders (they count for the load)."""
        load = self.load(others)
        st = self._key(mode, k, load)
        st.seq += 1
        probe = False
        if not st.warm:  # both arms in turn, speculative first (the sample: the first 2 * warmup)
            arm: Arm = "speculative" if st.seq % 2 else "target_only"
        elif st.quiet() and st.n >= st.next_probe:
            st.probe = Probe(st.seq, st.n, Sample(st.seq + 1, self.config.pair))
            st.probes, probe = st.probes + 1, True
            arm = other(st.best)
        else:
            arm = st.best
        st.arms[arm].sent += 1
        self.in_flight[(mode, k, load, st.seq)] = self.clock()
        return Route(mode, k, arm, st.seq, probe, load)

    def orders(self, share: int = 1) -> dict[Key, Order]:
        """The standing orders for one of ``share`` ingress replicas: the best arm of each key
        whose samples need no request numbers, for its share of the requests left before the next
        probe (``probe_every`` while a probe or trial waits for its answers; none where the share
        is 0)."""
        self.ordering = True
        for load, ks in self.start.items():  # calibrated keys have orders before their first request
            for k in ks:
                self._key("strict", k, load)
        out = {}
        for key, st in self.state.items():
            if st.sampling():
                continue
            left = st.next_probe - st.n if st.quiet() else self.config.probe_every
            if left // max(1, share) > 0:
                out[key] = Order(st.best, left // max(1, share))
        return out

    def settle(self, planned_at: float) -> None:
        """Every ingress replica routes from a plan made at ``planned_at`` or later: the trials
        of switches made before then start their sample (the old arm's orders are gone, so the
        new arm carries the traffic)."""
        for st in self.state.values():
            if st.trial is not None and st.trial.after is None and st.trial.at <= planned_at:
                st.trial.after = Sample(st.seq + 1, self.config.trial)

    def observe(self, route: Route, latency_ms: float) -> None:
        """A routed request's answer and its latency (ms, at the ingress)."""
        self._answer(route, latency_ms)

    def forget(self, route: Route) -> None:
        """A routed request failed (or fell back): no sample. A failed probe frees its slot."""
        self._answer(route, None)

    def _answer(self, route: Route, ms: float | None) -> None:
        c, st = self.config, self._key(*route.key)
        if route.seq == ORDERED:  # routed by an ingress replica: counted, never a sample
            st.ordered += 1
            st.arms[route.arm].sent += 1
            if ms is not None:
                st.arms[route.arm].record(ms, c.alpha)
                if route.arm == st.best and st.trial is None:
                    st.recent.append(ms)
            return
        self.in_flight.pop((*route.key, route.seq), None)
        if ms is not None:
            st.arms[route.arm].record(ms, c.alpha)
        if not st.warm:
            if route.seq <= 2 * c.warmup:
                if ms is not None:
                    st.arms[route.arm].warmup_ms.append(ms)
                st.warmup_left -= 1
                if st.warmup_left == 0:
                    self._end_warmup(st)
            return
        p, t = st.probe, st.trial
        if route.probe:
            if p is not None and p.seq == route.seq:
                if ms is None:
                    st.probe, st.next_probe = None, p.n + st.interval
                else:
                    p.ms = ms
                    self._verdict(st, p, route.load)
            return
        if route.arm != st.best:  # sent before a switch (or in the warm-up): shown only
            return
        if ms is not None:
            st.recent.append(ms)
        for sample in (p.refs if p is not None else None, t.after if t is not None else None):
            if sample is not None and sample.holds(route.seq):
                if ms is None:
                    sample.lost += 1
                else:
                    sample.ms.append(ms)
        if p is not None:
            self._verdict(st, p, route.load)
        if t is not None and t.after is not None and t.after.done():
            self._end_trial(st, t)

    def _end_warmup(self, st: KeyState) -> None:
        """The faster arm on the warm-up sample (by mean) takes the traffic."""
        spec, plain = (st.arms[a].warmup_ms for a in ARMS)
        st.warm = True
        st.best = ("speculative" if spec and (not plain or statistics.fmean(spec) <= statistics.fmean(plain))
                   else "target_only")
        st.recent.extend(st.arms[st.best].warmup_ms)
        st.next_probe = st.n + st.interval

    def _verdict(self, st: KeyState, p: Probe, load: Load) -> None:
        """The probe against the best arm's requests sent right after it, once all are in
        (``load``: the key's; its probes are unbiased only alone)."""
        c = self.config
        if p.ms is None or not p.refs.done():
            return
        st.probe = None
        if not p.refs.ms:  # every reference request failed: no verdict
            st.next_probe = p.n + st.interval
            return
        ratio = p.ms / statistics.fmean(p.refs.ms)  # < 1: the other arm answered faster, same load
        st.ratios.append(ratio)
        ratios = list(st.ratios)
        decisive = (load == "alone" and st.reverts_in_row == 0 and len(ratios) >= c.decisive
                    and max(ratios[-c.decisive:]) < 1 - 2 * c.margin)
        confirmed = len(ratios) >= c.confirm and statistics.fmean(ratios[-c.confirm:]) < 1 - c.margin
        if decisive or confirmed:
            # the other arm is faster on average over the last probes: it takes the traffic, on trial
            st.trial = Trial(st.best, list(st.recent),
                             None if self.ordering else Sample(st.seq + 1, c.trial), self.clock())
            st.best, st.switches = other(st.best), st.switches + 1
            st.ratios.clear()
            st.recent.clear()
            st.interval = c.probe_every
        elif ratio < 1 - c.margin:  # a winning probe: look again soon, but no sooner
            st.next_probe = p.n + c.probe_every
        else:  # it confirmed the best arm: back off
            st.reverts_in_row = 0
            st.interval = min(2 * st.interval, c.max_interval)
            st.next_probe = p.n + st.interval

    def _end_trial(self, st: KeyState, t: Trial) -> None:
        """Back to the old arm if the new one, carrying the traffic, is ``margin`` slower."""
        c = self.config
        st.trial = None
        st.next_probe = st.n + st.interval
        if t.before and t.after.ms and (statistics.fmean(t.after.ms)
                                        > statistics.fmean(t.before) * (1 + c.margin)):
            st.best, st.reverts, st.reverts_in_row = t.old, st.reverts + 1, st.reverts_in_row + 1
            st.recent.clear()
            st.recent.extend(t.before)
            st.interval = c.max_interval
            # the probes keep winning where the traffic loses: wait longer after each such trial
            st.next_probe = st.n + c.max_interval * min(2 ** (st.reverts_in_row - 1), c.revert_backoff)
        else:
            st.reverts_in_row = 0

    def snapshot(self) -> dict[str, dict[str, float | int | str | None]]:
        """``{"strict/k=10/alone": {"speculative_ms": .., "target_only_ms": .., "best": ..}}`` for
        /stats."""
        out: dict[str, dict[str, float | int | str | None]] = {}
        for (mode, k, load), st in sorted(self.state.items()):
            out[f"{mode}/k={k}/{load}"] = {
                "requests": st.n, "ordered": st.ordered, "best": st.best, "probe_interval": st.interval,
                "probes": st.probes, "switches": st.switches, "reverts": st.reverts,
                **{f"{a}_ms": None if s.mean_ms is None else round(s.mean_ms, 3) for a, s in st.arms.items()},
                **{f"{a}_n": s.n for a, s in st.arms.items()},
                **{f"{a}_sent": s.sent for a, s in st.arms.items()}}
        return out
