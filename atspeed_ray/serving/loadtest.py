"""Loopback-only, bounded load generator for the recommend endpoint.

``atspeed-ray loadtest --url http://127.0.0.1:8000 --requests 200 --concurrency 8``

* Only loopback targets (``localhost``, 127.0.0.0/8, ::1): anything else is refused.
* Bounded: at most ``MAX_REQUESTS`` requests, ``MAX_CONCURRENCY`` in flight, a per-request timeout.
* Histories: ``--data`` prepared folder (test split), else the server's ``GET /meta`` examples.
* ``--baseline-url``: the same load (same histories, same order) against a second app, e.g. the
  target-only baseline; prints both and the ratios (latency: this / baseline; throughput:
  this / baseline) and how many strict answers agree. The load is sent in ``--rounds`` rounds
  (``LOADTEST_ROUNDS``), each a slice of the requests sent to both apps back to back, the first
  app alternating from round to round (``compare_load``): a change of the machine's background
  load then falls on both sides instead of deciding the ratio. The ratios are those of the
  pooled rounds, with each round's own ratios beside them (their range is the spread).
* ``--retries N``: a request that gets no HTTP answer (connection failure) or a 5xx is sent
  again, at most N more times (backoff ``RETRY_BACKOFF_S``, doubling). Off by default. Every new
  try is counted (``retries``, with samples of what caused them); a request is an error only if
  its last try failed (``errors``), and its latency runs from its first try. The first tries
  that failed are counted apart (``errors_before_retries``): what a client without retries saw.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from atspeed_ray.settings import LOADTEST_ROUNDS

MAX_REQUESTS = 100_000
MAX_CONCURRENCY = 256
MAX_RETRIES = 5
RETRY_BACKOFF_S = 0.2
MAX_SAMPLES = 50  # retry causes kept


class NotLoopback(ValueError):
    pass


def check_loopback(url: str) -> str:
    """Return ``url`` without a trailing slash; raise ``NotLoopback`` unless it is loopback http."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise NotLoopback(f"{url}: only http(s) URLs")
    host = parts.hostname or ""
    if host != "localhost":
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
        if not ok:
            raise NotLoopback(f"{url}: refusing a non-loopback host {host!r} (use 127.0.0.1 or localhost)")
    return url.rstrip("/")


@dataclass
class LoadResult:
    url: str
    requests: int
    concurrency: int
    ok: int = 0
    errors: int = 0
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    server: dict[str, float] = field(default_factory=dict)  # means of numeric response stats
    paths: dict[str, int] = field(default_factory=dict)  # speculative / fallback / target_only
    answers: list[list[int] | None] = field(default_factory=list)  # items of each request, by index
    max_replicas: dict[str, int] = field(default_factory=dict)  # most running replicas seen (GET /stats)
    retries: int = 0  # new tries after a connection failure or a 5xx (--retries)
    retry_samples: list[str] = field(default_factory=list)
    # per request, by index: (sent, answered) in seconds since the run began, and the final status
    # (HTTP code, or 0 when no answer came)
    timeline: list[tuple[float, float, int] | None] = field(default_factory=list)
    started: float = 0.0  # time.perf_counter() when the run began
    # per request, by index: the status of its first try (HTTP code, or 0 when no answer came)
    first_try: list[int | None] = field(default_factory=list)
    server_sums: dict[str, float] = field(default_factory=dict)  # sums of numeric response stats
    server_counts: dict[str, int] = field(default_factory=dict)  # answers that carried each stat

    @property
    def errors_before_retries(self) -> int:
        """Requests whose first try got no answer or a 5xx (retried or not)."""
        return sum(1 for code in self.first_try if code is not None and (code == 0 or code >= 500))

    @property
    def rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs) + 0.5)) - 1))]

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            "url": self.url, "requests": self.requests, "concurrency": self.concurrency,
            "ok": self.ok, "errors": self.errors, "errors_before_retries": self.errors_before_retries,
            "wall_s": round(self.wall_s, 3),
            "req_per_s": round(self.rps, 2),
            "p50_ms": round(self.pct(50), 2), "p90_ms": round(self.pct(90), 2),
            "p99_ms": round(self.pct(99), 2),
            "mean_ms": round(statistics.fmean(lat), 2) if lat else None,
            "paths": self.paths, "server_means": {k: round(v, 3) for k, v in self.server.items()},
            "max_replicas": self.max_replicas, "retries": self.retries,
            "retry_samples": self.retry_samples[:5], "error_samples": self.error_samples[:5],
        }


