"""The ``atspeed-ray serve`` process: a private local Ray, the Serve config deployed, and a wait
that ends on the first deployment that cannot start or on a stop signal.

* Two processes: ``supervise`` (the command itself) starts the server (``serve_until_stopped``)
  in a child process of its own session and forwards SIGTERM, SIGINT and SIGHUP to it. Ray's
  processes are the child's, in the child's process group, so a signal to the command's process
  group (Ctrl-C in a terminal, ``kill -TERM -PGID``, a service manager) reaches the command
  alone and the stop is the same orderly one as for a signal to the command's pid. The child
  dies with the command (``PR_SET_PDEATHSIG``) if the command is killed outright.
* Start: a replica whose constructor fails (a bad model folder, a catalog that does not fit the
  model) ends the command within seconds, exit 1, with the replica's exception on one line
  (Serve itself would retry it and wait for health forever). "serving on URL" is printed once
  every app runs and ``GET /readyz`` answers 200.
* Stop: a signal only sets a flag; the main thread then drains (``stopping.py``: the ingress
  answers new requests and ``/readyz`` with 503, the accepted ones are answered, at most
  ``DRAIN_S``), gives Serve at most ``SERVE_SHUTDOWN_S`` to shut down (that kills its HTTP proxy
  at once, hence the drain first) and ends the private Ray instance (its processes are ours
  alone); exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from atspeed_ray.serving.stopping import DRAIN_S, PROXY_MIN_DRAINING_ENV, PROXY_MIN_DRAINING_S, drain
from atspeed_ray.training.ray_utils import NO_AUTH_FLAG, AuthOff, add_no_auth_flag, check_auth, permit_no_auth

POLL_S = 0.5
SERVE_SHUTDOWN_S = 15.0  # seen over 5 s on a loaded 2-core machine; Serve's own bound is 30 s
STARTUP_FAILED = "A replica failed to start"  # how Serve's deployment status says so
READY_PROBE_S = 2.0  # timeout of the GET /readyz before "serving on"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1


def state(value: Any) -> str:
    """A Serve status enum as its name: ``str()`` of a str-Enum is ``"Class.MEMBER"``."""
    return str(getattr(value, "value", value))


def failure(status: Any) -> str | None:
    """``serve.status()`` -> one line naming the deployment that cannot start, or None."""
    for app_name, app in status.applications.items():
        for name, dep in app.deployments.items():
            if state(dep.status) == "DEPLOY_FAILED" or dep.message.startswith(STARTUP_FAILED):
                return f"{app_name}/{name} cannot start: {cause(dep.message)}"
        if state(app.status) == "DEPLOY_FAILED":
            return f"{app_name} cannot start: {cause(app.message)}"
    return None


def cause(message: str) -> str:
    """The exception line of a Serve status message (a traceback), without Ray's wrappers."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))
              and not ln.startswith(("ray.exceptions.", "RayActorError", "RayTaskError"))]
    return (errors[-1] if errors else lines[-1] if lines else "unknown error")[:500]


def running(status: Any) -> bool:
    return bool(status.applications) and all(state(a.status) == "RUNNING" for a in status.applications.values())


def answers_ready(url: str) -> bool:
    """``GET url/readyz`` is 200 (the proxy listens and every model deployment answers)."""
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=READY_PROBE_S) as r:
            return r.status == 200
    except OSError:  # refused, 503 (HTTPError), timeout
        return False


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def server_command(config: Path, url: str, num_cpus: float | None, allow_no_auth: bool) -> list[str]:
    """The child process of ``supervise``: ``main`` below."""
    cmd = [sys.executable, "-m", "atspeed_ray.serving.process", str(config), url]
    cmd += ["--num-cpus", str(num_cpus)] if num_cpus is not None else []
    return cmd + ([NO_AUTH_FLAG] if allow_no_auth else [])


def supervise(cmd: list[str]) -> int:
    """Run ``cmd`` (``server_command``) in a child of its own session, forward stop signals to
    it, return its exit status (128 + N if a signal N ended it)."""
    pending: list[int] = []  # a signal that came before the child existed
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: Any) -> None:
        if child is None:
            pending.append(signum)
        else:
            child.send_signal(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    child = subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent)  # noqa: PLW1509
    for signum in pending[:1]:
        child.send_signal(signum)
    rc = child.wait()
    return rc if rc >= 0 else 128 - rc


