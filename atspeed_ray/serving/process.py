"""The ``atspeed-ray serve`` process: a private local Ray, the Serve config deployed, and a wait
that ends on the first deployment that cannot start or on a stop signal.

* Start: a replica whose constructor fails (a bad model folder, a catalog that does not fit the
  model) ends the command within seconds, exit 1, with the replica's exception on one line
  (Serve itself would retry it and wait for health forever).
* Stop: SIGTERM or SIGINT only sets a flag; the main thread then gives Serve at most
  ``SERVE_SHUTDOWN_S`` to shut down (it drains in-flight requests) and ends the private Ray
  instance (its processes are ours alone): about 8 s on 2 busy cores. A SIGTERM to the whole
  process group reaches Ray's own processes too; they shut themselves down, and Ray ends this
  driver (exit 1) when its raylet is gone, about 10 s later; nothing waits for a controller
  that is no longer there.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

POLL_S = 0.5
SERVE_SHUTDOWN_S = 5.0
STARTUP_FAILED = "A replica failed to start"  # how Serve's deployment status says so


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


def serve_until_stopped(config: Path, url: str, num_cpus: float | None) -> int:
    """Deploy ``config`` on a fresh local Ray and wait; 0 after a stop signal, 1 on a bad start."""
    import ray
    from ray import serve
    from ray.serve.scripts import cli as serve_cli

    from atspeed_ray.training.ray_utils import init_ray

    stop = threading.Event()
    init_ray(num_cpus=num_cpus, include_dashboard=False, namespace="serve",
             object_store_memory=512 * 1024**2)
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own handlers
        signal.signal(sig, lambda *_: stop.set())
    rc, ready = 0, False
    try:
        # `serve run` reports on stdout; that is Ray's log, stdout is this command's own
        with contextlib.redirect_stdout(sys.stderr):
            serve_cli.main(["run", str(config), "--non-blocking"], standalone_mode=False)
        while not stop.wait(POLL_S):
            status = serve.status()
            error = failure(status)
            if error is not None:
                print(f"atspeed-ray serve: error: {error}", file=sys.stderr, flush=True)
                rc = 1
                break
            if not ready and running(status):
                ready = True
                print(f"serving on {url}  (POST /recommend, GET /healthz, /readyz, /docs)", flush=True)
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
    ray.shutdown()
    print(f"stopped in {time.monotonic() - t0:.1f} s (Serve {t1 - t0:.1f} s, Ray "
          f"{time.monotonic() - t1:.1f} s)", file=sys.stderr, flush=True)
