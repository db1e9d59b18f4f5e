"""Replica-side work, batched over concurrent requests. Pure torch: no Ray here.

The ingress runs the decoding core's loop (``speculative_loop``) once per HTTP request and sends
the loop's ``ProposeCall`` / ``VerifyCall`` to the replicas as ``DraftRequest`` / ``VerifyRequest``.
A replica's ``@serve.batch`` method gets a list of them, and the functions here stack the
requests along the batch dimension (``Beams.cat``), run the core's ``draft_phase`` /
``verify_phase`` / ``beam_search`` ONCE for the group (each request keeps its own progress
``t``), and split the result back per request (``Beams.split``).

Stateless calls (``cache: stateless``): no KV cache outlives a call. The beams arrive with every
cache slot forgotten (``Beams.forget_slots``), so each forward recomputes prompt + beams (``feed``
with ``cache=None``). Requests that cannot be stacked (a different k or draft width, or relaxed
requests with and without a seed) run as separate groups of the same batch. Relaxed requests of
different seeds stack: each row samples from its own key (``ProposeCall.keys``, ``noise``), so
its draws do not depend on the rows beside it, and no random state travels back.

A request that carries a ``SessionRef`` (``cache: replica``) runs on its own tree cache kept in
the replica's ``SessionStore`` (``cache.py``): one forward per such request (caches of different
requests are not stacked), over only the tokens its cache does not hold yet.

The draft replica runs any ``Drafter`` (``drafts.load_drafter``). For one that reads the
target's hidden states (a feature draft), a verify request asks for them (``features``) and the
reply carries them at the nodes it scored, plus the prompts' ``Context`` once per request; the
draft request carries them at the accepted beams (``Beams.features``) and the context (see
``DraftRequest.context``). Nothing here reads them: they are stacked, split and moved only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from torch import Tensor

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.beam import Beams, beam_search, row_slices
from atspeed_ray.decoding.drafting import Drafter, DraftStep, as_drafter
from atspeed_ray.decoding.feed import Context
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.decoding.speculative import ProposeCall, VerifyCall
from atspeed_ray.decoding.verification import Verified, verify_phase
from atspeed_ray.serving.cache import SessionRef, SessionStore, draft_cached, verify_cached

T = TypeVar("T")
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------ payloads
# The tensors of these payloads travel as the existing ones always have: plain dataclasses of
# tensors that Ray serialises (``Beams``, ``DraftStep``, ``Context``). A drafter's per-node
# features (``Beams.features`` [B, K, F], ``Context``) ride along unread: only the drafter and
# the target's forward interpret them.
@dataclass
class DraftRequest:
    """A ProposeCall on the wire. ``beams.features`` [B, K, F]: the target's hidden states at
    the accepted beams, for a drafter that reads them (None otherwise)."""

    beams: Beams  # [B, K, L]
    t: Tensor  # [B]
    g: Tensor  # [B]
    prompts: list[list[int]]  # [B]
    params: SearchParams
    keys: Tensor | None = None  # relaxed, seeded: [B] each row's drafting key of this round
    session: SessionRef | None = None  # cache: replica (None: a stateless call)
    # the target's hidden states over the prompts [B, P, F]: sent on every stateless call of a
    # drafter that reads them, and with cache: replica on its first call only (the replica keeps
    # it) or when the replica asks again (``DraftReply.needs_context``)
    context: Context | None = None

    @property
    def G(self) -> int:
        """Draft steps this request needs (its replies keep exactly these)."""
        return int(self.g.max())

    @property
    def affinity_key(self) -> str | None:
        return None if self.session is None else self.session.key

    @classmethod
    def of(cls, call: ProposeCall, session: SessionRef | None = None,
           context: Context | None = None) -> DraftRequest:
        return cls(call.beams, call.t, call.g, call.prompts, call.params, call.keys, session, context)

    def to(self, device: torch.device) -> DraftRequest:
        return replace(self, beams=self.beams.to(device), t=self.t.to(device), g=self.g.to(device),
                       context=None if self.context is None else self.context.to(device))

    def call(self, context: Context | None) -> ProposeCall:
        """The core's call for this request, with the prompts' ``context`` it drafts from."""
        return ProposeCall(self.beams, self.t, self.g, self.prompts, self.params, context, self.keys)


@dataclass
class DraftReply:
    steps: list[DraftStep]  # G steps of [B, N] beams
    beams: Beams  # [B, K, L]
    compute_ms: float = 0.0  # time of the batched call this request was part of
    cache_hit: bool | None = None  # cache: replica: did the replica hold the request's cache
    # cache: replica: the replica lost the request's prompt context (a miss) and drafted
    # nothing: send the call again with ``context``
    needs_context: bool = False


@dataclass
class VerifyRequest:
    """A VerifyCall on the wire (drafted steps without the draft's sampling distributions or
    features: the target reads neither)."""

    beams: Beams  # [B, K, L]
    t: Tensor  # [B]
    steps: list[DraftStep]  # G steps of [B, N]
    prompts: list[list[int]]
    session: SessionRef | None = None
    features: bool = False  # reply the target's hidden states at the verified nodes
    context: bool = False  # and over the prompts (asked once per request: the ingress keeps it)

    @property
    def affinity_key(self) -> str | None:
        return None if self.session is None else self.session.key

    @classmethod
    def of(cls, call: VerifyCall, session: SessionRef | None = None, context: bool = False
           ) -> VerifyRequest:
        return cls(slim(call.beams), call.t, [slim_step(s) for s in call.steps], call.prompts,
                   session, call.features, call.features and context)


@dataclass
class VerifyReply:
    root_logp: Tensor  # [B, K, C] column log-probs (C code columns, not the V-wide vocabulary)
    step_logp: list[Tensor]  # G x [B, N, C]
    compute_ms: float = 0.0
    # cache: replica: where the target cached the beams' and drafted tokens, [B, K, L] and G x [B, N, L]
    beam_slots: Tensor | None = None
    step_slots: list[Tensor] | None = None
    cache_hit: bool | None = None
    # ``VerifyRequest.features``: the target's hidden states where the log-probs were read,
    # [B, K, F] and G x [B, N, F] (acceptance keeps those of the beams it keeps), and
    # (``VerifyRequest.context``) over the prompts [B, P, F]; opaque here
    root_features: Tensor | None = None
    step_features: list[Tensor] | None = None
    context: Context | None = None

    def verified(self, beams: Beams, steps: list[DraftStep]) -> Verified:
        """What acceptance reads; with the target's slots written into ``beams`` and ``steps``
        when the target keeps a cache."""
        if self.beam_slots is not None and self.step_slots is not None:
            beams = replace(beams, slots={**beams.slots, "target": self.beam_slots})
            steps = [replace(s, beams=replace(s.beams, slots={**s.beams.slots, "target": x}))
                     for s, x in zip(steps, self.step_slots)]
        return Verified(self.root_logp, self.step_logp, beams, steps, self.root_features,
                        self.step_features, self.context)


@dataclass
class BeamRequest:
    prompts: list[list[int]]
    k: int


@dataclass
class BeamReply:
    items: list[list[int]]  # [B][k]
    scores: Tensor  # [B, k]
    compute_ms: float = 0.0


def slim(b: Beams) -> Beams:
    """Only what the target reads: drop the draft's slots."""
    return Beams(b.tokens, b.scores, b.node, {"target": b.slots["target"]})


