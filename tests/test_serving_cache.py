"""Replica-side caches (``cache: replica``), the affinity router and the co-located graph,
without Ray: the remote loop against the batched replica work and the offline decoding core."""

from __future__ import annotations

import asyncio
import time
import types

import pytest
import torch

from atspeed_ray.decoding import (
    SearchParams, beam_search, speculative_beam_search, speculative_search,
)
from atspeed_ray.serving.affinity import AffinityRouter, affinity_key, home_rank
from atspeed_ray.serving.batching import DraftRequest, draft_batch, verify_batch
from atspeed_ray.serving.cache import Release, SessionRef, SessionStore
from atspeed_ray.serving.colocated import SpeculateRequest, speculate_batch
from atspeed_ray.serving.driver import RemoteModels, remote_speculative
from tests.helpers import WIDE_CHILDREN, serving_random_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return serving_random_pair(tmp_path_factory.mktemp("serving_cache"), n_prompts=5)


def replicas(target, draft, index, stores, between=None):
    """Async draft / verify callables over one replica each, with their session stores;
    ``between()`` runs before every call (to force misses)."""
    async def propose(r):
        if between:
            between()
        return draft_batch(draft, index, [r], store=stores["draft"])[0]

    async def verify(r):
        if between:
            between()
        return verify_batch(target, index, [r], store=stores["target"])[0]

    return propose, verify


def new_stores(**kw) -> dict[str, SessionStore]:
    args = {"max_sessions": 64, "max_bytes": 2**30, "ttl_s": 60.0, **kw}
    return {"draft": SessionStore(**args), "target": SessionStore(**args)}


def run(models, prompt, index, params):
    return asyncio.run(remote_speculative(models, [prompt], index, params, dtype=torch.float64))


@pytest.mark.parametrize("k,n,gamma,expand", [(5, 10, 3, 0), (3, 3, 2, 0), (10, 20, 1, 0),
                                              (5, 10, 3, WIDE_CHILDREN),
                                              (10, 20, 2, WIDE_CHILDREN)])
def test_replica_caches_equal_offline_and_every_later_call_hits(small, k, n, gamma, expand):
    """Also with children steps (``expand_last``): a round that skips the draft forward leaves
    its tokens pending in the draft's cache for the next call."""
    catalog, target, draft, prompts = small
    index = catalog.index
    stores = new_stores()
    prop, ver = replicas(target, draft, index, stores)
    ref = beam_search(target, prompts, index, k)
    for b, p in enumerate(prompts):
        models = RemoteModels(prop, ver, session=f"req-{b}")
        params = SearchParams(k, n, gamma, "strict", expand_last=expand)
        out = run(models, p, index, params)
        off = speculative_search(target, draft, [p], index, params)
        assert out.items[0] == off.items[0] == ref.items[b]
        assert out.stats == off.stats
        torch.testing.assert_close(out.scores[0], ref.scores[b], atol=1e-9, rtol=0)
        # the first call of each model builds the cache, every later one finds it
        assert models.hits == {name: c - 1 for name, c in models.calls.items()}, (models.calls, models.hits)
    for name, store in stores.items():
        snap = store.snapshot()
        assert snap["misses"] == 0 and snap["new"] == len(prompts), (name, snap)
        for b in range(len(prompts)):
            store.release(f"req-{b}")
        assert len(store) == 0 and store.nbytes == 0


def test_a_forced_miss_recomputes_the_same_strict_answer(small):
    """The replicas lose every cache before each call (evicted / restarted / routed elsewhere):
    each call recomputes prompt and beams, and the answer is the target's beam search."""
    catalog, target, draft, prompts = small
    index = catalog.index
    stores = new_stores()

    def clear():
        for s in stores.values():
            s.clear()

    prop, ver = replicas(target, draft, index, stores, between=clear)
    ref = beam_search(target, prompts, index, 5)
    for b, p in enumerate(prompts):
        models = RemoteModels(prop, ver, session=f"miss-{b}")
        out = run(models, p, index, SearchParams(5, 10, 3, "strict"))
        assert out.items[0] == ref.items[b]
        torch.testing.assert_close(out.scores[0], ref.scores[b], atol=1e-9, rtol=0)
        assert models.hits == {"draft": 0, "target": 0}
    later = sum(s.snapshot()["misses"] for s in stores.values())
    assert later > 0 and all(s.snapshot()["hits"] == 0 for s in stores.values())


def test_relaxed_with_seed_on_replica_caches_equals_offline(small):
    catalog, target, draft, prompts = small
    index = catalog.index
    prop, ver = replicas(target, draft, index, new_stores())
    for seed, p in enumerate(prompts[:3]):
        out = run(RemoteModels(prop, ver, session=f"relaxed-{seed}"), p, index,
                  SearchParams(5, 10, 3, "relaxed", seed))
        off = speculative_beam_search(target, draft, [p], index, 5, draft_beams=10, gamma=3,
                                      mode="relaxed", seed=seed)
        assert out.items == off.items and out.stats == off.stats


