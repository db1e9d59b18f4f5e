"""The chained graph (``graph: chained``): the TargetModel replica drives a request's loop.

    HTTP -> Recommender --(1 handle call per request)--> TargetModel.speculate
                                                           |-- verify: its own batched method, in process
                                                           '--(1 handle call per drafting round)--> DraftModel.propose

The separate graph sends every round through the ingress: draft call, reply, verify call, reply
(two handle calls, four messages). Here the target runs the same ``speculative_loop`` through the
same ``RemoteModels`` driver, so the draft's next proposal starts from the target's reply without
a trip through the ingress: one call from the ingress per request, one per drafting round from
the target. The models stay separate deployments (scaled and failing independently); with
``cache: replica`` the draft calls carry the request's key (``AffinityRouter``) and the verify
calls use this replica's ``SessionStore``, which a request never leaves.

A draft that fails or misses its deadline: this replica answers with its own beam search (the
strict answer) and says so in the reply (``fallback``). No Ray import: the calls come in as
async callables.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
import torch

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.speculative import STAT_NAMES
from atspeed_ray.serving.batching import BeamReply, BeamRequest
from atspeed_ray.serving.colocated import SpeculateReply, SpeculateRequest
from atspeed_ray.serving.driver import DraftUnavailable, ProposeFn, RemoteModels, VerifyFn, remote_speculative

BeamFn = Callable[[BeamRequest], Awaitable[BeamReply]]


async def drive(req: SpeculateRequest, index: ItemIndex, propose: ProposeFn, verify: VerifyFn,
                beam: BeamFn, release: Callable[[str], None], dtype: torch.dtype,
                draft_timeout_s: float | None, cache: bool) -> SpeculateReply:
    """One request's speculative loop on the target side (see the module docstring).
    ``release(key)`` frees the request's caches when it ends (``cache``: keyed calls)."""
    t0 = time.perf_counter()
    params = req.params
    models = RemoteModels(propose, verify, draft_timeout_s=draft_timeout_s,
                          session=uuid.uuid4().hex if cache else None)
    try:
        res = await remote_speculative(models, [req.prompt], index, params, dtype, req.features)
    except DraftUnavailable as e:
        reply = await beam(BeamRequest([req.prompt], params.k))
        return SpeculateReply(reply.items[0], reply.scores[0], {},
                              (time.perf_counter() - t0) * 1000, fallback=e.reason,
                              detail=str(e)[:200], calls=models.calls["draft"])
    finally:
        if models.session is not None:
            release(models.session)
    stats = {n: res.stats[n][0] for n in STAT_NAMES}
    return SpeculateReply(res.items[0], res.scores[0], stats, (time.perf_counter() - t0) * 1000, calls=models.calls["draft"],
                          cache_hits=models.hits["draft"] + models.hits["target"])
