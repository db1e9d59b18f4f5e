"""Kill a DraftModel, a TargetModel and a Recommender replica under load; report as JSON.

    python jobs/serve_faults.py --tiny --requests 400 --concurrency 8 --json faults.json
    python jobs/serve_faults.py --target T --draft D [--data DIR] --json faults.json

Starts a private local Ray (loopback) with ``serve_configs/local.yaml`` and the target-only
baseline app beside it (``serve --with-baseline``), pinned to ``--target-replicas`` TargetModel
replicas (default 2), one DraftModel replica (killing it takes the draft side away) and the
config's 2 Recommender (ingress) replicas, with ``routing: speculative`` so that every strict
request uses the draft. The baseline answers the
same load first: those are the answers every request must get. Then for each deployment in
``--kill``: the load again, one replica killed (``ray.kill``) after ``--kill-at`` of the
requests were answered, and the report of ``atspeed_ray.serving.faults`` (failed out of total
before the client's retries and after them, client and server retries, time to recover, time
until the replacement runs). The client retries (``--retries``, default 2) only after a
connection failure or a 5xx, and counts them.
``--tiny``: random tiny models on synthetic data (no trained models needed). Exit 1 if any
request failed after the client's retries.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

import yaml  # noqa: E402

from atspeed_ray.serving.faults import KILLABLE, kill_under_load  # noqa: E402
from atspeed_ray.serving.loadtest import fetch_histories, make_bodies, run_load  # noqa: E402

APP = "atspeed"
DEPLOY_TIMEOUT_S = 900.0


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target"), p.add_argument("--draft"), p.add_argument("--data")
    p.add_argument("--tiny", action="store_true", help="random tiny models on synthetic data")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--kill", default=",".join(KILLABLE), help="deployments to kill, in order")
    p.add_argument("--kill-at", type=float, default=0.25, help="fraction of the requests answered first")
    p.add_argument("--target-replicas", type=int, default=2)
    p.add_argument("--retries", type=int, default=2, help="client retries after a connection failure or 5xx")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--num-cpus", type=float, default=4.0,
                   help="logical CPUs of the private Ray (the two apps ask for 2.25 at rest)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra app args")
    p.add_argument("--json", default=None, help="write the report here")
    a = p.parse_args(argv)
    if not a.tiny and not (a.target and a.draft):
        p.error("give --target and --draft, or --tiny")
    return a


def tiny_models(root: Path) -> tuple[str, str]:
    from atspeed_ray.data.prepare import prepare
    from atspeed_ray.data.synthetic import SyntheticConfig
    from atspeed_ray.serving.testing import build_random_pair

    prepare("synthetic", root / "data", synthetic=SyntheticConfig(num_users=150, num_items=300))
    target, draft = build_random_pair(root / "data", root / "models", "tiny", seed=5)
    return str(target), str(draft)


def fault_config(a: argparse.Namespace) -> dict:
    """local.yaml + baseline app, with the replica counts and routing of the fault runs."""
    from atspeed_ray.serving.commands import config_dir, resolved_config

    ns = argparse.Namespace(config=str(config_dir() / "local.yaml"), host="127.0.0.1", port=a.port,
                            target=a.target, draft=a.draft, data=a.data, target_only=False,
                            with_baseline=True, set=["routing=speculative", *a.set])
    config = resolved_config(ns)
    for d in config["applications"][0]["deployments"]:
        fixed = {"TargetModel": a.target_replicas, "DraftModel": 1}.get(d["name"])
        if fixed is not None:
            d.pop("autoscaling_config", None)
            d["num_replicas"] = fixed
    return config


def deploy(config: dict, tmp: Path) -> None:
    from ray import serve
    from ray.serve.scripts import cli as serve_cli

    from atspeed_ray.serving.process import failure, running

    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with contextlib.redirect_stdout(sys.stderr):
        serve_cli.main(["run", str(path), "--non-blocking"], standalone_mode=False)
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while not running(status := serve.status()):
        if (error := failure(status)) is not None or time.monotonic() > deadline:
            raise RuntimeError(error or f"not running within {DEPLOY_TIMEOUT_S} s")
        time.sleep(0.5)


async def measure(a: argparse.Namespace, url: str) -> dict:
    histories = await fetch_histories(url)
    bodies = make_bodies(histories, a.requests, a.k, "strict", None)
    await run_load(url, bodies[:16], a.concurrency)  # warm-up
    base = await run_load(f"{url}/baseline", bodies, a.concurrency)
    assert base.errors == 0, base.error_samples
    report = {"requests": a.requests, "concurrency": a.concurrency, "k": a.k,
              "target_replicas": a.target_replicas, "client_retry_budget": a.retries,
              "baseline": base.summary(), "cases": []}
    for deployment in a.kill.split(","):
        r = await kill_under_load(url, APP, deployment, bodies, a.concurrency,
                                  int(a.kill_at * a.requests), base.answers, a.retries)
        s = r.summary()
        report["cases"].append(s)
        print(f"kill {deployment}: failed {s['failed_before_retries']}/{s['total']} before client retries "
              f"({s['failed_sent_after_kill_before_retries']} of them sent after the kill), "
              f"{s['failed']}/{s['total']} after  client retries "
              f"{s['client_retries']}  server retries {s['server_retries']}  recover {s['recover_s']} s  "
              f"replaced {s['replaced_s']} s  worst {s['worst_ms']} ms  paths {s['paths']}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    from ray import serve

    from atspeed_ray.training.ray_utils import init_ray

    with tempfile.TemporaryDirectory(prefix="serve-faults-") as tmp:
        if a.tiny:
            a.target, a.draft = tiny_models(Path(tmp))
        config = fault_config(a)
        init_ray(num_cpus=a.num_cpus, include_dashboard=False, namespace="serve",
                 object_store_memory=512 * 1024**2)
        try:
            deploy(config, Path(tmp))
            report = asyncio.run(measure(a, f"http://127.0.0.1:{a.port}"))
        finally:
            serve.shutdown()
    report["load_average"] = os.getloadavg()
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0 if all(c["failed"] == 0 for c in report["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