def slim_step(s: DraftStep) -> DraftStep:
    return DraftStep(slim(s.beams), s.parent, s.valid, None, None, s.children)


# ------------------------------------------------------------------------------ stacking
def pad_steps(steps: list[DraftStep], beams: Beams, N: int, G: int) -> list[DraftStep]:
    """Extend ``steps`` to ``G`` steps with invalid ones (seen by no node, accepted by no one).

    A request with fewer drafted steps can then share a verify forward with longer ones; its
    extra steps change nothing (invalid tree nodes only attend to themselves)."""
    out = list(steps)
    prev = out[-1].beams if out else beams
    B = beams.tokens.shape[0]
    while len(out) < G:
        zero = torch.zeros(B, N, dtype=torch.long, device=beams.tokens.device)
        dummy = prev.take(zero)  # [B, N, L]
        out.append(DraftStep(dummy, zero, torch.zeros(B, N, dtype=torch.bool, device=zero.device),
                             None, None))
        prev = dummy
    return out


def group_by(items: Sequence[T], key: Callable[[T], Hashable]) -> list[list[int]]:
    """Indices of ``items`` grouped by ``key``, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(key(it), []).append(i)
    return list(groups.values())


def stateless_groups(reqs: Sequence[T], done: Sequence[object | None], key: Callable[[T], Hashable]
                     ) -> list[list[int]]:
    """``group_by`` over the requests not answered yet (``done[i] is None``), as indices of ``reqs``."""
    todo = [i for i, d in enumerate(done) if d is None]
    return [[todo[j] for j in grp] for grp in group_by([reqs[i] for i in todo], key)]


def cat_contexts(parts: Sequence[Context | None]) -> Context | None:
    """The prompts' contexts of ``parts`` stacked, each left-padded to the widest (padding
    columns are not valid); None if any part has none."""
    if any(c is None for c in parts):
        return None
    ctx = [c for c in parts if c is not None]
    P = max(c.features.shape[1] for c in ctx)

    def pad(c: Context) -> Context:
        n = P - c.features.shape[1]
        return Context(torch.nn.functional.pad(c.features, (0, 0, n, 0)),
                       torch.nn.functional.pad(c.valid, (n, 0)))

    padded = [pad(c) for c in ctx]
    return Context(torch.cat([c.features for c in padded]), torch.cat([c.valid for c in padded]))


def own_context(ctx: Context, rows: slice, prompts: list[list[int]]) -> Context:
    """Rows ``rows`` of a stacked context, trimmed to their own prompts' width (``prompts``)."""
    P = max(len(p) for p in prompts)
    return Context(ctx.features[rows, -P:], ctx.valid[rows, -P:])


