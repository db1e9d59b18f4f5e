"""App builders for ``serve run`` / ``serve deploy`` configs and for ``serve.run`` in Python.

``import_path: atspeed_ray.serving.app:build_app`` with ``args`` = ``AppArgs`` fields::

    args:
      target: runs/beauty/target     # HF model dirs (what the training commands export)
      draft: runs/beauty/draft       # omit (or target_only: true) for the target-only baseline
      data: data/beauty-prepared     # prepared folder: index.json + tokenizer (+ history_len)

``build_target_only_app`` is the baseline: the same ingress and TargetModel, no DraftModel.
Deployment sizes and autoscaling are in the YAML ``deployments:`` overrides.

``draft_beams_factor: auto`` without a ``draft_widths`` table: the builder measures one
(``with_measured_widths``), in its own process, before the deployments start; with adaptive
routing it also times speculation against beam search per k (``start_arms``), so a k whose
draft clearly loses starts on the target alone (``route_start``).

``routing: adaptive`` adds the ``Routing`` deployment: the app's one router, whose plans every
ingress replica routes from. ``graph: colocated`` deploys one ``SpeculativeModel`` (draft and
target in one replica) instead of ``DraftModel`` + ``TargetModel``; ``graph: chained`` gives the
TargetModel the DraftModel's handle (it drives each request's loop, ``chained.py``); ``cache:
replica`` routes the model deployments with ``affinity.AffinityRouter`` (the rounds of a request
reach the replicas holding its caches).
"""

import asyncio
import logging
from typing import Any, Callable

import torch
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from atspeed_ray.serving.affinity import AffinityRouter
from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.beam import DecodeResult
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.serving.config import AppArgs
from atspeed_ray.serving.deployments import DraftModel, Recommender, Routing, SpeculativeModel, TargetModel
from atspeed_ray.serving.routing import Arm, Load, RouterConfig, calibrated_start
from atspeed_ray.settings import AUTO_WIDTH_PROMPTS

logger = logging.getLogger(__name__)
AUTO_WIDTH_KS = (1, 5, 10, 20)  # k the builder measures a width for (others: the nearest's N/k)
CALIBRATION_BATCH = 8  # requests per call of the routing calibration's batched load (at most the target's max_batch_size)
CALIBRATION_BATCHES = 4  # calls (pairs) it times per k


def with_measured_widths(args: AppArgs) -> AppArgs:
    """``args`` with ``draft_widths`` measured when ``draft_beams_factor`` is auto and none are
    given: the served models loaded here, ``choose_width`` at one request per call on the
    catalog's example histories, for each k of ``AUTO_WIDTH_KS`` the app allows (an N, or the
    widths per drafted level as text, ``10/200/20``). With adaptive routing (and no
    ``route_start`` given) the same histories then time speculation at the chosen widths against
    beam search, paired, one per call and in batches (``start_arms``): a k whose speculation
    clearly loses (or wins) at a load starts on the faster path there, no warm-up. On a GPU cluster, where the builder may run
    without the replicas' device, give ``draft_widths`` (as ``bench --draft-beams auto`` prints
    them) instead."""
    if not args.auto_width or not args.speculative:
        return args
    from atspeed_ray.data.catalog import load_catalog
    from atspeed_ray.drafts import load_drafter
    from atspeed_ray.models import DeviceConfig, load_decoder
    from atspeed_ray.width import choose_width

    assert args.draft is not None
    dev = DeviceConfig(device=args.device, dtype=args.dtype, forward=args.forward)
    try:  # any draft kind, as the replicas load it
        target, draft = load_decoder(args.target, dev), load_drafter(args.draft, dev)
        catalog = load_catalog(args.data, args.target, args.history_window)
    except Exception as e:  # the replicas load the same files and report the cause themselves
        logger.warning("draft_beams_factor auto: cannot load the models here (%s); N = k", e)
        return args
    index = catalog.index.to(next(target.parameters()).device)
    prompts = [catalog.prompt(h) for h in catalog.examples[:AUTO_WIDTH_PROMPTS]]
    widths: dict[int, int | str] = {}
    chosen: dict[int, SearchParams] = {}
    for k in (k for k in AUTO_WIDTH_KS if k <= min(args.max_k, index.num_items)):
        choice = choose_width(target, draft, index, prompts, k, (args.gamma,),
                              expand_last=args.expand_last)
        logger.warning("draft_beams_factor auto: %s", choice.summary())
        widths[k] = choice.best.table_value  # N, or per level: 10/200/20
        chosen[k] = choice.params(SearchParams(k, k, args.gamma, "strict",
                                               expand_last=args.expand_last))
    update: dict[str, Any] = {"draft_widths": widths}
    if args.routing == "adaptive" and not args.route_start:
        update["route_start"] = start_arms(
            target, draft, index, prompts, chosen, min(CALIBRATION_BATCH, args.target_batch.max_batch_size),
            stateless=args.cache == "stateless" and args.graph == "separate")
    return args.model_copy(update=update)


