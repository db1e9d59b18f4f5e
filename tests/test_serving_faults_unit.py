"""Fault handling of the serving app without Ray Serve running: the ingress' bounded retries and
draft breaker, one-line start errors, the load tool's client retries, and the ``serve``
supervisor's signal handling (a stop signal to the command or to its whole process group)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from atspeed_ray.serving.config import AppArgs, RetryConfig
from atspeed_ray.serving.loadtest import make_bodies, run_load
from atspeed_ray.serving.retry import (
    DraftBreaker, ReplicaStartError, replica_failure, start_errors, with_retries,
)

FAST = RetryConfig(attempts=3, backoff_s=0.0)


class Gone(Exception):
    pass


def flaky(failures: list[Exception]):
    """A call factory: each call raises the next of ``failures``, then answers its number."""
    calls = []

    async def call() -> int:
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return len(calls)

    return call, calls


def test_with_retries_sends_again_only_for_a_dead_replica_and_within_the_budget():
    seen = []
    call, calls = flaky([Gone(), Gone()])
    assert asyncio.run(with_retries(call, FAST, lambda e: isinstance(e, Gone), seen.append)) == 3
    assert len(calls) == 3 and len(seen) == 2
    call, calls = flaky([Gone()] * 3)  # the budget: 3 tries in all
    with pytest.raises(Gone):
        asyncio.run(with_retries(call, FAST, lambda e: isinstance(e, Gone)))
    assert len(calls) == 3
    call, calls = flaky([ValueError("a bug"), Gone()])  # not a dead replica: no retry
    with pytest.raises(ValueError):
        asyncio.run(with_retries(call, FAST, lambda e: isinstance(e, Gone)))
    assert len(calls) == 1
    call, calls = flaky([Gone()])
    with pytest.raises(Gone):  # attempts=1: no retry at all
        asyncio.run(with_retries(call, RetryConfig(attempts=1), lambda e: isinstance(e, Gone)))


def test_replica_failure_means_the_replica_is_gone():
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

    assert replica_failure(ActorDiedError()) and replica_failure(ActorUnavailableError("x", None))
    assert replica_failure(RayTaskError("verify", "tb", ActorDiedError()))
    assert not replica_failure(RayTaskError("verify", "tb", ValueError("bad input")))
    assert not replica_failure(asyncio.TimeoutError()) and not replica_failure(ValueError())


def test_draft_breaker_answers_alone_for_a_growing_cooldown_and_closes_on_success():
    now = [0.0]
    b = DraftBreaker(RetryConfig(draft_cooldown_s=1.0, draft_cooldown_max_s=3.0), clock=lambda: now[0])
    tickets = [b.allow() for _ in range(3)]  # closed: every request tries the draft
    assert tickets == [0.0] * 3
    now[0] = 0.5
    b.failed(tickets[0])  # the draft died: open for 1 s
    b.failed(tickets[1])  # requests in flight when it opened do not count again
    assert b.allow() is None and b.trips == 1
    now[0] = 1.5
    trial = b.allow()
    assert trial == 1.5 and b.allow() is None  # one request tries, the others keep to the target
    now[0] = 1.6
    b.failed(trial)  # still dead: 2 s now
    assert b.trips == 2 and b.allow() is None
    now[0] = 3.6
    trial = b.allow()
    now[0] = 4.0
    b.failed(trial)  # 3 s, the cap
    assert b.snapshot() == {"open": True, "trips": 3, "next_cooldown_s": 3.0}
    now[0] = 6.9
    assert b.allow() is None
    now[0] = 7.0
    trial = b.allow()
    assert trial == 7.0 and b.allow() is None
    now[0] = 8.5  # the trial has not come back within draft_cooldown_s: another one may try
    assert b.allow() == 8.5
    b.succeeded()  # the draft is back: closed, and the next opening is 1 s again
    assert b.allow() == 8.5 and b.snapshot()["next_cooldown_s"] == 1.0
    b.failed(8.5)
    now[0] = 9.5
    assert b.allow() == 9.5
    off = DraftBreaker(RetryConfig(draft_cooldown_s=0.0), clock=lambda: now[0])
    off.failed(0.0)
    assert off.allow() is not None and off.trips == 0


def test_retry_settings_are_app_args():
    args = AppArgs(target="t", draft="d", retry={"attempts": 5, "draft_cooldown_s": 0})
    assert args.retry.attempts == 5 and args.retry.draft_cooldown_s == 0
    with pytest.raises(ValueError):
        AppArgs(target="t", draft="d", retry={"attempts": 0})


def test_a_replica_that_cannot_start_says_why_in_one_line():
    with pytest.raises(ReplicaStartError) as e:
        with start_errors("TargetModel cannot load /m"):
            raise OSError("header too large\n  more detail\n  and more")
    assert str(e.value) == "TargetModel cannot load /m: OSError: header too large"
    assert e.value.__suppress_context__


def test_loadtest_retries_connection_failures_and_5xx_within_budget_and_counts_them():
    tries: dict[int, int] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        h = json.loads(request.content)["history"][0]
        tries[h] = tries.get(h, 0) + 1
        if h == 1 and tries[h] == 1:
            return httpx.Response(500, text="Internal Server Error")  # the proxy, plain text
        if h == 2 and tries[h] <= 2:
            raise httpx.ConnectError("refused")
        if h == 3:
            return httpx.Response(503, json={"detail": "down"})  # never recovers: an error
        if h == 4:
            return httpx.Response(422, json={"detail": []})  # a client error: never retried
        return httpx.Response(200, json={"items": [h], "scores": [0.0], "stats": {"path": "speculative"}})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    bodies = make_bodies([[1], [2], [3], [4], [5]], 5, 1, "strict", None)
    res = asyncio.run(run_load("http://127.0.0.1:9", bodies, 2, client=client, retries=2))
    assert res.ok == 3 and res.errors == 2 and res.answers[:2] == [[1], [2]]
    assert tries == {1: 2, 2: 3, 3: 3, 4: 1, 5: 1}
    assert res.retries == 1 + 2 + 2 and len(res.retry_samples) == 5
    assert all(t is not None and t[0] <= t[1] for t in res.timeline)
    assert [t[2] for t in res.timeline] == [200, 200, 503, 422, 200]
    assert res.first_try == [500, 0, 503, 422, 200]  # what a client without retries saw
    assert res.errors_before_retries == 3 and res.summary()["errors_before_retries"] == 3
    res = asyncio.run(run_load("http://127.0.0.1:9", bodies[:1], 1,
                               client=httpx.AsyncClient(transport=httpx.MockTransport(handler))))
    assert res.ok == 1 and res.retries == 0  # history 1 fails only its first try: none needed now


# ------------------------------------------------------------------ the serve supervisor
CHILD = """
import os, signal, sys, time
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
print(os.getpgrp(), flush=True)
while not got:
    time.sleep(0.05)
