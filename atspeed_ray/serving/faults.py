"""Kill a replica under load and report what the clients saw (``jobs/serve_faults.py``, tests).

``kill_under_load`` sends a bounded load (``loadtest.run_load``, loopback only) and, once
``kill_at`` requests are answered, kills one replica of a deployment with ``ray.kill`` on its
actor (found by its Serve name, ``SERVE_REPLICA::APP#DEPLOYMENT#ID``). The driver must be
connected to the Ray instance that runs the app. Serve's controller then starts a replacement.

The report (``FaultReport.summary()``, JSON):

* ``failed``: requests whose last try got no 200, plus strict answers that differ from
  ``want`` (the target-only answers); ``total``; ``wrong_answers`` alone.
* ``failed_before_retries``: requests whose first try got no answer or a 5xx (what a client
  without retries would have seen), and ``failed_sent_after_kill_before_retries``: those of
  them sent after the kill (a request that arrives after the kill should not fail at all).
* ``client_retries``: new tries by the client (only with ``retries`` > 0; see ``loadtest``);
  ``server_retries``: target calls the ingress sent again; ``paths``: speculative / fallback /
  target_only answers (a fallback: the draft side failed, the target answered alone).
* ``recover_s``: from the kill to the first answer to a request sent after the kill (service
  back); ``replaced_s``: from the kill until a new replica of the deployment runs (the
  controller's view); ``worst_ms``: the slowest request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from atspeed_ray.serving.loadtest import LoadResult, run_load

KILLABLE = ("DraftModel", "TargetModel", "Recommender")
REPLACE_TIMEOUT_S = 180.0
POLL_S = 0.2


def replica_actors(app: str, deployment: str) -> dict[str, str]:
    """The live replica actors of ``app``'s ``deployment``: name -> namespace."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return {a["name"]: a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}


def running_count(app: str, deployment: str) -> int:
    from ray import serve

    apps = serve.status().applications
    dep = apps[app].deployments.get(deployment) if app in apps else None
    return int(dep.replica_states.get("RUNNING", 0)) if dep is not None else 0


@dataclass
class Kill:
    """One kill and its aftermath (seconds on ``time.perf_counter``'s clock)."""

    app: str
    deployment: str
    victim: str = ""
    at: float | None = None  # when ray.kill returned
    replaced_at: float | None = None
    error: str | None = None
    before: list[str] = field(default_factory=list)

    def run(self) -> None:
        """Kill the first replica, then wait (bounded) until a new one runs, as many as before."""
        import ray

        try:
            actors = replica_actors(self.app, self.deployment)
            self.before = sorted(actors)
            want = running_count(self.app, self.deployment)
            self.victim = self.before[0]
            ray.kill(ray.get_actor(self.victim, namespace=actors[self.victim]))
            self.at = time.perf_counter()
            deadline = self.at + REPLACE_TIMEOUT_S
            while time.perf_counter() < deadline:
                new = set(replica_actors(self.app, self.deployment)) - set(self.before)
                if new and running_count(self.app, self.deployment) >= want:
                    self.replaced_at = time.perf_counter()
                    return
                time.sleep(POLL_S)
            self.error = f"no new {self.deployment} replica within {REPLACE_TIMEOUT_S} s"
        except Exception as e:  # noqa: BLE001 - reported
            self.error = f"{type(e).__name__}: {e}"


@dataclass
class FaultReport:
    kill: Kill
    load: LoadResult
    wrong_answers: int = 0

    def summary(self) -> dict[str, Any]:
        k, r = self.kill, self.load
        kill_t = None if k.at is None else k.at - r.started  # on the load's timeline
        after = [t for t in r.timeline if t is not None and kill_t is not None and t[0] >= kill_t
                 and t[2] == 200]
        server_retries = int(r.server_sums.get("retries", 0))
        first_failed = [i for i, code in enumerate(r.first_try) if code is not None and (code == 0 or code >= 500)]
        sent_after_kill = [i for i in first_failed if kill_t is not None and r.timeline[i] is not None
                           and r.timeline[i][0] >= kill_t]
        return {
            "deployment": k.deployment, "victim": k.victim, "kill_error": k.error,
            "total": r.requests, "failed": r.errors + self.wrong_answers, "http_errors": r.errors,
            "failed_before_retries": len(first_failed),
            "failed_sent_after_kill_before_retries": len(sent_after_kill),
            "wrong_answers": self.wrong_answers, "client_retries": r.retries,
            "server_retries": server_retries, "paths": r.paths,
            "killed_after_s": None if kill_t is None else round(kill_t, 3),
            "recover_s": round(min(t[1] for t in after) - kill_t, 3) if after and kill_t is not None else None,
            "replaced_s": None if k.replaced_at is None or k.at is None else round(k.replaced_at - k.at, 3),
            "worst_ms": round(max(r.latencies_ms), 1) if r.latencies_ms else None,
            "p50_ms": round(r.pct(50), 1), "wall_s": round(r.wall_s, 2),
            "retry_samples": r.retry_samples[:5], "error_samples": r.error_samples[:5],
        }


async def kill_under_load(url: str, app: str, deployment: str, bodies: list[dict[str, Any]],
                          concurrency: int, kill_at: int, want: list[list[int]] | None = None,
                          retries: int = 0, timeout_s: float = 60.0) -> FaultReport:
    """``bodies`` at ``concurrency``; after ``kill_at`` answers, one ``deployment`` replica dies.
    Returns after the load and after the replacement runs (or ``REPLACE_TIMEOUT_S``).
    ``want[i]``: the expected items of request ``i`` (strict: the target-only answers)."""
    if deployment not in KILLABLE:
        raise ValueError(f"deployment must be one of {KILLABLE}, got {deployment!r}")
    kill = Kill(app, deployment)
    killer = threading.Thread(target=kill.run, daemon=True)  # ray.kill blocks: not on the event loop

    def maybe_kill(done: int) -> None:
        if done >= kill_at and killer.ident is None:
            killer.start()

    load = await run_load(url, bodies, concurrency, timeout_s, on_response=maybe_kill, retries=retries)
    if killer.ident is not None:
        killer.join(REPLACE_TIMEOUT_S + 10)
    report = FaultReport(kill, load)
    if want is not None:
        report.wrong_answers = sum(got is not None and got != w for got, w in zip(load.answers, want))
    return report
