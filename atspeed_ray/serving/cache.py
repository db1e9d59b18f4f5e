"""Replica-side tree caches, one per request (``cache: replica``). Pure torch: no Ray here.

The ingress runs the decoding core's loop with ``keep_cache=True``; every draft / verify call of
a request carries a ``SessionRef`` (the request's key, the number of calls this model already
answered for it, and the rows kept since the last call). The replica keeps the request's
``TreeCache`` (the core's, as ``LocalModels`` uses it) in a ``SessionStore`` between calls, and
the request's rounds reach that replica through ``affinity.AffinityRouter``.

What ``LocalModels.end_round`` does right after acceptance (drop finished rows, compact away the
rejected branches) happens here at the start of the next call to the same model, on the same
slots: the beams arrive with the slots that model gave them, so compaction and renumbering are
the ones ``LocalModels`` would do. A miss (evicted, expired, replica restarted, routed elsewhere,
a call out of step) forgets that model's slots and recomputes prompt and beams (``feed`` with no
cache): the same answer, one prefill more.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.beam import Beams
from atspeed_ray.decoding.cache import TreeCache
from atspeed_ray.decoding.drafting import Drafter, DraftStep, ProposeCall
from atspeed_ray.decoding.feed import Context
from atspeed_ray.decoding.verification import Verified, verify_phase


@dataclass
class SessionRef:
    """Which request a call belongs to, on the wire with every draft / verify call."""

    key: str  # the request's affinity key (routing and cache lookup)
    step: int  # calls this model already answered for the request (its cache is ready for this one)
    keep: Tensor | None = None  # [B'] rows kept since the last call to this model (None: all)

    @property
    def affinity_key(self) -> str:
        return self.key


@dataclass(frozen=True)
class DraftState:
    """What a draft replica keeps of a request: the drafter's tree cache (None: a drafter
    without one, or none yet) and the prompts' context it was sent (a drafter that reads the
    target's hidden states: sent once, on the request's first draft call)."""

    cache: TreeCache | None
    context: Context | None = None

    def select_rows(self, keep: Tensor) -> DraftState:
        return DraftState(None if self.cache is None else self.cache.select_rows(keep),
                          None if self.context is None else self.context.select_rows(keep))


Held = TreeCache | DraftState  # a target replica keeps a tree cache, a draft replica a DraftState


@dataclass
class Session:
    cache: Held
    step: int  # the call number this cache is ready for
    nbytes: int
    used: float  # clock of the last put


def cache_bytes(held: Held) -> int:
    """Bytes held for a request: a tree cache's keys and values and prompt mask, a context's
    features."""
    if isinstance(held, DraftState):
        n = 0 if held.cache is None else cache_bytes(held.cache)
        if held.context is not None:
            n += sum(x.numel() * x.element_size() for x in (held.context.features, held.context.valid))
        return n
    n = held.is_prompt.numel() * held.is_prompt.element_size()
    for layer in held.kv.layers:
        for x in (layer.keys, layer.values):
            if x is not None:
                n += x.numel() * x.element_size()
    return n


class SessionStore:
    """The tree caches of the requests in flight on one replica: LRU by count and bytes, an idle
    session expires after ``ttl_s``. ``take`` removes the entry it returns (one call of a request
    is in flight at a time); ``put`` stores the cache back for the next call."""

    def __init__(self, max_sessions: int, max_bytes: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.max_sessions, self.max_bytes, self.ttl_s, self.clock = max_sessions, max_bytes, ttl_s, clock
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.nbytes = 0
        # new: a request's first call (nothing to hit yet); misses: a later call without its cache
        self.counts = dict.fromkeys(("new", "hits", "misses", "evicted", "expired", "released"), 0)

    def __len__(self) -> int:
        return len(self.sessions)

    def _drop(self, key: str, reason: str) -> None:
        s = self.sessions.pop(key)
        self.nbytes -= s.nbytes
        self.counts[reason] += 1

    def expire(self) -> None:
        """Drop the sessions idle for more than ``ttl_s`` (oldest first)."""
        now = self.clock()
        while self.sessions:
            key, s = next(iter(self.sessions.items()))
            if now - s.used <= self.ttl_s:
                break
            self._drop(key, "expired")

    def take(self, ref: SessionRef) -> Held | None:
        """The request's cache if this replica holds it, ready for call ``ref.step``; else None
        (a miss: the caller recomputes)."""
        self.expire()
        s = self.sessions.pop(ref.key, None)
        if s is not None:
            self.nbytes -= s.nbytes
        if ref.step == 0 or s is None or s.step != ref.step:
            self.counts["new" if ref.step == 0 else "misses"] += 1
            return None
        self.counts["hits"] += 1
        return s.cache

    def put(self, ref: SessionRef, cache: Held) -> None:
        """Keep ``cache`` for the request's next call; evict least recently used sessions beyond
        the bounds (a cache larger than ``max_bytes`` alone is not kept)."""
        nbytes = cache_bytes(cache)
        if nbytes > self.max_bytes:
            self.counts["evicted"] += 1
            return
        self.sessions[ref.key] = Session(cache, ref.step + 1, nbytes, self.clock())
        self.nbytes += nbytes
        while len(self.sessions) > self.max_sessions or self.nbytes > self.max_bytes:
            self._drop(next(iter(self.sessions)), "evicted")

    def release(self, key: str) -> None:
        """The request ended: free its cache."""
        if key in self.sessions:
            self._drop(key, "released")

    def clear(self) -> None:
        for key in list(self.sessions):
            self._drop(key, "evicted")

    def snapshot(self) -> dict[str, int]:
        return {**self.counts, "sessions": len(self.sessions), "bytes": self.nbytes}


# --------------------------------------------------------------------------- cached phases
def _with_slots(beams: Beams, name: str, slots: Tensor) -> Beams:
    return replace(beams, slots={**beams.slots, name: slots})


def resume(cache: TreeCache | None, ref: SessionRef, name: str, beams: Beams,
           steps: list[DraftStep] = ()) -> tuple[TreeCache | None, Beams, list[DraftStep]]:
    """Bring a stored cache to the state ``LocalModels.end_round`` leaves it in: drop the rows
    that left (``ref.keep``), compact away every slot the beams (and drafted steps) no longer
    reference, renumber their ``name`` slots. With no cache (a miss), forget those slots: the
    forward then recomputes prompt and beams."""
    steps = list(steps)
    if cache is None:
        forget = [torch.full_like(beams.slots[name], -1)] + [
            torch.full_like(s.beams.slots[name], -1) for s in steps]
    else:
        if ref.keep is not None:
            cache = cache.select_rows(ref.keep.to(cache.is_prompt.device))
        sizes = [beams.slots[name].shape[1]] + [s.beams.slots[name].shape[1] for s in steps]
        every = torch.cat([beams.slots[name]] + [s.beams.slots[name] for s in steps], 1)  # [B, M+, L]
        forget = list(cache.compact(every).split(sizes, 1))
    beams = _with_slots(beams, name, forget[0])
    steps = [replace(s, beams=_with_slots(s.beams, name, x)) for s, x in zip(steps, forget[1:])]
    return cache, beams, steps


@torch.no_grad()
def draft_cached(drafter: Drafter, index: ItemIndex, store: SessionStore, ref: SessionRef,
                 call: ProposeCall) -> tuple[list[DraftStep], Beams, bool] | None:
    """``drafter.propose`` on the request's stored draft state (or none: a miss); the state is
    kept for the next call. ``call.context``: the prompts' context if the call carries it, else
    the stored one's. Returns the steps, the beams and whether the state was a hit; None when a
    drafter that reads the context has none (a miss of a call sent without it: the caller sends
    it again with the context, ``DraftReply.needs_context``)."""
    held = store.take(ref)
    assert held is None or isinstance(held, DraftState)
    hit = held is not None
    if held is not None and ref.keep is not None:
        held = held.select_rows(ref.keep.to(call.t.device))
    context = call.context if call.context is not None else None if held is None else held.context
    if drafter.wants_features and context is None:
        return None
    # the rows have been kept above: resume compacts the tree cache only
    cache, beams, _ = resume(None if held is None else held.cache, replace(ref, keep=None), "draft",
                             call.beams)
    steps, beams, cache = drafter.propose(replace(call, beams=beams, context=context), index, cache)
    if cache is not None or context is not None:  # nothing to keep: a first call whose one
        store.put(ref, DraftState(cache, context))  # step was a children step (no forward)
    return steps, beams, hit


@torch.no_grad()
def verify_cached(model: torch.nn.Module, index: ItemIndex, store: SessionStore, ref: SessionRef,
                  beams: Beams, t: Tensor, steps: list[DraftStep], prompts: list[list[int]],
                  features: bool = False) -> tuple[Verified, bool]:
    """``verify_phase`` (ONE target forward) on the request's stored target cache, kept for the
    next call. The drafted steps' target slots (copied from the beams the draft started from)
    are renumbered with the beams'. ``features``: the target's hidden states too."""
    held = store.take(ref)
    assert held is None or isinstance(held, TreeCache)
    hit = held is not None
    cache, beams, steps = resume(held, ref, "target", beams, steps)
    verified, cache = verify_phase(model, cache, beams, t, steps, prompts, index, features)
    store.put(ref, cache)
    return verified, hit


@dataclass
class Release:
    """The end of a request: its replicas may free its caches (routed by ``affinity_key``)."""

    key: str

    @property
    def affinity_key(self) -> str:
        return self.key