print("stopped", got[0], flush=True)
"""


def start_supervisor(tmp: Path) -> tuple[subprocess.Popen, Path]:
    """A supervisor (in its own session, as a shell would start ``atspeed-ray serve``) over a
    child that exits 0 on its first SIGTERM; the child's output goes to ``out``."""
    out = tmp / "child.out"
    code = ("import sys; from atspeed_ray.serving.process import supervise; "
            f"sys.exit(supervise([sys.executable, '-c', {CHILD!r}]))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, env=env,
                            stdout=open(out, "w"))
    deadline = time.monotonic() + 60
    while not out.read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return proc, out


@pytest.mark.parametrize("to", ["leader", "group"])
def test_supervisor_forwards_one_stop_signal_whether_sent_to_it_or_to_its_group(tmp_path, to):
    proc, out = start_supervisor(tmp_path)
    child_group = int(out.read_text().split()[0])
    assert child_group != os.getpgid(proc.pid)  # the server (and Ray's processes) in their own group
    if to == "leader":
        os.kill(proc.pid, signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert out.read_text().split()[1:] == ["stopped", str(int(signal.SIGTERM))]


def test_the_server_dies_with_a_killed_supervisor(tmp_path):
    proc, out = start_supervisor(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while "stopped" not in out.read_text():  # PR_SET_PDEATHSIG: the child gets its SIGTERM
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.05)


def test_loadtest_comparison_alternates_so_a_moving_load_does_not_decide_the_ratio():
    """Two equally fast fake apps; the machine is 3x slower while the first half of all the
    requests are answered. Sent one app after the other (one round), the app looks 3x slower;
    in alternating rounds both sides get the slow spell alike and the ratio is about 1, with
    every round's own ratio and the pooled answers kept."""
    from atspeed_ray.serving.loadtest import compare_load

    def fake_machine() -> httpx.AsyncClient:
        served = [0]

        async def handler(request: httpx.Request) -> httpx.Response:
            slow = served[0] < 24  # of 48 answers in all (24 requests x 2 apps)
            served[0] += 1
            await asyncio.sleep(0.06 if slow else 0.02)
            h = json.loads(request.content)["history"][0]
            return httpx.Response(200, json={"items": [h], "scores": [0.0],
                                             "stats": {"path": request.url.host, "rounds": 2}})
        return httpx.AsyncClient(transport=httpx.MockTransport(handler))

    bodies = make_bodies([[i] for i in range(24)], 24, 1, "strict", None)
    one = asyncio.run(compare_load("http://127.0.0.1:1", "http://127.0.0.2:1", bodies, 1, rounds=1,
                                   client=fake_machine())).ratios()
    assert one["throughput_ratio"] < 0.5  # the slow spell fell on the app alone: it looks 3x slower
    cmp = asyncio.run(compare_load("http://127.0.0.1:1", "http://127.0.0.2:1", bodies, 1, rounds=4,
                                   client=fake_machine()))
    r = cmp.ratios()
    assert 0.7 < r["throughput_ratio"] < 1.4  # the true ratio is 1
    assert [x["first"] for x in r["rounds"]] == ["app", "baseline", "app", "baseline"]
    assert r["throughput_range"][0] <= r["throughput_ratio"] <= r["throughput_range"][1]
    assert cmp.app.answers == [[i] for i in range(24)] and r["same_answers"] == 24
    assert cmp.app.requests == cmp.app.ok == 24 and cmp.app.server == {"rounds": 2.0}
    assert cmp.app.paths == {"127.0.0.1": 24} and cmp.baseline.paths == {"127.0.0.2": 24}
