"""Ray Serve deployments: ``DraftModel``, ``TargetModel``, ``Routing`` and the FastAPI ingress ``Recommender``.

    HTTP -> Recommender --(1 handle call per round)--> DraftModel.propose   (@serve.batch)
                        --(1 handle call per round)--> TargetModel.verify   (@serve.batch)
                        --(fallback / target-only)---> TargetModel.beam_search (@serve.batch)

The ingress runs the decoding core's loop per request (``driver.remote_speculative``): the draft
proposes, the target verifies the tree in one forward, the ingress accepts. Each round costs two
handle calls; a request whose draft fails or misses ``draft_timeout_s`` is answered by the target
alone (plain beam search: the strict answer), and counted as a fallback. With ``routing:
adaptive`` strict requests go to whichever path has been faster lately at the app's load
(``routing.Router``, one for the app in the ``Routing`` deployment).

``cache: replica``: the replicas keep each request's tree caches between its rounds
(``cache.py``), reached through ``affinity.AffinityRouter``. ``graph: chained``: the ingress makes
one ``TargetModel.speculate`` call and the target drives the loop (``chained.py``). ``graph:
colocated``: one ``SpeculativeModel`` replica holds both models (``colocated.py``).

No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at runtime.
"""

import asyncio
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from ray.serve.metrics import Counter, Histogram

from atspeed_ray.decoding.beam import score_dtype
from atspeed_ray.decoding.drafting import Drafter
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.serving.batching import (
    BeamReply, BeamRequest, DraftReply, DraftRequest, VerifyReply, VerifyRequest, beam_batch,
    draft_batch, verify_batch,
)
from atspeed_ray.serving.cache import Release, SessionStore
from atspeed_ray.data.catalog import Catalog, load_catalog
from atspeed_ray.serving.chained import drive
from atspeed_ray.serving.colocated import SpeculateReply, SpeculateRequest, speculate_batch
from atspeed_ray.serving.config import (
    MAX_BODY_BYTES, MAX_HISTORY, MAX_K, AppArgs, BatchSettings, FaultConfig, ModelSettings,
    RecommendRequest, RecommendResponse, random_seed,
)
from atspeed_ray.drafts import draft_kind
from atspeed_ray.serving.fallback import FallbackPolicy
from atspeed_ray.serving.graphs import OneCallGraph, Runner, SeparateGraph, SpeculativeGraph, TargetAlone
from atspeed_ray.serving.http import field_error, stopping
from atspeed_ray.serving.http import install as install_http_guards
from atspeed_ray.serving.retry import DraftBreaker, Retries, start_errors
from atspeed_ray.serving.router_client import AppRouter, Plan, Report, RouterClient, Snapshot, Ticket
from atspeed_ray.serving.routing import Route, Router
from atspeed_ray.serving.stopping import STOPPING_DETAIL, StopFlag

if TYPE_CHECKING:
    from atspeed_ray.models import DeviceConfig

logger = logging.getLogger("ray.serve")