# ------------------------------------------------------------------------------ the work
def _draft_key(r: DraftRequest) -> Hashable:
    # rows with keys and rows on torch's default generator do not stack; nor rows with and
    # without the prompts' context
    return (r.beams.tokens.shape[1], r.params.draft_beams, r.params.sample, r.keys is None,
            r.context is None, r.beams.features is None)


def _draft_one(drafter: Drafter, index: ItemIndex, r: DraftRequest, store: SessionStore
               ) -> DraftReply:
    """A request with a session: on its own cached tree (see ``cache.draft_cached``)."""
    assert r.session is not None
    t0 = time.perf_counter()
    moved = r.to(drafter.device)
    out = draft_cached(drafter, index, store, r.session, moved.call(moved.context))
    if out is None:  # a miss of a drafter that reads the prompts' context, sent without it
        return DraftReply([], r.beams, (time.perf_counter() - t0) * 1000, False, needs_context=True)
    steps, beams, hit = out
    return DraftReply([s.to(CPU) for s in steps], beams.to(CPU),
                      (time.perf_counter() - t0) * 1000, hit)


@torch.no_grad()
def draft_batch(draft: Drafter | torch.nn.Module, index: ItemIndex, reqs: Sequence[DraftRequest],
                store: SessionStore | None = None) -> list[DraftReply]:
    """The drafter's ``propose`` over a batch of requests (``index`` on its device; a causal LM
    is an ``LMDrafter``: ``draft_phase``); requests with a session run on their cache in
    ``store`` (one forward each). Unseeded relaxed requests sample from the replica's default
    torch generator."""
    drafter = as_drafter(draft)
    device = drafter.device
    out: list[DraftReply | None] = [None] * len(reqs)
    for i, r in enumerate(reqs):
        if r.session is not None and store is not None:
            out[i] = _draft_one(drafter, index, r, store)
    for idx in stateless_groups(reqs, out, _draft_key):
        t0 = time.perf_counter()
        group = [reqs[i] for i in idx]
        first = group[0]
        sizes = [r.beams.tokens.shape[0] for r in group]
        keys = None if first.keys is None else torch.cat([r.keys for r in group])  # type: ignore[misc]
        context = cat_contexts([r.context for r in group])
        call = DraftRequest(Beams.cat([r.beams for r in group]), torch.cat([r.t for r in group]),
                            torch.cat([r.g for r in group]), [p for r in group for p in r.prompts],
                            first.params, keys).to(device)
        steps, beams, _ = drafter.propose(
            call.call(None if context is None else context.to(device)), index, None)
        per_step = [s.to(CPU).split(sizes) for s in steps]  # [G][request]
        for j, (i, r, b) in enumerate(zip(idx, group, beams.to(CPU).split(sizes))):
            own = [per_step[s][j] for s in range(r.G)]  # a request keeps its own G steps
            out[i] = DraftReply(own, b, (time.perf_counter() - t0) * 1000)
    return out  # type: ignore[return-value]


