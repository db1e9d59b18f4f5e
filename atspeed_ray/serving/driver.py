"""The ingress side of the speculative loop: drive the decoding core's ``speculative_loop`` with
remote model calls. No Ray import: the two calls are async callables (DeploymentHandle calls in
``deployments.py``, plain functions in tests).

Per round: one draft call (``ProposeCall`` -> ``DraftRequest``) and one target call
(``VerifyCall`` -> ``VerifyRequest``); acceptance runs here, in the ingress. Calls are stateless
(``keep_cache=False``): see ``batching.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.beam import DecodeResult
from atspeed_ray.decoding.speculative import (
    EndRoundCall, Mode, ModelCall, ProposeCall, SpeculativeLoop, Verified, VerifyCall,
    speculative_loop,
)
from atspeed_ray.serving.batching import DraftReply, DraftRequest, VerifyReply, VerifyRequest

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
    """Answers the loop's calls with remote (stateless) draft and target calls."""

    propose: ProposeFn
    verify: VerifyFn
    seeded: bool = False  # the generator is the request's own: ship its state to the draft
    draft_timeout_s: float | None = None
    calls: dict[str, int] = field(default_factory=lambda: {"draft": 0, "target": 0})
    # where the time goes (ms): round trips of the calls and the compute inside the replicas
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("draft_rtt_ms", "draft_compute_ms", "verify_rtt_ms", "verify_compute_ms"), 0.0))

    async def __call__(self, call: ModelCall) -> object:
        if isinstance(call, ProposeCall):
            self.calls["draft"] += 1
            t0 = time.perf_counter()
            try:
                coro = self.propose(DraftRequest.of(call, self.seeded))
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
            if reply.generator_state is not None and call.generator is not None:
                call.generator.set_state(reply.generator_state)
            return reply.steps, reply.beams
        if isinstance(call, VerifyCall):
            self.calls["target"] += 1
            t0 = time.perf_counter()
            out = await self.verify(VerifyRequest.of(call))
            self.times["verify_rtt_ms"] += (time.perf_counter() - t0) * 1000
            self.times["verify_compute_ms"] += out.compute_ms
            return Verified(out.root_logp, out.step_logp, call.beams, call.steps)
        assert isinstance(call, EndRoundCall)
        return call.beams  # no cache to compact: the calls are stateless


async def remote_speculative(
    propose: ProposeFn, verify: VerifyFn, prompts: list[list[int]], index: ItemIndex, k: int,
    draft_beams: int, gamma: int, mode: Mode, generator: torch.Generator | None,
    seeded: bool = False, draft_timeout_s: float | None = None,
    dtype: torch.dtype = torch.float32, calls: dict[str, int] | None = None,
    times: dict[str, float] | None = None,
) -> DecodeResult:
    """Speculative beam search with remote draft and target.

    ``calls`` (updated in place, also when a call fails) counts the draft and target calls;
    ``times`` (in place too) sums their round trips and the replicas' compute time (ms).
    Raises ``DraftUnavailable`` when a draft call fails or misses ``draft_timeout_s``."""
    models = RemoteModels(propose, verify, seeded, draft_timeout_s)
    if calls is not None:
        calls.setdefault("draft", 0)
        calls.setdefault("target", 0)
        models.calls = calls
    if times is not None:
        times.update(models.times)
        models.times = times
    loop = speculative_loop(prompts, index, k, draft_beams, gamma, mode, generator,
                            keep_cache=False, dtype=dtype)
    # no torch.no_grad() here: grad mode is per thread, and a `with` block held across an
    # `await` leaks its state into every coroutine interleaved with this one. The loop itself
    # only combines tensors that carry no graph (the models run under no_grad where they live).
    return await run_loop_async(loop, models)