BATCH_BOUNDS = [1.5, 2.5, 4.5, 8.5, 16.5, 32.5, 64.5]
LATENCY_BOUNDS_MS = [2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
SMALL_COUNT_BOUNDS = [0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 12.5]
READY_TIMEOUT_S = 1.0  # /readyz: a model deployment that does not answer a ping by then is not ready
READY_CACHE_S = 2.0  # /readyz pings at most this often

# the batched model methods start from BatchSettings' defaults; each replica then applies its
# own settings (ModelSettings.batch, from the app's draft_batch / target_batch) in __init__
batched = serve.batch(**BatchSettings().model_dump())


async def _result(resp: DeploymentResponse) -> Any:
    return await resp


def fire_and_forget(work: Any, pending: set[asyncio.Future[Any]]) -> None:
    """Run ``work`` (a DeploymentResponse or an awaitable) off the caller's path; a failure (a
    replica that died has nothing to free) is logged, never raised."""
    fut = asyncio.ensure_future(_result(work) if isinstance(work, DeploymentResponse) else work)
    pending.add(fut)

    def done(f: asyncio.Future[Any]) -> None:
        pending.discard(f)
        if not f.cancelled() and f.exception() is not None:
            logger.debug("background call failed: %s", f.exception())

    fut.add_done_callback(done)


def device_config(s: ModelSettings) -> "DeviceConfig":
    """Where and how a replica runs its model (``ModelSettings``)."""
    from atspeed_ray.models import DeviceConfig

    return DeviceConfig(device=s.device, dtype=s.dtype, forward=s.forward)


class ModelReplica:
    """Shared by both model deployments: load model + item index, one compute thread."""

    kind = "model"

    def __init__(self, settings: dict[str, Any]):
        s = ModelSettings.model_validate(settings)
        self.settings = s
        if s.torch_threads is not None:
            torch.set_num_threads(s.torch_threads)
        with start_errors(f"{self.kind} cannot load {s.model}"):
            self.device = self.load(s)
            catalog = load_catalog(s.data, s.catalog_model or s.model)
        self.index = catalog.index.to(self.device)
        # forwards run in one worker thread: the event loop keeps queueing requests meanwhile,
        # so the next batch forms while the current one computes
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.kind)
        self.batch_size = Histogram("atspeed_batch_size", description="requests per batched model call",
                                    boundaries=BATCH_BOUNDS, tag_keys=("method",))  # Serve adds deployment/replica/application
        self.batches = {"batches": 0, "requests": 0, "max_batch": 0}
        c = s.cache
        self.store = (SessionStore(c.max_sessions, int(c.max_mb * 2**20), c.ttl_s)
                      if c is not None else None)  # cache: replica: per-request tree caches
        logger.info("%s: %s on %s, %d threads", self.kind, s.model, self.device, torch.get_num_threads())

    def load(self, s: ModelSettings) -> torch.device:
        """Load the replica's model (the target: a causal LM, ``self.model``); its device."""
        from atspeed_ray.models import load_decoder

        self.model = load_decoder(s.model, device_config(s))
        return next(self.model.parameters()).device

    async def run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def apply_batch_settings(self, *methods: Any) -> None:
        """This replica's ``ModelSettings.batch`` on its ``@serve.batch`` methods."""
        b = self.settings.batch
        for method in methods:
            method.set_max_batch_size(b.max_batch_size)
            method.set_batch_wait_timeout_s(b.batch_wait_timeout_s)

    def observe_batch(self, method: str, n: int) -> None:
        b = self.batches
        b["batches"] += 1
        b["requests"] += n
        b["max_batch"] = max(b["max_batch"], n)
        self.batch_size.observe(n, tags={"method": method})

    async def ping(self) -> bool:
        """Readiness probe of the ingress: answered by the event loop, no model work."""
        return True

    async def release(self, req: Release) -> None:
        """A request ended: free its tree cache (routed to its home by its ``affinity_key``)."""
        if self.store is not None:  # in the compute thread, which alone touches the store
            await self.run(self.store.release, req.key)

    async def clear_cache(self) -> int:
        """Drop every stored tree cache (tests: force misses); returns how many."""
        if self.store is None:
            return 0
        n = len(self.store)
        await self.run(self.store.clear)
        return n

    def info(self) -> dict[str, Any]:
        """This replica: pid, device, torch threads, batching and cache counters."""
        cache = self.store.snapshot() if self.store is not None else None
        return {"pid": os.getpid(), "device": str(self.device), "threads": torch.get_num_threads(),
                **self.batches, "cache": cache}