def _verified_reply(verified: Verified, r: VerifyRequest, rows: slice, t0: float,
                    cached: bool = False, hit: bool | None = None) -> VerifyReply:
    """Request ``r``'s part (rows ``rows``) of a verification, on the CPU: its own drafted
    columns, its target slots when ``cached``, the features it asked for."""
    widths = [s.parent.shape[1] for s in r.steps]
    step_logp = [lp[rows, :n].to(CPU) for lp, n in zip(verified.step_logp, widths)]
    beam_slots = step_slots = root_f = step_f = ctx = None
    if cached:
        beam_slots = verified.beams.slots["target"][rows].to(CPU)
        step_slots = [s.beams.slots["target"][rows].to(CPU) for s in verified.steps]
    if r.features:
        assert verified.root_features is not None and verified.step_features is not None
        root_f = verified.root_features[rows].to(CPU)
        step_f = [f[rows, :n].to(CPU) for f, n in zip(verified.step_features, widths)]
        if r.context and verified.context is not None:
            ctx = own_context(verified.context, rows, r.prompts).to(CPU)
    return VerifyReply(verified.root_logp[rows].to(CPU), step_logp,
                       (time.perf_counter() - t0) * 1000, beam_slots, step_slots, hit,
                       root_f, step_f, ctx)


def _verify_one(model: torch.nn.Module, index: ItemIndex, r: VerifyRequest, store: SessionStore
                ) -> VerifyReply:
    """A request with a session: on its own cached tree (see ``cache.verify_cached``)."""
    assert r.session is not None
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    verified, hit = verify_cached(model, index, store, r.session, r.beams.to(device), r.t.to(device),
                                  [s.to(device) for s in r.steps], r.prompts, r.features)
    return _verified_reply(verified, r, slice(None), t0, cached=True, hit=hit)


@torch.no_grad()
def verify_batch(model: torch.nn.Module, index: ItemIndex, reqs: Sequence[VerifyRequest],
                 store: SessionStore | None = None) -> list[VerifyReply]:
    """``verify_phase`` (ONE target forward) over a batch of requests; replies carry column
    log-probs only (a few KB per request instead of V floats per node), and the target's hidden
    states where asked (``VerifyRequest.features``). Requests with a session run on their cache
    in ``store`` (one forward each)."""
    device = next(model.parameters()).device
    out: list[VerifyReply | None] = [None] * len(reqs)

    def key(r: VerifyRequest) -> Hashable:
        return (r.beams.tokens.shape[1], r.steps[0].parent.shape[1] if r.steps else -1, r.features)

    for i, r in enumerate(reqs):
        if r.session is not None and store is not None:
            out[i] = _verify_one(model, index, r, store)
    for idx in stateless_groups(reqs, out, key):
        t0 = time.perf_counter()
        group = [reqs[i] for i in idx]
        sizes = [r.beams.tokens.shape[0] for r in group]
        G = max(len(r.steps) for r in group)
        N = group[0].steps[0].parent.shape[1] if G else 0
        padded = [pad_steps(r.steps, r.beams, N, G) for r in group]
        beams = Beams.cat([r.beams for r in group]).to(device)
        widths = [max(p[j].parent.shape[1] for p in padded) for j in range(G)]  # children steps vary
        steps = [DraftStep.cat([p[j].widen(widths[j]) for p in padded]).to(device) for j in range(G)]
        t = torch.cat([r.t for r in group]).to(device)
        prompts = [p for r in group for p in r.prompts]
        verified, _ = verify_phase(model, None, beams, t, steps, prompts, index, group[0].features)
        for i, r, rows in zip(idx, group, row_slices(sizes)):
            out[i] = _verified_reply(verified, r, rows, t0)
    return out  # type: ignore[return-value]


@torch.no_grad()
def beam_batch(model: torch.nn.Module, index: ItemIndex, reqs: Sequence[BeamRequest]) -> list[BeamReply]:
    """Plain target beam search (the fallback and the target-only baseline) over a batch."""
    out: list[BeamReply | None] = [None] * len(reqs)
    for idx in group_by(reqs, lambda r: r.k):
        t0 = time.perf_counter()
        group = [reqs[i] for i in idx]
        sizes = [len(r.prompts) for r in group]
        res = beam_search(model, [p for r in group for p in r.prompts], index, group[0].k)
        scores = res.scores.cpu().split(sizes)
        start = 0
        ms = (time.perf_counter() - t0) * 1000
        for j, (i, n) in enumerate(zip(idx, sizes)):
            out[i] = BeamReply(res.items[start:start + n], scores[j], ms)
            start += n
    return out  # type: ignore[return-value]


__all__ = [
    "BeamReply", "BeamRequest", "DraftReply", "DraftRequest", "VerifyReply", "VerifyRequest",
    "beam_batch", "draft_batch", "pad_steps", "verify_batch",
]
