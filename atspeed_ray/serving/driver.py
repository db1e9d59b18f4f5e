"""The ingress side of the speculative loop: drive the decoding core's ``speculative_loop`` with
remote model calls. No Ray import: the two calls are async callables (DeploymentHandle calls in
``deployments.py``, plain functions in tests).

Per round: one draft call (``ProposeCall`` -> ``DraftRequest``) and one target call
(``VerifyCall`` -> ``VerifyRequest``); acceptance runs here, in the ingress. Without a
``session`` key the calls are stateless (``keep_cache=False``: see ``batching.py``); with one
(``cache: replica``) every call carries a ``SessionRef`` and the replicas keep the request's tree
caches between rounds (``cache.py``): the loop runs with ``keep_cache=True``, and what
``EndRoundCall`` would do to the caches is sent along with the next call to each model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.beam import DecodeResult
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.decoding.speculative import (
    EndRoundCall, ModelCall, ProposeCall, SpeculativeLoop, VerifyCall, speculative_loop,
)
from atspeed_ray.serving.batching import DraftReply, DraftRequest, VerifyReply, VerifyRequest
from atspeed_ray.serving.cache import SessionRef

ProposeFn = Callable[[DraftRequest], Awaitable[DraftReply]]
VerifyFn = Callable[[VerifyRequest], Awaitable[VerifyReply]]


class DraftUnavailable(RuntimeError):
    """The draft call failed or missed its deadline: answer with the target alone."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # "error" | "deadline"


async def run_loop_async(loop: SpeculativeLoop,
                         answer: Callable[[ModelCall], Awaitable[object]]) -> DecodeResult:
    """Drive ``loop`` to its end, awaiting ``answer(call)`` for each yielded call."""
    try:
        call = next(loop)
        while True:
            reply = await answer(call)
            call = loop.send(reply)
    except StopIteration as stop:
        return stop.value
    finally:
        loop.close()


@dataclass
class RemoteModels:
    """Answers the loop's calls with remote (stateless) draft and target calls.

    ``calls`` counts the draft and target calls (also when one fails); ``times`` sums their
    round trips and the replicas' compute time (ms); ``hits`` counts the calls that found the
    request's cache on their replica (``session`` set). Relaxed sampling needs no state here:
    each draft call carries its rows' keys (``ProposeCall.keys``), made from the seed."""

    propose: ProposeFn
    verify: VerifyFn
    draft_timeout_s: float | None = None  # deadline of one draft call (None: no deadline)
    calls: dict[str, int] = field(default_factory=lambda: {"draft": 0, "target": 0})
    # where the time goes (ms): round trips of the calls and the compute inside the replicas
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("draft_rtt_ms", "draft_compute_ms", "verify_rtt_ms", "verify_compute_ms"), 0.0))
    session: str | None = None  # the request's key: replica-side caches (None: stateless)
    hits: dict[str, int] = field(default_factory=lambda: {"draft": 0, "target": 0})
    # per model: rows kept since its last call (EndRoundCall's ``keep``, composed)
    _keep: dict[str, Tensor | None] = field(default_factory=lambda: {"draft": None, "target": None})
    # per model: calls answered (a draft call sent again with the context is one answer)
    _answered: dict[str, int] = field(default_factory=lambda: {"draft": 0, "target": 0})
    _have_context: bool = False  # the loop holds the prompts' context (asked of the target once)
    _draft_has_context: bool = False  # cache: replica: the draft replica was sent it

    def ref(self, name: str) -> SessionRef | None:
        """The session of the next call to ``name`` (its step = calls answered so far)."""
        if self.session is None:
            return None
        keep, self._keep[name] = self._keep[name], None
        return SessionRef(self.session, self._answered[name], keep)

    async def _propose(self, call: ProposeCall) -> DraftReply:
        """The draft call; the prompts' context travels on every stateless call, with a session
        only until the draft replica holds it (and again if it lost it)."""
        sent = call.context if self.session is None or not self._draft_has_context else None
        req = DraftRequest.of(call, self.ref("draft"), sent)
        reply = await self.propose(req)
        if reply.needs_context:  # the replica lost the request's state: the same call, with it
            self.calls["draft"] += 1
            reply = await self.propose(replace(req, context=call.context))
        self._draft_has_context = call.context is not None
        self._answered["draft"] += 1
        return reply

    def end_round(self, call: EndRoundCall) -> object:
        """Nothing to compact here: the rows that stay travel with the next call to each model."""
        if self.session is not None and call.keep is not None:
            for name, prev in self._keep.items():
                self._keep[name] = call.keep if prev is None else prev[call.keep]
        return call.beams

    async def __call__(self, call: ModelCall) -> object:
        if isinstance(call, ProposeCall):
            self.calls["draft"] += 1
            t0 = time.perf_counter()
            try:
                coro = self._propose(call)
                reply = await (asyncio.wait_for(coro, self.draft_timeout_s)
                               if self.draft_timeout_s is not None else coro)
            except (asyncio.TimeoutError, TimeoutError) as e:
                raise DraftUnavailable("deadline", f"no draft reply within {self.draft_timeout_s}s") from e
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any draft failure means: target alone
                raise DraftUnavailable("error", f"{type(e).__name__}: {e}") from e
            self.times["draft_rtt_ms"] += (time.perf_counter() - t0) * 1000
            self.times["draft_compute_ms"] += reply.compute_ms
            self.hits["draft"] += int(bool(reply.cache_hit))
            return reply.steps, reply.beams
        if isinstance(call, VerifyCall):
            self.calls["target"] += 1
            t0 = time.perf_counter()
            out = await self.verify(VerifyRequest.of(call, self.ref("target"), not self._have_context))
            self._answered["target"] += 1
            self._have_context = self._have_context or out.context is not None
            self.times["verify_rtt_ms"] += (time.perf_counter() - t0) * 1000
            self.times["verify_compute_ms"] += out.compute_ms
            self.hits["target"] += int(bool(out.cache_hit))
            return out.verified(call.beams, call.steps)
        assert isinstance(call, EndRoundCall)
        return self.end_round(call)


async def remote_speculative(models: RemoteModels, prompts: list[list[int]], index: ItemIndex,
                             params: SearchParams, dtype: torch.dtype = torch.float32,
                             features: bool = False) -> DecodeResult:
    """Speculative beam search with the remote draft and target of ``models`` (whose ``calls``
    and ``times`` are updated in place; ``dtype``: the beam score dtype; ``features``: the
    draft reads the target's hidden states, ``Drafter.wants_features``).

    Raises ``DraftUnavailable`` when a draft call fails or misses ``models.draft_timeout_s``."""
    loop = speculative_loop(prompts, index, params, keep_cache=models.session is not None, dtype=dtype,
                            features=features)
    # no torch.no_grad() here: grad mode is per thread, and a `with` block held across an
    # `await` leaks its state into every coroutine interleaved with this one. The loop itself
    # only combines tensors that carry no graph (the models run under no_grad where they live).
    return await run_loop_async(loop, models)