@serve.deployment(name="DraftModel", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class DraftModel(ModelReplica):
    kind = "DraftModel"

    def __init__(self, settings: dict[str, Any]):
        super().__init__(settings)
        self.apply_batch_settings(self.propose)
        self.fault = FaultConfig()

    def load(self, s: ModelSettings) -> torch.device:
        """Any draft kind (``drafts.load_drafter``): the replica runs its ``Drafter``."""
        from atspeed_ray.drafts import load_drafter

        self.drafter: Drafter = load_drafter(s.model, device_config(s))
        return self.drafter.device

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``user_config`` = ``FaultConfig`` (chaos testing); applied without a restart."""
        self.fault = FaultConfig.model_validate(user_config or {})
        logger.warning("DraftModel fault config: %s", self.fault)

    @batched
    async def propose(self, reqs: list[DraftRequest]) -> list[DraftReply]:
        self.observe_batch("propose", len(reqs))
        if self.fault.fault == "raise":
            raise RuntimeError("DraftModel fault injection: raise")
        if self.fault.fault == "delay":
            await asyncio.sleep(self.fault.fault_delay_s)
        return await self.run(draft_batch, self.drafter, self.index, reqs, self.store)


@serve.deployment(name="TargetModel", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class TargetModel(ModelReplica):
    kind = "TargetModel"

    def __init__(self, settings: dict[str, Any], draft: DeploymentHandle | None = None,
                 draft_timeout_s: float | None = None):
        super().__init__(settings)
        self.apply_batch_settings(self.verify, self.beam_search)
        self.draft, self.draft_timeout_s = draft, draft_timeout_s  # graph: chained
        self.background: set[asyncio.Future[Any]] = set()

    async def speculate(self, req: SpeculateRequest) -> SpeculateReply:
        """graph: chained: this replica drives the request's loop (``chained.drive``): the draft
        through its handle, the verify calls through this replica's own batched ``verify``."""
        draft = self.draft
        assert draft is not None, "speculate needs the DraftModel handle (graph: chained)"

        def release(key: str) -> None:
            fire_and_forget(draft.release.remote(Release(key)), self.background)
            if self.store is not None:
                fire_and_forget(self.run(self.store.release, key), self.background)

        return await drive(req, self.index, lambda r: _result(draft.propose.remote(r)), self.verify,
                           self.beam_search, release, score_dtype(self.model), self.draft_timeout_s,
                           cache=self.store is not None)

    @batched
    async def verify(self, reqs: list[VerifyRequest]) -> list[VerifyReply]:
        self.observe_batch("verify", len(reqs))
        return await self.run(verify_batch, self.model, self.index, reqs, self.store)

    @batched
    async def beam_search(self, reqs: list[BeamRequest]) -> list[BeamReply]:
        self.observe_batch("beam_search", len(reqs))
        return await self.run(beam_batch, self.model, self.index, reqs)


@serve.deployment(name="SpeculativeModel", ray_actor_options={"num_cpus": 0.75},
                  max_ongoing_requests=64)
class SpeculativeModel(ModelReplica):
    """Target and draft in one replica: ``speculate`` answers a whole request; ``beam_search``
    is the target alone (routed requests and fallbacks), as on ``TargetModel``."""

    kind = "SpeculativeModel"

    def __init__(self, settings: dict[str, Any], draft_settings: dict[str, Any]):
        from atspeed_ray.drafts import load_drafter

        super().__init__(settings)  # the target, the item index, the compute thread
        d = ModelSettings.model_validate(draft_settings)
        with start_errors(f"{self.kind} cannot load {d.model}"):
            self.draft: Drafter = load_drafter(d.model, device_config(d))
        self.apply_batch_settings(self.speculate, self.beam_search)

    @batched
    async def speculate(self, reqs: list[SpeculateRequest]) -> list[SpeculateReply]:
        self.observe_batch("speculate", len(reqs))
        return await self.run(speculate_batch, self.model, self.draft, self.index, reqs)

    @batched
    async def beam_search(self, reqs: list[BeamRequest]) -> list[BeamReply]:
        self.observe_batch("beam_search", len(reqs))
        return await self.run(beam_batch, self.model, self.index, reqs)


# --------------------------------------------------------------------------------- ingress
api = FastAPI(
    title="AtSpeed recommender",
    description=(
        "Top-k next-item recommendation by speculative beam search (AtSpeed): a draft model "
        "proposes, the target verifies. `strict` mode returns exactly the target's beam search. "
        f"Limits: history 1..{MAX_HISTORY} item ids (the most recent history_window are used), "
        f"k 1..{MAX_K} (and at most the app's max_k / the number of items); bodies up to "
        f"{MAX_BODY_BYTES} bytes (413 beyond)."),
    version="0.1.0",
)
install_http_guards(api)  # body-size limit (413), safe and short 422s, 503 for internal errors


def running_replicas() -> dict[str, int]:
    """Running replicas of each deployment of this app (what autoscaling decided)."""
    try:
        app = serve.get_replica_context().app_name
        deployments = serve.status().applications[app].deployments
        return {name: int(d.replica_states.get("RUNNING", 0)) for name, d in deployments.items()}
    except Exception as e:  # noqa: BLE001 - diagnostics only
        logger.warning("cannot read replica counts: %s", e)
        return {}


def check_positions(model_dir: str, catalog: Catalog) -> None:
    """Refuse to start if the longest prompt + the generated item exceeds the model's positions."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    max_pos = config.get("max_position_embeddings")
    L = catalog.index.L
    longest = 1 + (L + 1) * catalog.history_window + L
    if max_pos is not None and longest > int(max_pos):
        raise ValueError(f"history_window {catalog.history_window} gives prompts of up to {longest} "
                         f"tokens, more than the model's max_position_embeddings {max_pos}")




async def _ping(handle: DeploymentHandle) -> str:
    """"ok", or why a model deployment did not answer a ping in time."""
    try:
        await asyncio.wait_for(_result(handle.ping.remote()), READY_TIMEOUT_S)
        return "ok"
    except asyncio.TimeoutError:
        return f"no answer within {READY_TIMEOUT_S} s"
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


class HandleRouter:
    """``router_client.RouterService`` over the ``Routing`` deployment's handle."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    def choose(self, replica: str, mode: str, k: int, reports: list[Report], ordered: int,
               in_flight: int) -> Any:
        return _result(self.handle.choose.remote(replica, mode, k, reports, ordered, in_flight))

    def sync(self, replica: str, reports: list[Report], ordered: int, in_flight: int) -> Any:
        return _result(self.handle.sync.remote(replica, reports, ordered, in_flight))

    def snapshot(self) -> Any:
        return _result(self.handle.snapshot.remote())


