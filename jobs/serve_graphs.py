"""Per-request latency and handle calls of the serving graphs, side by side in one Serve instance.

    python jobs/serve_graphs.py                                   # tiny random models, synthetic data
    python jobs/serve_graphs.py --target T --draft D [--data P]   # trained exports

Deploys, on one private local Ray: the target-only baseline, ``graph: separate`` with
``cache: stateless`` and ``cache: replica``, ``graph: chained`` (replica caches) and
``graph: colocated``, every model deployment with one replica. Then ``--repeat`` times, in turn,
the same ``--requests`` strict requests at ``--concurrency`` against each app; prints per app the
best-of-repeat p50 latency, its ratio to the target-only p50 measured in the same run, and per
request: handle calls, rounds, cache hits (``stats`` of the replies), with the
answers checked identical to target-only. ``--json FILE`` writes the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atspeed_ray.settings import EXPAND_LAST  # noqa: E402  (light: no torch)

GRAPHS: dict[str, dict[str, Any]] = {
    "target_only": {"target_only": True, "draft": None},
    "separate_stateless": {"graph": "separate", "cache": "stateless"},
    "separate_replica": {"graph": "separate", "cache": "replica"},
    "chained_replica": {"graph": "chained", "cache": "replica"},
    "colocated": {"graph": "colocated"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_models(root: Path, copy: bool = False) -> tuple[str, str, str]:
    from atspeed_ray.data.prepare import prepare
    from atspeed_ray.data.synthetic import SyntheticConfig
    from atspeed_ray.serving.testing import build_random_pair

    prepare("synthetic", root / "data", synthetic=SyntheticConfig(num_users=150, num_items=300))
    t, d = build_random_pair(root / "data", root / "models", "tiny", seed=5, draft_is_target=copy)
    return str(t), str(d), str(root / "data")


def deploy_all(base: dict[str, Any]) -> None:
    from ray import serve

    from atspeed_ray.serving.app import build
    from atspeed_ray.serving.config import AppArgs

    small = {"ray_actor_options": {"num_cpus": 0.05}, "num_replicas": 1}
    names = ("Recommender", "TargetModel", "DraftModel", "SpeculativeModel")
    for name, over in GRAPHS.items():
        app = build(AppArgs.model_validate({**base, **over}), {n: small for n in names})
        serve.run(app, name=name, route_prefix=f"/{name}")


def measure(url: str, histories: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    from atspeed_ray.serving.loadtest import make_bodies, run_load

    bodies = make_bodies(histories, args.requests, args.k, "strict", None)
    best: dict[str, dict[str, Any]] = {}
    answers: dict[str, list] = {}
    for _ in range(args.repeat):
        for name in GRAPHS:  # alternate the apps within each repeat
            res = asyncio.run(run_load(f"{url}/{name}", bodies, args.concurrency))
            if res.errors:
                raise RuntimeError(f"{name}: {res.errors} errors: {res.error_samples[:2]}")
            s = res.summary()
            answers[name] = res.answers
            if name not in best or s["p50_ms"] < best[name]["p50_ms"]:
                best[name] = s
    base = best["target_only"]["p50_ms"]
    table = {}
    for name, s in best.items():
        m = s["server_means"]
        table[name] = {"p50_ms": s["p50_ms"], "p50_vs_target_only": round(s["p50_ms"] / base, 3),
                       "req_per_s": s["req_per_s"], "handle_calls": m.get("handle_calls"),
                       "rounds": m.get("rounds"), "cache_hits": m.get("cache_hits", 0.0),
                       "same_answers": answers[name] == answers["target_only"], "paths": s["paths"]}
    return table


def offline(target: str, draft: str, data: str, args: argparse.Namespace) -> dict[str, Any]:
    """The replica work of each graph without Ray or handle calls (in-process async calls, one
    request at a time): what the caches save in compute alone. Per-request ms, best of repeat."""
    import time

    import torch

    from atspeed_ray.decoding import SearchParams, beam_search
    from atspeed_ray.models import DeviceConfig, load_decoder
    from atspeed_ray.serving.batching import draft_batch, verify_batch
    from atspeed_ray.serving.cache import SessionStore
    from atspeed_ray.data.catalog import load_catalog
    from atspeed_ray.serving.colocated import SpeculateRequest, speculate_batch
    from atspeed_ray.serving.driver import RemoteModels, remote_speculative
    from atspeed_ray.settings import draft_width

    torch.set_num_threads(1)
    dev = DeviceConfig(device="cpu", dtype=args.dtype)
    t, d = load_decoder(target, dev), load_decoder(draft, dev)
    catalog = load_catalog(data, target)
    index = catalog.index
    prompts = [catalog.prompt(h) for h in catalog.examples][: args.requests]
    params = SearchParams(args.k, draft_width(args.k, args.draft_beams_factor), 3, "strict",
                          expand_last=args.expand_last)
    stores = {"draft": SessionStore(64, 2**31, 60.0), "target": SessionStore(64, 2**31, 60.0)}

    async def prop(r):
        return draft_batch(d, index, [r], store=stores["draft"])[0]

    async def ver(r):
        return verify_batch(t, index, [r], store=stores["target"])[0]

    def remote(p: list[int], i: int, cached: bool) -> list[int]:
        m = RemoteModels(prop, ver, session=f"{i}-{time.perf_counter_ns()}" if cached else None)
        return asyncio.run(remote_speculative(m, [p], index, params, torch.float32)).items[0]

    runs = {
        "target_only": lambda p, i: beam_search(t, [p], index, args.k).items[0],
        "separate_stateless": lambda p, i: remote(p, i, False),
        "separate_replica": lambda p, i: remote(p, i, True),
        "colocated": lambda p, i: speculate_batch(t, d, index, [SpeculateRequest(p, params)])[0].items,
    }
    best = {n: float("inf") for n in runs}
    answers: dict[str, list] = {}
    with torch.no_grad():
        for _ in range(args.repeat):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                answers[name] = [fn(p, i) for i, p in enumerate(prompts)]
                best[name] = min(best[name], (time.perf_counter() - t0) * 1000 / len(prompts))
    return {n: {"ms_per_request": round(ms, 2), "vs_target_only": round(ms / best["target_only"], 3),
                "same_answers": answers[n] == answers["target_only"]} for n, ms in best.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target"), p.add_argument("--draft"), p.add_argument("--data")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--draft-beams-factor", type=float, default=2.0)
    p.add_argument("--expand-last", type=int, default=EXPAND_LAST,
                   help="children steps (see atspeed-ray bench --help)")
    p.add_argument("--num-cpus", type=float, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--draft-is-target", action="store_true",
                   help="tiny models: the draft is a copy of the target (every drafted step accepted)")
    p.add_argument("--offline", action="store_true",
                   help="only the replica work, in process (no Ray, no handle calls)")
    args = p.parse_args()
    if args.offline:
        with tempfile.TemporaryDirectory() as tmp:
            paths = (args.target, args.draft, args.data) if args.target else tiny_models(Path(tmp), args.draft_is_target)
            table = offline(*paths, args)
        print(f"offline, strict, k={args.k}, {args.requests} requests x {args.repeat} (best), "
              f"load {os.getloadavg()[0]:.1f}")
        for name, r in table.items():
            print(f"{name:<20}{r['ms_per_request']:>9.2f} ms{r['vs_target_only']:>8.3f}x  same={r['same_answers']}")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "offline": table}, indent=2))
        return
    os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")  # a loaded box starts slowly
    import ray
    from ray import serve

    from atspeed_ray.serving.loadtest import fetch_histories
    from atspeed_ray.training.ray_utils import init_ray

    with tempfile.TemporaryDirectory() as tmp:
        target, draft, data = ((args.target, args.draft, args.data) if args.target
                               else tiny_models(Path(tmp), args.draft_is_target))
        base = {"target": target, "draft": draft, "data": data, "device": "cpu", "dtype": args.dtype,
                "draft_beams_factor": args.draft_beams_factor, "expand_last": args.expand_last, "target_threads": 1, "draft_threads": 1,
                "target_batch": {"batch_wait_timeout_s": 0.0}, "draft_batch": {"batch_wait_timeout_s": 0.0}}
        init_ray(num_cpus=args.num_cpus, object_store_memory=300 * 1024**2)  # private, token auth
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            deploy_all(base)
            url = f"http://127.0.0.1:{port}"
            histories = asyncio.run(fetch_histories(f"{url}/target_only"))
            table = measure(url, histories, args)
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"strict, k={args.k}, concurrency {args.concurrency}, {args.requests} requests x {args.repeat} "
          f"(best p50), load {os.getloadavg()[0]:.1f}")
    print(f"{'app':<20}{'p50 ms':>9}{'vs target':>11}{'req/s':>8}{'calls/req':>11}{'rounds':>8}"
          f"{'hits/req':>10}  same")
    for name, r in table.items():
        print(f"{name:<20}{r['p50_ms']:>9.1f}{r['p50_vs_target_only']:>11.3f}{r['req_per_s']:>8.1f}"
              f"{(r['handle_calls'] or 0):>11.2f}{(r['rounds'] or 0):>8.2f}{(r['cache_hits'] or 0):>10.2f}"
              f"  {r['same_answers']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "table": table}, indent=2))


if __name__ == "__main__":
    main()