def test_session_store_is_bounded_by_count_bytes_and_age(small):
    catalog, _, draft, prompts = small
    now = [0.0]
    store = SessionStore(max_sessions=2, max_bytes=2**30, ttl_s=10.0, clock=lambda: now[0])
    from atspeed_ray.decoding.beam import root_beams

    def fill(key: str) -> None:  # one draft call: stores a cache for the request
        beams = root_beams(1, 3, catalog.index.L, ["target", "draft"], torch.device("cpu"), torch.float64)
        req = DraftRequest(beams, torch.zeros(1, dtype=torch.long), torch.full((1,), 2), prompts[:1],
                           SearchParams(3, 3, 2, "strict"), None, SessionRef(key, 0))
        draft_batch(draft, catalog.index, [req], store=store)

    for key in ("a", "b", "c"):
        fill(key)
    assert list(store.sessions) == ["b", "c"] and store.counts["evicted"] == 1  # least recent out
    one = store.sessions["c"].nbytes
    assert store.nbytes == 2 * one > 0
    store.max_bytes = one  # a byte bound of one cache: the older one goes on the next put
    fill("d")
    assert list(store.sessions) == ["d"] and store.nbytes == one
    now[0] = 11.0  # idle longer than ttl_s
    assert store.take(SessionRef("d", 1)) is None and store.counts["expired"] == 1
    assert len(store) == 0 and store.nbytes == 0
    fill("e")
    assert store.take(SessionRef("e", 2)) is None  # out of step: a miss, and the entry is dropped
    assert store.counts["misses"] == 2 and len(store) == 0


def test_affinity_router_sends_one_key_to_one_home_and_moves_few_keys():
    ids = [f"replica-{i}" for i in range(4)]
    keys = [f"key-{i}" for i in range(400)]
    homes = {k: ids[home_rank(k, ids)[0]] for k in keys}
    assert all(ids[home_rank(k, ids)[0]] == homes[k] for k in keys)  # stable
    spread = {i: sum(h == i for h in homes.values()) for i in ids}
    assert min(spread.values()) > 60, spread  # about 100 each
    fewer = ids[:3]  # replica-3 died: only its keys move
    moved = [k for k in keys if fewer[home_rank(k, fewer)[0]] != homes[k]]
    assert all(homes[k] == "replica-3" for k in moved)

    def replica(rid: str):
        return types.SimpleNamespace(replica_id=types.SimpleNamespace(unique_id=rid))

    def pending(arg, age_s: float = 0.0):
        return types.SimpleNamespace(args=[arg], created_at=time.time() - age_s,
                                     routing_context=types.SimpleNamespace(should_backoff=False))

    router = types.SimpleNamespace(stick_s=1.0)
    cands = [replica(i) for i in ids]
    ref = SessionRef("key-7", 0)
    for payload in (ref, Release("key-7")):
        assert affinity_key(pending(payload)) == "key-7"
        ranks = asyncio.run(AffinityRouter.choose_replicas(router, cands, pending(payload)))
        assert [[r.replica_id.unique_id for r in rank] for rank in ranks] == [[homes["key-7"]]]
        # after stick_s the other replicas follow as a second rank (a home that stays full)
        ranks = asyncio.run(AffinityRouter.choose_replicas(router, cands, pending(payload, 2.0)))
        assert [r.replica_id.unique_id for r in ranks[0]] == [homes["key-7"]] and len(ranks[1]) == 3
    ranks = asyncio.run(AffinityRouter.choose_replicas(router, cands, pending(object())))
    assert len(ranks) == 1 and len(ranks[0]) == 2  # no key: two random replicas


def test_colocated_batch_equals_beam_search_and_offline_relaxed(small):
    catalog, target, draft, prompts = small
    index = catalog.index
    reqs = [SpeculateRequest(p, SearchParams(5, 10, 3, "strict")) for p in prompts]
    reqs += [SpeculateRequest(p, SearchParams(3, 6, 2, "strict")) for p in prompts[:2]]
    relaxed = [(prompts[0], 4), (prompts[1], 5), (prompts[2], 4)]  # stacked in one group
    reqs += [SpeculateRequest(p, SearchParams(5, 10, 3, "relaxed", s)) for p, s in relaxed]
    out = speculate_batch(target, draft, index, reqs)
    ref5, ref3 = beam_search(target, prompts, index, 5), beam_search(target, prompts[:2], index, 3)
    for b in range(len(prompts)):
        assert out[b].items == ref5.items[b]
        torch.testing.assert_close(out[b].scores, ref5.scores[b], atol=1e-9, rtol=0)
    assert [o.items for o in out[len(prompts):-len(relaxed)]] == ref3.items
    for (p, s), o in zip(relaxed, out[-len(relaxed):]):
        off = speculative_beam_search(target, draft, [p], index, 5, draft_beams=10, gamma=3,
                                      mode="relaxed", seed=s)
        assert o.items == off.items[0] and o.stats["rounds"] == off.stats["rounds"][0]


def test_chained_drive_equals_beam_search_and_falls_back_alone(small):
    """graph: chained: the target side drives the loop (draft calls out, verify in process);
    a failing draft gets the target's own beam search, flagged as a fallback."""
    from atspeed_ray.serving.batching import BeamRequest, beam_batch
    from atspeed_ray.serving.chained import drive

    catalog, target, draft, prompts = small
    index = catalog.index
    stores = new_stores()
    prop, ver = replicas(target, draft, index, stores)
    released: list[str] = []

    async def beam(r: BeamRequest):
        return beam_batch(target, index, [r])[0]

    async def broken(_r):
        raise RuntimeError("draft down")

    ref = beam_search(target, prompts, index, 5)
    for b, p in enumerate(prompts[:3]):
        req = SpeculateRequest(p, SearchParams(5, 10, 3, "strict"))
        out = asyncio.run(drive(req, index, prop, ver, beam, released.append, torch.float64, None, True))
        assert out.fallback is None and out.items == ref.items[b]
        torch.testing.assert_close(out.scores, ref.scores[b], atol=1e-9, rtol=0)
        assert out.calls == out.stats["rounds"] - 1 or out.calls == out.stats["rounds"]
        assert out.cache_hits == out.calls - 1 + out.stats["rounds"] - 1  # all but each model's first call
        down = asyncio.run(drive(req, index, broken, ver, beam, released.append, torch.float64, None, True))
        assert down.fallback == "error" and down.items == ref.items[b]
    assert len(released) == 6 and len(set(released)) == 6