# Everything a deployment class uses from this module is defined above it: Serve serialises
# the class when it is decorated, with the module's names as they are at that moment
# (``tests/test_serving_parts.py`` checks the order).
class IngressMetrics:
    """The ingress's Ray Serve metrics (Serve adds deployment, replica and application tags)."""

    def __init__(self) -> None:
        tags = ("app_path", "mode")
        self.requests = Counter("atspeed_requests", description="recommend requests",
                                tag_keys=("app_path", "mode", "status"))
        self.latency = Histogram("atspeed_latency_ms", description="recommend latency (ms)",
                                 boundaries=LATENCY_BOUNDS_MS, tag_keys=tags)
        self.accepted = Histogram("atspeed_accepted_steps", description="accepted draft steps per request",
                                  boundaries=SMALL_COUNT_BOUNDS, tag_keys=tags)
        self.target_calls = Histogram("atspeed_target_calls", description="target forwards per request",
                                      boundaries=SMALL_COUNT_BOUNDS, tag_keys=tags)
        self.handle_calls = Histogram("atspeed_handle_calls", description="DeploymentHandle calls per request",
                                      boundaries=SMALL_COUNT_BOUNDS, tag_keys=tags)
        self.fallbacks = Counter("atspeed_fallbacks", description="requests answered by the target alone "
                                 "because the draft failed or missed its deadline", tag_keys=("reason",))
        self.routed = Counter("atspeed_routed", description="strict requests sent by adaptive routing",
                              tag_keys=("arm", "k"))

    def status(self, app_path: str, mode: str, status: str) -> None:
        self.requests.inc(tags={"app_path": app_path, "mode": mode, "status": status})

    def answered(self, stats: dict[str, Any], mode: str, ms: float) -> None:
        tags = {"app_path": str(stats["path"]), "mode": mode}
        self.latency.observe(ms, tags=tags)
        self.accepted.observe(float(stats["accepted_steps"] or 0), tags=tags)
        self.target_calls.observe(float(stats["target_forwards"]), tags=tags)
        self.handle_calls.observe(float(stats["handle_calls"]), tags=tags)
        self.status(str(stats["path"]), mode, "ok")