def served_speculation(target: torch.nn.Module, draft: Any, index: ItemIndex, params: SearchParams,
                       stateless: bool) -> Callable[[list[list[int]]], DecodeResult]:
    """Speculation on a batch of prompts as the app serves it, for timing. ``stateless``
    (``cache: stateless``, separate graph): every round's calls carry and recompute the prompt,
    as the replicas do (``draft_batch`` / ``verify_batch`` without a session store, driven by
    ``driver.remote_speculative``, in process, no Ray: on 2 CPU cores this costs about twice
    the cached loop on the Beauty target). Otherwise the offline loop, which keeps its caches
    between rounds as the replicas then do."""
    from atspeed_ray.decoding.drafting import as_drafter
    from atspeed_ray.decoding.speculative import speculative_search
    from atspeed_ray.serving.batching import draft_batch, verify_batch
    from atspeed_ray.serving.driver import RemoteModels, remote_speculative

    if not stateless:
        return lambda batch: speculative_search(target, draft, batch, index, params)

    async def propose(req: Any) -> Any:
        return draft_batch(draft, index, [req])[0]

    async def verify(req: Any) -> Any:
        return verify_batch(target, index, [req])[0]

    features = as_drafter(draft).wants_features
    # the builder (Serve's build task) runs no event loop: one per timed call
    return lambda batch: asyncio.run(remote_speculative(RemoteModels(propose, verify), batch, index,
                                                        params, features=features))


def start_arms(target: torch.nn.Module, draft: Any, index: ItemIndex, prompts: list[list[int]],
               chosen: dict[int, SearchParams], batch: int = CALIBRATION_BATCH,
               stateless: bool = False) -> dict[Load, dict[int, Arm]]:
    """load -> k -> the path strict requests start on (``routing.calibrated_start``): speculation
    at ``chosen[k]`` and beam search timed back to back, the order alternating
    (``benchmarking.paired_speedup``, one pass). ``alone``: one request per call, each of
    ``prompts``; ``batched``: ``batch`` requests per call (the prompts in turn), on
    ``CALIBRATION_BATCHES`` calls (a batch of verification trees costs far more on a
    compute-bound device than a batch of beam-search steps: the two loads may differ).
    Speculation runs as served (``served_speculation``: ``stateless``, the rounds recompute the
    prompt). A k without a clear winner at a load is left out there."""
    from atspeed_ray.benchmarking import device_clock, paired_speedup, timing_threads
    from atspeed_ray.decoding.beam import beam_search

    n = len(prompts)
    calls: dict[Load, tuple[int, int]] = {"alone": (1, n)}  # requests per call, calls
    if batch > 1:
        calls["batched"] = (batch, CALIBRATION_BATCHES)
    starts: dict[Load, dict[int, Arm]] = {load: {} for load in calls}
    with timing_threads(index.device), torch.no_grad():
        for k, params in chosen.items():
            speculate = served_speculation(target, draft, index, params, stateless)
            for load, (b, units) in calls.items():
                def unit(u: int, b: int = b) -> list[list[int]]:
                    return [prompts[(u * b + j) % n] for j in range(b)]
                ws = paired_speedup(lambda u: beam_search(target, unit(u), index, k),
                                    lambda u: speculate(unit(u)),
                                    units, units * b, 1, device_clock(index.device),
                                    extra_passes=0).speedup
                arm = calibrated_start(ws.q1, ws.q3, RouterConfig().margin)
                logger.warning("adaptive routing: k=%d, %d per call: speculation %s of beam search "
                               "on %d example histories: strict requests %s start on %s", k, b,
                               ws.text(), min(n, units * b), load,
                               {"speculative": "speculation", "target_only": "the target alone"}.get(
                                   arm or "", "both paths in turn (warm-up)"))
                if arm is not None:
                    starts[load][k] = arm
    return starts


def build(args: AppArgs, options: dict[str, dict[str, Any]] | None = None) -> Application:
    """The app graph; ``options`` = per-deployment ``.options(...)`` overrides, by deployment name
    (what a YAML ``deployments:`` list does), e.g. ``{"DraftModel": {"num_replicas": 2}}``."""
    args.check_paths()  # a bad path: one line now, not a replica traceback per retry
    args = with_measured_widths(args)
    opts = options or {}
    affinity = ({"request_router_config": RequestRouterConfig(request_router_class=AffinityRouter)}
                if args.cache == "replica" and args.graph != "colocated" else {})

    def dep(d: Any, routed: bool = False) -> Any:
        return d.options(**{**(affinity if routed else {}), **opts.get(d.name, {})})

    target_settings = args.model_settings("target").model_dump()
    # adaptive routing: one router for the app, whose plans every ingress replica routes from
    routing = (dep(Routing).bind(args.model_dump())
               if args.speculative and args.routing == "adaptive" else None)
    if args.speculative and args.graph == "colocated":
        target_settings["cache"] = None  # both caches live in the replica's own loop
        both = dep(SpeculativeModel).bind(target_settings, args.model_settings("draft").model_dump())
        return dep(Recommender).bind(args.model_dump(), both, None, routing)
    draft = (dep(DraftModel, routed=True).bind(args.model_settings("draft").model_dump())
             if args.speculative else None)
    if args.speculative and args.graph == "chained":  # the target calls the draft itself
        target = dep(TargetModel, routed=True).bind(target_settings, draft, args.draft_timeout_s)
    else:
        target = dep(TargetModel, routed=True).bind(target_settings)
    return dep(Recommender).bind(args.model_dump(), target, draft, routing)


def build_app(args: dict[str, Any]) -> Application:
    """Speculative app (or the baseline with ``target_only: true``)."""
    return build(AppArgs.model_validate(args))


def build_target_only_app(args: dict[str, Any]) -> Application:
    """Target-only baseline: plain target beam search behind the same HTTP API."""
    return build(AppArgs.model_validate({**args, "target_only": True}))
