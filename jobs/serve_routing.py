"""Adaptive routing measured on the served app: throughput and p99 at several concurrencies.

    python jobs/serve_routing.py --json results/serving-routing/tiny.json     # tiny random models
    python jobs/serve_routing.py --target T --draft D [--data P] --json FILE  # trained exports

Deploys, on one private local Ray (loopback, token auth), three apps on the same models and
graph (``--graph``, default separate), each with one replica per deployment (``--ingress``:
Recommender replicas): ``target_only``
(the baseline), ``speculative`` (``routing: speculative``: every strict request speculates) and
``adaptive`` (``routing: adaptive``, the shipped setting). ``--draft-delay-s`` adds the
DraftModel's ``delay`` fault (a slower draft). Then for each ``--concurrency``, ``--repeat``
times, the same ``--requests`` strict requests against each app in turn (the order rotating
from one repeat to the next; the adaptive app keeps its routing state from one level to the
next, as a running server does). Per app and level it reports the repeat with the best
throughput (requests per second, p50, p99, the paths taken), every repeat (``runs``), and the
adaptive app against the faster of the other two (throughput ratio, p99 ratio, whether both
are within ``--tolerance``). Answers are checked identical to target-only.
Bounded: at most ``loadtest.MAX_REQUESTS`` requests per run, loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_graphs import free_port, tiny_models  # noqa: E402  (jobs/serve_graphs.py)

APPS: dict[str, dict[str, Any]] = {
    "target_only": {"target_only": True, "draft": None},
    "speculative": {"routing": "speculative"},
    "adaptive": {"routing": "adaptive"},
}


def deploy(base: dict[str, Any], draft_delay_s: float, ingress: int = 1) -> None:
    from ray import serve

    from atspeed_ray.serving.app import build
    from atspeed_ray.serving.config import AppArgs

    small = {"ray_actor_options": {"num_cpus": 0.05}, "num_replicas": 1}
    names = ("Recommender", "TargetModel", "DraftModel", "SpeculativeModel")
    for name, over in APPS.items():
        opts = {n: dict(small) for n in names}
        opts["Recommender"]["num_replicas"] = ingress
        if draft_delay_s > 0:
            opts["DraftModel"]["user_config"] = {"fault": "delay", "fault_delay_s": draft_delay_s}
        serve.run(build(AppArgs.model_validate({**base, **over}), opts), name=name, route_prefix=f"/{name}")


def level(url: str, bodies: list[dict[str, Any]], concurrency: int, repeat: int) -> dict[str, Any]:
    """Every app at one concurrency: the best-throughput repeat of each, and the answers."""
    from atspeed_ray.serving.loadtest import run_load

    best: dict[str, dict[str, Any]] = {}
    answers: dict[str, list] = {}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in APPS}
    names = list(APPS)
    for r in range(repeat):
        for name in names[r % 3:] + names[:r % 3]:  # the apps in turn, the order rotating
            res = asyncio.run(run_load(f"{url}/{name}", bodies, concurrency))
            if res.errors:
                raise RuntimeError(f"{name}: {res.errors} errors: {res.error_samples[:2]}")
            s = res.summary()
            answers[name] = res.answers
            run = {k: s[k] for k in ("req_per_s", "p50_ms", "p99_ms", "mean_ms", "paths")}
            runs[name].append(run)
            if name not in best or s["req_per_s"] > best[name]["req_per_s"]:
                best[name] = dict(run)
    for name in APPS:
        best[name]["same_answers"] = answers[name] == answers["target_only"]
        best[name]["runs"] = runs[name]  # every repeat, in order
    return best


def versus(row: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """The adaptive app against the faster of the speculative and target-only apps."""
    fast = max(("speculative", "target_only"), key=lambda n: row[n]["req_per_s"])
    low99 = min(row["speculative"]["p99_ms"], row["target_only"]["p99_ms"])
    tput = row["adaptive"]["req_per_s"] / row[fast]["req_per_s"]
    p99 = row["adaptive"]["p99_ms"] / low99
    return {"faster_path": fast, "throughput_vs_faster": round(tput, 3),
            "p99_vs_lower": round(p99, 3),
            "within_tolerance": tput >= 1 - tolerance and p99 <= 1 + tolerance}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target"), p.add_argument("--draft"), p.add_argument("--data")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--graph", choices=["separate", "chained", "colocated"], default="separate")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--draft-beams-factor", type=float, default=2.0)
    p.add_argument("--draft-delay-s", type=float, default=0.0,
                   help="DraftModel delay fault: a slower draft (separate / chained graphs)")
    p.add_argument("--draft-is-target", action="store_true",
                   help="tiny models: the draft is a copy of the target (every drafted step accepted)")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--num-cpus", type=float, default=2)
    p.add_argument("--ingress", type=int, default=1, help="Recommender replicas per app")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from atspeed_ray.serving.loadtest import MAX_REQUESTS, fetch_histories, make_bodies

    if not 1 <= args.requests <= MAX_REQUESTS:
        p.error(f"--requests must be 1..{MAX_REQUESTS}")
    os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")  # a loaded box starts slowly
    import ray
    from ray import serve

    from atspeed_ray.training.ray_utils import init_ray

    with tempfile.TemporaryDirectory() as tmp:
        target, draft, data = ((args.target, args.draft, args.data) if args.target
                               else tiny_models(Path(tmp), args.draft_is_target))
        base = {"target": target, "draft": draft, "data": data, "device": "cpu", "dtype": args.dtype,
                "graph": args.graph, "draft_beams_factor": args.draft_beams_factor,
                "target_threads": 1, "draft_threads": 1,
                "target_batch": {"batch_wait_timeout_s": 0.0}, "draft_batch": {"batch_wait_timeout_s": 0.0}}
        init_ray(num_cpus=args.num_cpus, object_store_memory=300 * 1024**2)  # private, token auth
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            deploy(base, args.draft_delay_s, args.ingress)
            url = f"http://127.0.0.1:{port}"
            histories = asyncio.run(fetch_histories(f"{url}/target_only"))
            bodies = make_bodies(histories, args.requests, args.k, "strict", None)
            table = {}
            for c in args.concurrency:
                row = level(url, bodies, c, args.repeat)
                row["adaptive_vs_faster"] = versus(row, args.tolerance)
                table[str(c)] = row
                print(json.dumps({"concurrency": c, **row["adaptive_vs_faster"],
                                  **{n: [row[n]["req_per_s"], row[n]["p99_ms"]] for n in APPS}}),
                      flush=True)
            import httpx

            stats = httpx.get(f"{url}/adaptive/stats", timeout=30).json()
            routing = stats["routing"]
        finally:
            serve.shutdown()
            ray.shutdown()
    out = {"args": vars(args), "load_avg_1m_end": round(os.getloadavg()[0], 2), "table": table,
           "adaptive_routing_state": routing,
           # calls of the ingress replica that answered /stats: routes it asked of the app's
           # router, routes it took from the app router's standing orders
           "adaptive_routing_calls": stats.get("routing_calls")}
    print(f"strict, k={args.k}, {args.requests} requests x {args.repeat} (best throughput), "
          f"graph {args.graph}, load {os.getloadavg()[0]:.1f}")
    print(f"{'conc':>5} {'app':<12}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}  paths")
    for c, row in table.items():
        for name in APPS:
            r = row[name]
            print(f"{c:>5} {name:<12}{r['req_per_s']:>8.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}  "
                  f"{r['paths']}  same={r['same_answers']}")
        print(f"{'':>5} adaptive vs faster ({row['adaptive_vs_faster']['faster_path']}): throughput "
              f"{row['adaptive_vs_faster']['throughput_vs_faster']:.3f}x, p99 "
              f"{row['adaptive_vs_faster']['p99_vs_lower']:.3f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