@serve.deployment(name="Routing", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=4096)
class Routing:
    """The app's one adaptive router (``router_client.AppRouter``), whose plans every ingress
    replica routes from (``router_client.RouterClient``): one probe schedule, one warm-up and one
    in-flight count (the load) for the whole app. Every method is a coroutine, so they run one at
    a time on the replica's event loop (the router is plain Python state). One replica by design:
    Serve restarts it if it dies, with the start the app was built with; meanwhile each ingress
    replica routes with its own router."""

    def __init__(self, args: dict[str, Any]):
        a = AppArgs.model_validate(args)
        self.app = AppRouter(Router(a.router_config(), start=a.route_start))

    async def choose(self, replica: str, mode: str, k: int, reports: list[Report], ordered: int,
                     in_flight: int) -> tuple[Route, Plan]:
        return self.app.choose(replica, mode, k, reports, ordered, in_flight)

    async def sync(self, replica: str, reports: list[Report], ordered: int, in_flight: int) -> Plan:
        return self.app.sync(replica, reports, ordered, in_flight)

    async def snapshot(self) -> Snapshot:
        return self.app.router.snapshot()


@serve.deployment(name="Recommender", num_replicas=2, ray_actor_options={"num_cpus": 0.125},
                  max_ongoing_requests=256)  # 2 replicas: losing one ingress is no outage
