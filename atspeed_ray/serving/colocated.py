"""The co-located graph (``graph: colocated``): draft and target in one ``SpeculativeModel``
replica (``deployments.py``), as vLLM runs speculative decoding. This module is its replica-side
work, pure torch (no Ray here).

    HTTP -> Recommender --(1 handle call per request)--> SpeculativeModel.speculate (@serve.batch)
                        --(fallback / target-only)----> SpeculativeModel.beam_search

The replica runs the decoding core's ``speculative_search`` (the loop with ``LocalModels``:
both tree caches in process, kept between rounds) over every batched request at once; requests
accept, reject and finish independently inside it. Against the separate graph (``DraftModel`` +
``TargetModel``): one handle call per request instead of about two per round, no payloads
between the models and no cache affinity to keep; but draft and target scale and fail together
(a replica holds both models' memory; a draft fault takes the target's capacity with it).
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.drafting import Drafter
from atspeed_ray.decoding.noise import row_streams
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.decoding.speculative import STAT_NAMES, speculative_search
from atspeed_ray.serving.batching import group_by


@dataclass
class SpeculateRequest:
    prompt: list[int]
    params: SearchParams  # relaxed: its seed makes the request's random numbers
    # graph: chained: the draft reads the target's hidden states (``Drafter.wants_features``);
    # a co-located replica asks its own drafter
    features: bool = False


@dataclass
class SpeculateReply:
    items: list[int]  # [k] (-1: fewer items exist)
    scores: Tensor  # [k]
    stats: dict[str, int]  # target_calls, draft_calls, rounds, accepted_steps
    compute_ms: float = 0.0
    # graph: chained (``chained.drive``): a draft that failed ("error" | "deadline": the items
    # are the target's beam search), the draft calls the target made, the cache hits they had
    fallback: str | None = None
    detail: str = ""
    calls: int = 0
    cache_hits: int = 0


def _key(r: SpeculateRequest) -> Hashable:
    p = r.params
    return (p.k, p.draft_beams, p.gamma, p.mode, p.seed is None)  # seeds differ per row, not per group


@torch.no_grad()
def speculate_batch(target: torch.nn.Module, draft: Drafter | torch.nn.Module, index: ItemIndex,
                    reqs: Sequence[SpeculateRequest]) -> list[SpeculateReply]:
    """``speculative_search`` over a batch of requests, one group per search setting. Seeded
    relaxed requests of different seeds share a group: each samples from its own stream, as row
    0 of a search of its own (``noise.row_streams``), so its answer is the one it gets alone;
    unseeded ones sample from the replica's default torch generator."""
    out: list[SpeculateReply | None] = [None] * len(reqs)
    for idx in group_by(reqs, _key):
        t0 = time.perf_counter()
        group = [reqs[i] for i in idx]
        seeded = [row_streams(r.params.seed, 1) for r in group]
        streams = None if seeded[0] is None else torch.cat(seeded)  # type: ignore[arg-type]
        res = speculative_search(target, draft, [r.prompt for r in group], index, group[0].params,
                                 streams=streams)
        ms = (time.perf_counter() - t0) * 1000
        scores = res.scores.cpu()
        for j, i in enumerate(idx):
            out[i] = SpeculateReply(res.items[j], scores[j], {n: res.stats[n][j] for n in STAT_NAMES},
                                    ms)
    return out  # type: ignore[return-value]
