"""The graph runner of the ingress: one request's answer along the app's graph. No Ray here: the
model calls come in as async callables (DeploymentHandle calls in ``deployments.py``, plain
functions in tests).

* ``SeparateGraph`` (``graph: separate``): the ingress drives the decoding core's loop
  (``driver.remote_speculative``), two calls per round: the draft proposes, the target verifies.
* ``OneCallGraph`` (``graph: chained`` / ``colocated``): one call; the TargetModel (which calls
  the draft itself, ``chained.py``) or the SpeculativeModel (``colocated.py``) runs the loop.
* ``TargetAlone``: plain target beam search: the target-only app, requests that adaptive routing
  sends to the target and every fallback.

``Runner.decode`` picks among them for a request: the route (``routing.Arm``), the draft breaker
(``fallback.FallbackPolicy``), the fallback after a failed speculative path. Every answer's
``stats`` say which path gave it (``path``: speculative | fallback | target_only) and what it
cost (handle calls, rounds, target forwards, round trips).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.serving.batching import (
    BeamReply, BeamRequest, DraftReply, DraftRequest, VerifyReply, VerifyRequest,
)
from atspeed_ray.serving.colocated import SpeculateReply, SpeculateRequest
from atspeed_ray.serving.driver import DraftUnavailable, RemoteModels, remote_speculative
from atspeed_ray.serving.fallback import DRAFT_DOWN, FallbackPolicy
from atspeed_ray.serving.routing import Arm

logger = logging.getLogger("ray.serve")

Stats = dict[str, Any]  # one request's stats (``RecommendResponse.stats``), filled in as it goes
# the model calls; the target ones get the request's stats (retries are counted there)
ProposeCall = Callable[[DraftRequest], Awaitable[DraftReply]]
VerifyCall = Callable[[VerifyRequest, Stats], Awaitable[VerifyReply]]
BeamCall = Callable[[BeamRequest, Stats], Awaitable[BeamReply]]
SpeculateCall = Callable[[SpeculateRequest], Awaitable[SpeculateReply]]
Release = Callable[[str, str], None]  # (model "draft" | "target", request key): free its caches


@dataclass(frozen=True)
class Answer:
    items: list[int]  # at most k item ids, best first
    scores: list[float]  # [len(items)]
    stats: Stats


def answer(items: list[int], scores: list[float], stats: Stats) -> Answer:
    """The answer without the -1 items (fewer than k items can exist)."""
    keep = [i for i, item in enumerate(items) if item >= 0]
    return Answer([items[i] for i in keep], [float(scores[i]) for i in keep], stats)


def handle_calls(calls: dict[str, int]) -> int:
    return calls["draft"] + calls["target"]


@dataclass(frozen=True)
class TargetAlone:
    """Plain target beam search (one call; ``L`` target forwards)."""

    beam: BeamCall
    L: int  # codes per item: the target forwards of a beam search

    async def decode(self, prompt: list[int], k: int, stats: Stats, calls: dict[str, int]) -> Answer:
        calls["target"] += 1
        t0 = time.perf_counter()
        reply = await self.beam(BeamRequest([prompt], k), stats)
        stats.update(rounds=None, accepted_steps=None, target_forwards=self.L,
                     handle_calls=handle_calls(calls),
                     beam_rtt_ms=round((time.perf_counter() - t0) * 1000, 3),
                     beam_compute_ms=round(reply.compute_ms, 3))
        return answer(reply.items[0], reply.scores[0].tolist(), stats)


@dataclass(frozen=True)
class SeparateGraph:
    """``graph: separate``: the ingress drives the loop, one draft and one target call a round;
    ``cached`` (``cache: replica``): the calls carry the request's key, and ``release`` frees
    its caches on the replicas that answered when it ends."""

    propose: ProposeCall
    verify: VerifyCall
    release: Release
    index: ItemIndex
    dtype: torch.dtype  # beam scores
    draft_timeout_s: float
    cached: bool
    fallback: FallbackPolicy
    features: bool = False  # the draft reads the target's hidden states

    async def decode(self, prompt: list[int], params: SearchParams, stats: Stats,
                     calls: dict[str, int], ticket: float) -> Answer | None:
        """The speculative answer; None (the fallback noted in ``stats``) if the path failed."""
        models = RemoteModels(self.propose, lambda r: self.verify(r, stats),
                              draft_timeout_s=self.draft_timeout_s, calls=calls,
                              session=uuid.uuid4().hex if self.cached else None)
        try:
            res = await remote_speculative(models, [prompt], self.index, params, self.dtype,
                                           self.features)
            stats.update({k: round(v, 3) for k, v in models.times.items()})
            stats.update(path="speculative", rounds=res.stats["rounds"][0],
                         accepted_steps=res.stats["accepted_steps"][0],
                         target_forwards=res.stats["target_calls"][0],
                         draft_forwards=res.stats["draft_calls"][0],
                         handle_calls=handle_calls(calls), draft_width=params.N,
                         cache_hits=models.hits["draft"] + models.hits["target"])
            self.fallback.draft_ok()
            return answer(res.items[0], res.scores[0].tolist(), stats)
        except DraftUnavailable as e:
            self.fallback.draft_failed(ticket)
            reason, detail = e.reason, str(e)
        except Exception as e:  # noqa: BLE001 - a target call failed: one more try, alone
            logger.exception("speculative path failed")
            reason, detail = "target_error", f"{type(e).__name__}: {e}"
        finally:
            if models.session is not None:
                for name in ("draft", "target"):
                    if models.calls[name]:
                        self.release(name, models.session)
        self.fallback.note(reason, detail, stats)
        return None


@dataclass(frozen=True)
class OneCallGraph:
    """``graph: chained`` / ``colocated``: one call answers the request; a chained target that
    lost its draft answers alone and says so (``SpeculateReply.fallback``)."""

    speculate: SpeculateCall
    timeout_s: float  # the target's deadline
    L: int  # codes per item: the target forwards of a beam search
    fallback: FallbackPolicy
    features: bool = False  # graph: chained: the draft reads the target's hidden states

    async def decode(self, prompt: list[int], params: SearchParams, stats: Stats,
                     calls: dict[str, int], ticket: float) -> Answer | None:
        calls["target"] += 1
        t0 = time.perf_counter()
        try:
            reply = await asyncio.wait_for(
                self.speculate(SpeculateRequest(prompt, params, self.features)), self.timeout_s)
        except Exception as e:  # noqa: BLE001 - the replica failed: one more try, the target alone
            logger.exception("speculative call failed")
            self.fallback.note("target_error", f"{type(e).__name__}: {e}", stats)
            return None
        calls["draft"] += reply.calls  # made by the target (graph: chained)
        rtt = {"speculate_rtt_ms": round((time.perf_counter() - t0) * 1000, 3),
               "speculate_compute_ms": round(reply.compute_ms, 3),
               "handle_calls": handle_calls(calls)}
        if reply.fallback is not None:  # the target answered alone: the strict answer
            self.fallback.note(reply.fallback, reply.detail, stats)
            stats.update(rounds=None, accepted_steps=None, target_forwards=self.L, **rtt)
            return answer(reply.items, reply.scores.tolist(), stats)
        st = reply.stats
        stats.update(path="speculative", rounds=st["rounds"], accepted_steps=st["accepted_steps"],
                     target_forwards=st["target_calls"], draft_forwards=st["draft_calls"],
                     draft_width=params.N, cache_hits=reply.cache_hits, **rtt)
        return answer(reply.items, reply.scores.tolist(), stats)


SpeculativeGraph = SeparateGraph | OneCallGraph


@dataclass(frozen=True)
class Runner:
    """A request's path: speculation along ``graph`` (None: the target-only app) when routed
    there and the draft breaker allows it, else (or after a failure) ``alone``."""

    graph: SpeculativeGraph | None
    alone: TargetAlone
    fallback: FallbackPolicy
    counts: dict[str, float]  # the ingress counters (``routed_target_only``)

    async def decode(self, prompt: list[int], params: SearchParams, arm: Arm = "speculative"
                     ) -> Answer:
        # cache_hits: 0 unless a speculative path reads replica caches (every answer reports it)
        stats: Stats = {"mode": params.mode, "k": params.k, "prompt_tokens": len(prompt),
                        "cache_hits": 0}
        calls = {"draft": 0, "target": 0}
        speculate = self.graph is not None and arm == "speculative"
        ticket = self.fallback.ticket() if speculate else None  # None: the draft failed moments ago
        if speculate and ticket is None:
            self.fallback.note(DRAFT_DOWN, "a draft call failed moments ago", stats)
        elif ticket is not None:
            assert self.graph is not None
            if params.seed is not None:
                stats["seed"] = params.seed
            out = await self.graph.decode(prompt, params, stats, calls, ticket)
            if out is not None:
                return out
        elif self.graph is not None:  # adaptive routing chose the target alone: same strict answer
            self.counts["routed_target_only"] += 1
            stats.update(path="target_only", routed=True)
        else:
            stats["path"] = "target_only"
        return await self.alone.decode(prompt, params.k, stats, calls)