@serve.ingress(api)
class Recommender:
    """The HTTP API over the parts: request checks and metrics here; the path of a request
    (``graphs.Runner``), the route (``routing.Router``), the fallback (``fallback.FallbackPolicy``)."""

    def __init__(self, args: dict[str, Any], target: DeploymentHandle, draft: DeploymentHandle | None = None,
                 routing: DeploymentHandle | None = None):
        self.args = a = AppArgs.model_validate(args)
        torch.set_num_threads(1)  # acceptance is small tensor work; leave the cores to the models
        with start_errors(f"Recommender cannot start on {a.target}"):
            self.catalog: Catalog = load_catalog(a.data, a.target, a.history_window)
            check_positions(a.target, self.catalog)
        self.max_k = min(a.max_k, self.catalog.index.num_leaves)
        self.target = target  # TargetModel, or SpeculativeModel (graph: colocated)
        self.colocated = a.speculative and a.graph == "colocated"
        self.draft = draft if a.speculative and not self.colocated else None
        self.speculative = self.draft is not None or self.colocated
        # the draft reads the target's hidden states: the loop asks the target for them
        self.features = self.speculative and draft_kind(a.draft).features  # type: ignore[arg-type]
        self.background_calls: set[asyncio.Future[Any]] = set()  # off the requests' paths: cache releases, routing answers
        # adaptive routing: the app's Routing deployment, and this replica's own router for when
        # it does not answer (router_client.py)
        self.router = (RouterClient(Router(a.router_config(), start=a.route_start),
                                    None if routing is None else HandleRouter(routing),
                                    lambda call: fire_and_forget(call, self.background_calls),
                                    name=f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
                       if self.speculative and a.routing == "adaptive" else None)
        self.retries = Retries(a.retry, "TargetModel")
        self.ready: tuple[float, dict[str, str]] | None = None  # (when, model -> "ok" | why not)
        self.stop = StopFlag()  # set once `atspeed-ray serve` begins its orderly stop
        self.counts: dict[str, float] = {
            "requests": 0, "ok": 0, "errors": 0, "fallbacks": 0, "fallback_error": 0,
            "fallback_deadline": 0, "fallback_draft_down": 0, "retries": 0, "routed_target_only": 0,
            "handle_calls": 0, "rounds": 0,
            "accepted_steps": 0, "target_forwards": 0, "latency_ms_sum": 0.0, "cache_hits": 0,
            "release_calls": 0}
        self.metrics = IngressMetrics()
        self.fallback = FallbackPolicy(DraftBreaker(a.retry), self.counts, self.metrics.fallbacks)
        self.runner = Runner(self._graph(), TargetAlone(self._beam, self.catalog.index.L),
                             self.fallback, self.counts)

    def _graph(self) -> SpeculativeGraph | None:
        """The speculative path of this app's graph (None: the target-only app)."""
        a, L = self.args, self.catalog.index.L
        if not self.speculative:
            return None
        if self.draft is None or a.graph != "separate":  # colocated / chained: one call
            return OneCallGraph(lambda r: _result(self.target.speculate.remote(r)),
                                a.target_timeout_s, L, self.fallback, self.features)
        draft = self.draft
        dtype = torch.float64 if a.dtype == "float64" else torch.float32
        return SeparateGraph(lambda r: _result(draft.propose.remote(r)), self._verify, self._release,
                             self.catalog.index, dtype, a.draft_timeout_s, a.cache == "replica",
                             self.fallback, self.features)

    # ------------------------------------------------------------------ endpoints
    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "speculative": self.speculative}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """200 when every model deployment answers a ping within ``READY_TIMEOUT_S`` (checked at
        most every ``READY_CACHE_S``), else 503 naming the one(s) that did not. ``/healthz`` only
        says this ingress replica runs. 503 once the server is stopping."""
        if await self.stop.since() is not None:
            raise stopping(STOPPING_DETAIL)
        now = time.monotonic()
        if self.ready is None or now - self.ready[0] > READY_CACHE_S:
            handles = {"SpeculativeModel" if self.colocated else "TargetModel": self.target,
                       "DraftModel": self.draft}
            checks = {name: h for name, h in handles.items() if h is not None}
            answers = await asyncio.gather(*(_ping(h) for h in checks.values()))
            self.ready = (now, dict(zip(checks, answers)))
        models = self.ready[1]
        ok = all(v == "ok" for v in models.values())
        return JSONResponse(status_code=200 if ok else 503,
                            content={"status": "ready" if ok else "not ready", "models": models})

    @api.get("/meta")
    async def meta(self) -> dict[str, Any]:
        return {"speculative": self.speculative, "graph": self.args.graph, "cache": self.args.cache,
                "num_items": self.catalog.index.num_items,
                "L": self.catalog.index.L, "max_k": self.max_k, "max_history": MAX_HISTORY,
                "history_window": self.catalog.history_window, "gamma": self.args.gamma,
                "draft_beams_factor": self.args.draft_beams_factor,
                "example_histories": self.catalog.examples}

    @api.get("/stats")
    async def stats(self) -> dict[str, Any]:
        """Counters of this ingress replica since it started, and the app's running replicas."""
        source, routing = (await self.router.snapshot()) if self.router is not None else (None, None)
        return {"pid": os.getpid(), **self.counts, "routing": routing, "routing_source": source,
                "routing_misses": 0 if self.router is None else self.router.misses,
                "routing_calls": None if self.router is None else self.router.counts(),
                "draft_breaker": self.fallback.snapshot(),
                "replicas": await asyncio.to_thread(running_replicas)}

    @api.post("/recommend", response_model=RecommendResponse)
    async def recommend(self, req: RecommendRequest) -> RecommendResponse:
        if await self.stop.refuses():
            raise stopping(STOPPING_DETAIL)
        self.counts["requests"] += 1
        app_path = "speculative" if self.speculative else "target_only"
        if req.k > self.max_k:
            self.metrics.status(app_path, req.mode, "invalid")
            raise field_error(["body", "k"], f"k must be <= {self.max_k} for this catalog and app",
                              req.k, "less_than_equal")
        unknown = self.catalog.unknown(req.history)
        if unknown:
            self.metrics.status(app_path, req.mode, "invalid")
            i = unknown[0]
            raise field_error(["body", "history", i],
                              f"unknown item id {req.history[i]} ({len(unknown)} unknown in history)",
                              req.history[i], "unknown_item")
        router = self.router if req.mode == "strict" else None  # adaptive routing: strict only
        route: Ticket | None = None if router is None else await router.choose(req.mode, req.k)
        if route is not None:
            self.metrics.routed.inc(tags={"arm": route.route.arm, "k": str(req.k)})
        start = time.perf_counter()
        try:
            out = await self.runner.decode(self.catalog.prompt(req.history), self.search_params(req),
                                           "speculative" if route is None else route.route.arm)
        except BaseException as e:  # failed, or cancelled (the client left)
            if router is not None and route is not None:
                router.forget(route)  # no sample; a probe frees its slot
            if isinstance(e, Exception):
                self.counts["errors"] += 1
                self.metrics.status(app_path, req.mode, "error")
            raise
        ms = (time.perf_counter() - start) * 1000.0
        stats = out.stats
        stats["latency_ms"] = round(ms, 3)
        if router is not None and route is not None:
            if stats["path"] == "fallback":  # its latency is no sample of the speculative path
                router.forget(route)
            else:
                router.observe(route, ms)
        self.metrics.answered(stats, req.mode, ms)
        c = self.counts
        c["ok"] += 1
        c["latency_ms_sum"] += ms
        for key in ("handle_calls", "rounds", "accepted_steps", "target_forwards", "cache_hits"):
            c[key] += float(stats[key] or 0)
        return RecommendResponse(items=out.items, scores=out.scores, stats=stats)

    def search_params(self, req: RecommendRequest) -> SearchParams:
        """The request's search: its k and mode, the app's gamma and draft width. A relaxed
        request always has a seed: its own, else one drawn here at random (``random_seed``; the
        answer reports it as ``stats.seed``, so the same body with that seed gives it again)."""
        seed = None
        if req.mode == "relaxed":
            seed = req.seed if req.seed is not None else random_seed()
        return SearchParams(req.k, self.args.draft_width(req.k), self.args.gamma, req.mode, seed,
                            expand_last=self.args.expand_last if req.mode == "strict" else 0)

    # ------------------------------------------------------------------ model calls
    async def _call_target(self, call: Any, method: str, stats: dict[str, Any]) -> Any:
        """A TargetModel call under ``target_timeout_s``, sent again if its replica dies."""
        return await self.retries.call(
            lambda: asyncio.wait_for(_result(call()), self.args.target_timeout_s), method,
            [self.counts, stats])

    async def _verify(self, req: VerifyRequest, stats: dict[str, Any]) -> VerifyReply:
        return await self._call_target(lambda: self.target.verify.remote(req), "verify", stats)

    async def _beam(self, req: BeamRequest, stats: dict[str, Any]) -> BeamReply:
        return await self._call_target(lambda: self.target.beam_search.remote(req), "beam_search", stats)

    def _release(self, model: str, key: str) -> None:
        """Free a request's replica caches, off the request's path (fire and forget)."""
        handle = self.draft if model == "draft" else self.target
        assert handle is not None
        fire_and_forget(handle.release.remote(Release(key)), self.background_calls)
        self.counts["release_calls"] += 1