def serve_until_stopped(config: Path, url: str, num_cpus: float | None) -> int:
    """Deploy ``config`` on a fresh local Ray and wait; 0 after a stop signal, 1 on a bad start."""
    import ray
    import yaml
    from ray import serve
    from ray.serve.scripts import cli as serve_cli

    from atspeed_ray.training.ray_utils import init_ray

    stop = threading.Event()
    os.environ.setdefault(PROXY_MIN_DRAINING_ENV, str(PROXY_MIN_DRAINING_S))  # the proxy inherits it
    init_ray(num_cpus=num_cpus, include_dashboard=False, namespace="serve",
             object_store_memory=512 * 1024**2)
    for sig in STOP_SIGNALS:  # after ray.init, which installs its own handlers
        signal.signal(sig, lambda *_: stop.set())
    rc, ready = 0, False
    spec = yaml.safe_load(config.read_text())
    prefix = (spec["applications"][0].get("route_prefix") or "/").rstrip("/")
    try:
        # `serve run` reports on stdout; that is Ray's log, stdout is this command's own
        with contextlib.redirect_stdout(sys.stderr):
            # `serve run CONFIG` gives the config's top-level logging_config to the apps only; the
            # controller and the HTTP proxy (an access-log line per request) get it here
            serve.start(proxy_location=spec.get("proxy_location"), http_options=spec.get("http_options"),
                        logging_config=spec.get("logging_config"))
            serve_cli.main(["run", str(config), "--non-blocking"], standalone_mode=False)
        while not stop.wait(POLL_S):
            status = serve.status()
            error = failure(status)
            if error is not None:
                print(f"atspeed-ray serve: error: {error}", file=sys.stderr, flush=True)
                rc = 1
                break
            if not ready and running(status) and answers_ready(url + prefix):
                ready = True
                print(f"serving on {url}  (POST /recommend, GET /healthz, /readyz, /docs)", flush=True)
        if stop.is_set():
            t0 = time.monotonic()
            drained = drain(DRAIN_S)
            print("atspeed-ray serve: stopping: " + (
                f"every accepted request answered in {time.monotonic() - t0:.1f} s" if drained
                else f"requests still open after {DRAIN_S:.0f} s"), file=sys.stderr, flush=True)
    finally:
        shutdown(serve, ray)
    return rc


def shutdown(serve: Any, ray: Any) -> None:
    """Serve, for at most ``SERVE_SHUTDOWN_S``, then the private Ray instance."""
    t0 = time.monotonic()
    worker = threading.Thread(target=serve.shutdown, daemon=True)
    worker.start()
    worker.join(SERVE_SHUTDOWN_S)
    t1 = time.monotonic()
    if worker.is_alive():  # its next call into Ray after ray.shutdown may end this process, exit 1
        print(f"atspeed-ray serve: Serve did not stop in {SERVE_SHUTDOWN_S:.0f} s; ending Ray",
              file=sys.stderr, flush=True)
    ray.shutdown()
    print(f"stopped in {time.monotonic() - t0:.1f} s (Serve {t1 - t0:.1f} s, Ray "
          f"{time.monotonic() - t1:.1f} s)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """The child of ``supervise``: ``python -m atspeed_ray.serving.process CONFIG URL``."""
    p = argparse.ArgumentParser(prog="atspeed_ray.serving.process")
    p.add_argument("config", type=Path)
    p.add_argument("url")
    p.add_argument("--num-cpus", type=float, default=None)
    add_no_auth_flag(p)
    a = p.parse_args(argv)
    if a.allow_no_auth:
        permit_no_auth()
    try:
        check_auth()
    except AuthOff as e:
        print(f"atspeed-ray serve: error: {e}", file=sys.stderr, flush=True)
        return 2
    return serve_until_stopped(a.config, a.url, a.num_cpus)


if __name__ == "__main__":
    sys.exit(main())
