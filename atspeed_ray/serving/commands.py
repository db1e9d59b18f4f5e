"""``atspeed-ray serve`` and ``atspeed-ray loadtest``.

``atspeed-ray serve --target DIR --draft DIR --data DIR`` starts ``serve_configs/local.yaml`` with
those paths (made absolute) in the app's ``args``: it starts a fresh local Ray instance (never
joins one it did not start), binds HTTP to 127.0.0.1 and blocks until Ctrl-C / SIGTERM.
``--print-config`` only prints the resolved YAML (for ``serve run`` / ``serve deploy``).
``atspeed-ray serve --config FILE`` without ``--target`` serves FILE's own paths (relative ones
from the current folder, as ``serve run FILE`` reads them): ``serve run FILE`` on a private Ray
that exits when a deployment cannot start (Ray's ``serve run`` keeps waiting).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import sys
from pathlib import Path
from typing import Any

from atspeed_ray.settings import DEFAULT_MODE, LOADTEST_ROUNDS, MODES
from atspeed_ray.training.ray_utils import add_no_auth_flag


def config_dir() -> Path:
    """The Serve configs: the package data of an installed wheel (``atspeed_ray/serve_configs``),
    else the source tree's top-level ``serve_configs/`` (a checkout, an editable install)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "serve_configs"
    return installed if installed.is_dir() else package.parent / "serve_configs"


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the speculative recommender (Ray Serve, local config)")
    p.add_argument("--target", default=None,
                   help="target model folder (HF export); omit to serve the paths in --config")
    p.add_argument("--draft", default=None, help="draft model folder (HF export); omit with --target-only")
    p.add_argument("--data", default=None,
                   help="prepared data folder (item index, tokenizer); default: index.json beside the target")
    p.add_argument("--config", default=str(config_dir() / "local.yaml"),
                   help="Serve config YAML (default: %(default)s)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, 8000)")
    p.add_argument("--host", default="127.0.0.1", choices=LOOPBACK, help="loopback address to bind")
    p.add_argument("--target-only", action="store_true", help="serve the target-only baseline instead")
    p.add_argument("--with-baseline", action="store_true",
                   help="also serve the target-only baseline app at /baseline (for loadtest --baseline-url)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra app args, e.g. --set gamma=2 --set dtype=float64 (YAML values)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_no_auth_flag(p)
    p.set_defaults(func=run_serve)

    q = sub.add_parser("loadtest", help="bounded load against a loopback recommend endpoint")
    q.add_argument("--url", required=True, help="app base URL, e.g. http://127.0.0.1:8000 (loopback only)")
    q.add_argument("--requests", type=int, required=True, help="number of requests (bounded)")
    q.add_argument("--concurrency", type=int, default=1, help="requests in flight")
    q.add_argument("--k", type=int, default=10)
    q.add_argument("--mode", default=DEFAULT_MODE, choices=MODES)
    q.add_argument("--seed", type=int, default=None, help="relaxed: seed of the first request (+i after)")
    q.add_argument("--baseline-url", default=None,
                   help="comparison: same load against this app too (e.g. the target-only app) and print ratios")
    q.add_argument("--data", default=None, help="prepared data folder: use its test histories")
    q.add_argument("--warmup", type=int, default=10, help="unmeasured requests first (per app)")
    q.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    q.add_argument("--json", default=None, help="also write the results as JSON here")
    q.add_argument("--retries", type=int, default=0,
                   help="send a request again after a connection failure or a 5xx, at most this many "
                        "more times (counted and reported; default: never)")
    q.add_argument("--rounds", type=int, default=LOADTEST_ROUNDS,
                   help="with --baseline-url: alternating rounds, each a slice of the requests sent to "
                        "both apps back to back, the first app alternating (ratios pooled, each "
                        "round's beside them)")
    q.set_defaults(func=run_loadtest)


def resolved_config(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    from atspeed_ray.serving.config import AppArgs

    with open(args.config) as f:
        config = yaml.safe_load(f)
    http = config.setdefault("http_options", {})
    http["host"] = args.host
    if args.port is not None:
        http["port"] = args.port
    apps = config["applications"]
    main = apps[0]
    extra = {}
    for kv in args.set:
        key, sep, value = kv.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {kv!r}")
        extra[key] = yaml.safe_load(value)
    if args.target is None:  # the config's own paths, from the current folder like `serve run`
        given = main.get("args", {})
        paths = {key: given.get(key) for key in ("target", "draft", "data")}
        origin = f"{args.config}: args."
    else:
        paths = {"target": args.target, "draft": args.draft, "data": args.data}
        origin = "--"
    if args.target_only:
        paths["draft"] = None
    for key, value in list(paths.items()):
        if value is not None:
            if not Path(value).exists():
                raise FileNotFoundError(f"{origin}{key} {value}: no such folder")
            paths[key] = str(Path(value).resolve())
    app_args = {**main.get("args", {}), **extra, **paths, "target_only": bool(args.target_only)}
    AppArgs.model_validate(app_args).check_paths()  # fail here, not inside a replica
    main["args"] = app_args
    if args.target_only:
        main["deployments"] = [d for d in main.get("deployments", []) if d.get("name") != "DraftModel"]
    if args.with_baseline and not args.target_only:
        base = {**copy.deepcopy(main), "name": f"{main['name']}-baseline", "route_prefix": "/baseline",
                "args": {**copy.deepcopy(app_args), "target_only": True, "draft": None},
                "deployments": [copy.deepcopy(d) for d in main.get("deployments", [])
                                if d.get("name") != "DraftModel"]}
        apps.append(base)
    return config


def run_serve(args: argparse.Namespace) -> int:
    import tempfile

    import yaml

    if args.target is not None and args.draft is None and not args.target_only:
        print("atspeed-ray serve: error: --draft is required (or --target-only)", file=sys.stderr)
        return 2
    try:
        config = resolved_config(args)
    except ValueError as e:  # a bad path or app arg: one line (pydantic's errors are ValueErrors)
        print(f"atspeed-ray serve: error: {str(e).strip()}", file=sys.stderr)
        return 2
    text = yaml.safe_dump(config, sort_keys=False)
    if args.print_config:
        print(text)
        return 0
    import os

    # autoscaling reacts within seconds on this small config (the defaults push metrics every 10 s)
    for var in ("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
                "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"):
        os.environ.setdefault(var, "1")
    from atspeed_ray.serving.process import server_command, supervise

    with tempfile.TemporaryDirectory(prefix="atspeed-serve-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text)
        port = config["http_options"].get("port", 8000)
        return supervise(server_command(path, f"http://{args.host}:{port}", args.num_cpus,
                                        args.allow_no_auth))


def run_loadtest(args: argparse.Namespace) -> int:
    import httpx

    from atspeed_ray.serving.loadtest import (
        MAX_CONCURRENCY, MAX_REQUESTS, MAX_RETRIES, NotLoopback, main_async,
    )

    if (not 1 <= args.requests <= MAX_REQUESTS or not 1 <= args.concurrency <= MAX_CONCURRENCY
            or not 0 <= args.retries <= MAX_RETRIES or not 1 <= args.rounds <= args.requests):
        print(f"atspeed-ray loadtest: error: need 1 <= requests <= {MAX_REQUESTS}, "
              f"1 <= concurrency <= {MAX_CONCURRENCY}, 0 <= retries <= {MAX_RETRIES} "
              f"and 1 <= rounds <= requests", file=sys.stderr)
        return 2
    try:
        return asyncio.run(main_async(args.url, args.requests, args.concurrency, args.k, args.mode,
                                      args.baseline_url, args.data, args.warmup, args.timeout,
                                      args.seed, args.json, args.retries, args.rounds))
    except NotLoopback as e:
        print(f"atspeed-ray loadtest: error: {e}", file=sys.stderr)
        return 2
    except (httpx.HTTPError, OSError, ValueError, KeyError) as e:  # server down, no /meta, bad --data
        print(f"atspeed-ray loadtest: error: cannot prepare the load: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 2