def make_bodies(histories: list[list[int]], n: int, k: int, mode: str, seed: int | None) -> list[dict[str, Any]]:
    if not histories:
        raise ValueError("no example histories to send")
    bodies = []
    for i in range(n):
        body: dict[str, Any] = {"history": histories[i % len(histories)], "k": k, "mode": mode}
        if seed is not None:
            body["seed"] = seed + i
        bodies.append(body)
    return bodies


@dataclass
class Tally:
    """Running sums of the numeric response stats; their means become ``LoadResult.server``."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, stats: dict[str, Any]) -> None:
        for key, v in stats.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.sums[key] = self.sums.get(key, 0.0) + v
                self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def record_answer(res: LoadResult, tally: Tally, i: int, ms: float, data: dict[str, Any]) -> None:
    """A 200 answer to request ``i`` after ``ms`` milliseconds."""
    res.ok += 1
    res.latencies_ms.append(ms)
    res.answers[i] = data.get("items")
    stats = data.get("stats", {})
    path = str(stats.get("path"))
    res.paths[path] = res.paths.get(path, 0) + 1
    tally.add(stats)


async def watch_replicas(client: httpx.AsyncClient, url: str, res: LoadResult, every_s: float) -> None:
    """Until cancelled: every ``every_s`` seconds, the most running replicas seen (GET /stats)."""
    while True:
        try:
            r = await client.get(f"{url}/stats")
            for name, count in r.json().get("replicas", {}).items():
                res.max_replicas[name] = max(res.max_replicas.get(name, 0), int(count))
        except Exception:  # noqa: BLE001 - diagnostics only
            pass
        await asyncio.sleep(every_s)


async def post_with_retries(client: httpx.AsyncClient, url: str, body: dict[str, Any], retries: int,
                            res: LoadResult, i: int) -> httpx.Response:
    """POST ``body`` (request ``i``); again (at most ``retries`` more times) after a connection
    failure or a 5xx. Returns the last response, or raises the last connection error."""
    delay = RETRY_BACKOFF_S
    for attempt in range(retries + 1):
        try:
            r = await client.post(url, json=body)
            if attempt == 0:
                res.first_try[i] = r.status_code
            if r.status_code < 500 or attempt == retries:
                return r
            why = f"HTTP {r.status_code}: {r.text[:120]}"
        except httpx.TransportError as e:
            if attempt == 0:
                res.first_try[i] = 0
            if attempt == retries:
                raise
            why = f"{type(e).__name__}: {e}"
        res.retries += 1
        if len(res.retry_samples) < MAX_SAMPLES:
            res.retry_samples.append(why)
        await asyncio.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


async def run_load(url: str, bodies: list[dict[str, Any]], concurrency: int, timeout_s: float = 60.0,
                   client: httpx.AsyncClient | None = None, watch_s: float | None = None,
                   on_response: Callable[[int], None] | None = None, retries: int = 0) -> LoadResult:
    """Send ``bodies`` to ``url``/recommend with at most ``concurrency`` in flight.

    ``watch_s``: every so many seconds, read the app's running replicas from ``GET /stats``.
    ``on_response(n)`` is called after each response with the number answered so far.
    ``retries``: new tries of a request after a connection failure or a 5xx (counted)."""
    url = check_loopback(url)
    n = len(bodies)
    if not 1 <= n <= MAX_REQUESTS:
        raise ValueError(f"requests must be in [1, {MAX_REQUESTS}], got {n}")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must be in [1, {MAX_CONCURRENCY}], got {concurrency}")
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be in [0, {MAX_RETRIES}], got {retries}")
    res = LoadResult(url, n, concurrency, answers=[None] * n, timeline=[None] * n, first_try=[None] * n)
    tally = Tally()
    todo = iter(range(n))  # shared by the workers: each request is sent once
    done = 0
    own = client is None
    client = client or httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=concurrency + 1))

    async def worker() -> None:
        nonlocal done
        for i in todo:
            t0 = time.perf_counter()
            try:
                r = await post_with_retries(client, f"{url}/recommend", bodies[i], retries, res, i)
                ms = (time.perf_counter() - t0) * 1000
                res.timeline[i] = (t0 - start, t0 - start + ms / 1000, r.status_code)
                done += 1
                if on_response is not None:
                    on_response(done)
                if r.status_code != 200:
                    res.errors += 1
                    res.error_samples.append(f"HTTP {r.status_code}: {r.text[:200]}")
                    continue
                data = r.json()
            except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
                res.timeline[i] = (t0 - start, time.perf_counter() - start, 0)
                res.errors += 1
                res.error_samples.append(f"{type(e).__name__}: {e}")
                continue
            record_answer(res, tally, i, ms, data)

    watcher = asyncio.create_task(watch_replicas(client, url, res, watch_s)) if watch_s else None
    start = res.started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    finally:
        res.wall_s = time.perf_counter() - start
        if watcher is not None:
            watcher.cancel()
        if own:
            await client.aclose()
    res.server, res.server_sums, res.server_counts = tally.means(), dict(tally.sums), dict(tally.counts)
    return res


async def fetch_histories(url: str, timeout_s: float = 30.0) -> list[list[int]]:
    url = check_loopback(url)
    async with httpx.AsyncClient(timeout=timeout_s) as c:
        r = await c.get(f"{url}/meta")
        r.raise_for_status()
        return list(r.json()["example_histories"])


def data_histories(data: str, limit: int = 1000) -> list[list[int]]:
    from atspeed_ray.data.prepare import load_prepared

    return load_prepared(data).histories("test", limit)


def format_result(r: LoadResult) -> str:
    s = r.summary()
    lines = [f"{s['url']}: {s['requests']} requests, concurrency {s['concurrency']}",
             f"  ok {s['ok']}  errors {s['errors']}  wall {s['wall_s']:.2f} s  {s['req_per_s']:.1f} req/s",
             f"  latency ms: p50 {s['p50_ms']:.1f}  p90 {s['p90_ms']:.1f}  p99 {s['p99_ms']:.1f}  "
             f"mean {s['mean_ms'] if s['mean_ms'] is None else round(s['mean_ms'], 1)}",
             f"  paths {s['paths']}"]
    if s["retries"]:
        lines.append(f"  client retries {s['retries']}: {s['errors_before_retries']} requests failed their "
                     f"first try, {s['errors']} their last (an error only if its last try failed)")
    if s["max_replicas"]:
        lines.append("  replicas (most seen running): " + "  ".join(f"{k} {v}" for k, v in s["max_replicas"].items()))
    keys = ("rounds", "accepted_steps", "target_forwards", "draft_forwards", "handle_calls", "latency_ms",
            "draft_rtt_ms", "draft_compute_ms", "verify_rtt_ms", "verify_compute_ms", "beam_rtt_ms",
            "beam_compute_ms")
    means = {k: s["server_means"][k] for k in keys if k in s["server_means"]}
    if means:
        lines.append("  per request (server): " + "  ".join(f"{k} {v:.2f}" for k, v in means.items()))
    for e in s["error_samples"]:
        lines.append(f"  error: {e}")
    for e in s["retry_samples"]:
        lines.append(f"  retried after: {e}")
    return "\n".join(lines)


def compare(spec: LoadResult, base: LoadResult) -> dict[str, Any]:
    both = [(a, b) for a, b in zip(spec.answers, base.answers) if a is not None and b is not None]
    return {
        "p50_ratio": spec.pct(50) / base.pct(50) if base.latencies_ms else None,
        "p99_ratio": spec.pct(99) / base.pct(99) if base.latencies_ms else None,
        "throughput_ratio": spec.rps / base.rps if base.rps else None,
        "same_answers": sum(a == b for a, b in both), "compared": len(both),
    }


def merge_results(parts: list[LoadResult]) -> LoadResult:
    """Consecutive runs over consecutive slices of one load as one result: counts and samples
    added, latencies and per-request fields in request order, wall time summed (throughput =
    answers per second of sending), server means over every answer. Each timeline entry stays
    relative to the start of its own slice."""
    if not parts:
        raise ValueError("no results to merge")
    out = LoadResult(parts[0].url, sum(p.requests for p in parts), parts[0].concurrency)
    tally = Tally()
    for p in parts:
        out.ok += p.ok
        out.errors += p.errors
        out.wall_s += p.wall_s
        out.retries += p.retries
        out.latencies_ms += p.latencies_ms
        out.error_samples += p.error_samples
        out.retry_samples += p.retry_samples
        out.answers += p.answers
        out.timeline += p.timeline
        out.first_try += p.first_try
        for path, n in p.paths.items():
            out.paths[path] = out.paths.get(path, 0) + n
        for name, n in p.max_replicas.items():
            out.max_replicas[name] = max(n, out.max_replicas.get(name, 0))
        for key, total in p.server_sums.items():
            tally.sums[key] = tally.sums.get(key, 0.0) + total
            tally.counts[key] = tally.counts.get(key, 0) + p.server_counts[key]
    out.server, out.server_sums, out.server_counts = tally.means(), dict(tally.sums), dict(tally.counts)
    return out


@dataclass(frozen=True)
class Comparison:
    """The same load against two apps in alternating rounds (module docstring)."""

    app: LoadResult  # pooled over the rounds
    baseline: LoadResult
    rounds: list[dict[str, Any]]  # per round: its first app and its own ratios (``compare``)

    def ratios(self) -> dict[str, Any]:
        """Pooled ratios, the per-round ones, and their range (``*_range``: min, max)."""
        out = compare(self.app, self.baseline)
        out["rounds"] = self.rounds
        for key in ("p50_ratio", "p99_ratio", "throughput_ratio"):
            xs = [r[key] for r in self.rounds if r[key] is not None]
            out[f"{key.removesuffix('_ratio')}_range"] = [round(min(xs), 3), round(max(xs), 3)] if xs else None
        return out


async def compare_load(app_url: str, baseline_url: str, bodies: list[dict[str, Any]], concurrency: int,
                       rounds: int = LOADTEST_ROUNDS, timeout_s: float = 60.0, retries: int = 0,
                       client: httpx.AsyncClient | None = None) -> Comparison:
    """``bodies`` in ``rounds`` consecutive slices; each slice to both apps back to back, the
    app first in even rounds and the baseline first in odd ones."""
    if not 1 <= rounds <= len(bodies):
        raise ValueError(f"rounds must be in [1, requests = {len(bodies)}], got {rounds}")
    edges = [round(i * len(bodies) / rounds) for i in range(rounds + 1)]
    parts: dict[str, list[LoadResult]] = {"app": [], "baseline": []}
    per_round = []
    for r in range(rounds):
        chunk = bodies[edges[r]:edges[r + 1]]
        order = ["app", "baseline"] if r % 2 == 0 else ["baseline", "app"]
        got = {}
        for side in order:
            url = app_url if side == "app" else baseline_url
            got[side] = await run_load(url, chunk, concurrency, timeout_s, client=client,
                                       watch_s=None if client else 1.0, retries=retries)
            parts[side].append(got[side])
        ratios = compare(got["app"], got["baseline"])
        per_round.append({"first": order[0], "requests": len(chunk),
                          **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in ratios.items()}})
    return Comparison(merge_results(parts["app"]), merge_results(parts["baseline"]), per_round)


async def main_async(url: str, requests: int, concurrency: int, k: int, mode: str,
                     baseline_url: str | None, data: str | None, warmup: int, timeout_s: float,
                     seed: int | None, json_out: str | None, retries: int = 0,
                     rounds: int = LOADTEST_ROUNDS) -> int:
    url = check_loopback(url)
    if baseline_url is not None:
        baseline_url = check_loopback(baseline_url)
    histories = data_histories(data) if data else await fetch_histories(url, timeout_s)
    bodies = make_bodies(histories, requests, k, mode, seed)
    targets = [("app", url)] + ([("baseline", baseline_url)] if baseline_url else [])
    for _, u in targets:
        if warmup:
            await run_load(u, make_bodies(histories, warmup, k, mode, seed), min(concurrency, warmup), timeout_s)
    results: dict[str, LoadResult]
    report: dict[str, Any] = {}
    if baseline_url:
        cmp = await compare_load(url, baseline_url, bodies, concurrency, min(rounds, requests),
                                 timeout_s, retries)
        results = {"app": cmp.app, "baseline": cmp.baseline}
    else:
        results = {"app": await run_load(url, bodies, concurrency, timeout_s, watch_s=1.0, retries=retries)}
    for name, r in results.items():
        report[name] = r.summary()
        print(format_result(r), flush=True)
    if baseline_url:
        report["ratios"] = ratios = cmp.ratios()
        spread = "  ".join(f"{key} {ratios[key + '_ratio']:.3f} [{lo:.3f}-{hi:.3f}]"
                           for key in ("p50", "p99", "throughput")
                           for lo, hi in [ratios[key + "_range"]])
        print(f"ratios (app / baseline), pooled over {len(cmp.rounds)} alternating rounds "
              f"[range over the rounds]: {spread}  same answers "
              f"{ratios['same_answers']}/{ratios['compared']}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if all(r.errors == 0 for r in results.values()) else 1


__all__ = ["Comparison", "LoadResult", "NotLoopback", "check_loopback", "compare", "compare_load", "make_bodies",
           "merge_results", "run_load"]
