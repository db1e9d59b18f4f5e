"""A feature draft (``drafts/feature.py``) served, without Ray: the draft <-> target payloads carry
the target's hidden states (``Beams.features`` at the accepted beams, the prompts' ``Context``)
without reading them, through the separate graph (stateless and with replica caches, a lost
draft state included), the chained driver and the co-located batch, each giving the offline
answer; and the payloads are plain data (dataclasses of tensors) that Ray carries as it is."""

from __future__ import annotations

import asyncio

import pytest
import torch

from atspeed_ray.decoding import SearchParams, beam_search, speculative_search
from atspeed_ray.drafts import DRAFT_KINDS
from atspeed_ray.drafts.feature import FeatureConfig, FeatureDraft, FeatureDrafter
from atspeed_ray.serving.batching import (
    BeamRequest, DraftReply, DraftRequest, VerifyReply, VerifyRequest, beam_batch, cat_contexts,
    draft_batch, verify_batch,
)
from atspeed_ray.serving.cache import SessionStore
from atspeed_ray.serving.colocated import SpeculateRequest, speculate_batch
from atspeed_ray.serving.driver import RemoteModels, remote_speculative
from tests.helpers import serving_random_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STRICT = SearchParams(5, 10, 3, "strict")
RELAXED = SearchParams(5, 10, 3, "relaxed", 7)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    catalog, target, _, prompts = serving_random_pair(tmp_path_factory.mktemp("serving_feat"),
                                                      n_prompts=4)
    E = target.config.hidden_size
    draft = FeatureDraft.from_target(target, catalog.index, FeatureConfig(hidden=E, layers=1, heads=4))
    torch.manual_seed(5)  # a draft that disagrees with the target now and then: random blocks
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return catalog, target, FeatureDrafter(draft.double()), prompts


class Wire:
    """Async draft / verify callables over one replica each (their stores: ``cache: replica``),
    recording every request and reply; ``lose()`` drops the draft replica's sessions."""

    def __init__(self, target, drafter, index, cached: bool):
        self.target, self.drafter, self.index = target, drafter, index
        self.stores = ({n: SessionStore(8, 2**30, 60.0) for n in ("draft", "target")} if cached
                       else {"draft": None, "target": None})
        self.sent: list[object] = []
        self.replies: list[object] = []
        self.lose_before: set[int] = set()  # draft calls (0-based) that find their state gone

    async def propose(self, r: DraftRequest) -> DraftReply:
        n = sum(isinstance(x, DraftRequest) for x in self.sent)
        if n in self.lose_before and self.stores["draft"] is not None:
            self.stores["draft"].clear()
        self.sent.append(r)
        out = draft_batch(self.drafter, self.index, [r], self.stores["draft"])[0]
        self.replies.append(out)
        return out

    async def verify(self, r: VerifyRequest) -> VerifyReply:
        self.sent.append(r)
        out = verify_batch(self.target, self.index, [r], self.stores["target"])[0]
        self.replies.append(out)
        return out

    def models(self) -> RemoteModels:
        cached = self.stores["draft"] is not None
        return RemoteModels(self.propose, self.verify, session="req-1" if cached else None)


def offline(small, prompt, params):
    catalog, target, drafter, _ = small
    return speculative_search(target, drafter, [prompt], catalog.index, params)


def test_the_feature_kind_says_it_reads_features():
    assert DRAFT_KINDS["feature"].features
    assert not any(DRAFT_KINDS[k].features for k in ("lm", "code-head", "compact-vocab"))


@pytest.mark.parametrize("cached", [False, True], ids=["stateless", "replica"])
@pytest.mark.parametrize("params", [STRICT, RELAXED], ids=["strict", "relaxed"])
def test_separate_graph_with_a_feature_draft_equals_offline(small, cached, params):
    catalog, target, drafter, prompts = small
    index = catalog.index
    ref = beam_search(target, prompts, index, params.k)
    for b, p in enumerate(prompts):
        wire = Wire(target, drafter, index, cached)
        models = wire.models()
        out = asyncio.run(remote_speculative(models, [p], index, params, torch.float64, features=True))
        off = offline(small, p, params)
        assert out.items == off.items and out.stats["rounds"] == off.stats["rounds"]
        torch.testing.assert_close(out.scores, off.scores, atol=1e-9, rtol=0)
        if not params.sample:
            assert out.items[0] == ref.items[b]
        drafts = [r for r in wire.sent if isinstance(r, DraftRequest)]
        verifies = [r for r in wire.sent if isinstance(r, VerifyRequest)]
        # the first round is the target's prefill: no draft call (nor in a round with no code
        # left to draft); the accepted beams' features [1, K, F] go to the draft, not the tree's
        assert len(verifies) == off.stats["rounds"][0] and 1 <= len(drafts) <= len(verifies) - 1
        E = target.config.hidden_size
        assert all(d.beams.features is not None and d.beams.features.shape == (1, params.k, E)
                   for d in drafts)
        assert all(v.beams.features is None for v in verifies)  # the target reads none
        # the prompts' context: asked of the target once; sent to a stateless draft every call,
        # to a draft that keeps it (cache: replica) on its first call only
        assert [v.context for v in verifies] == [True] + [False] * (len(verifies) - 1)
        replies = [r for r in wire.replies if isinstance(r, VerifyReply)]
        assert replies[0].context is not None and all(r.context is None for r in replies[1:])
        assert replies[0].context.features.shape == (1, len(p), E)
        with_context = [d.context is not None for d in drafts]
        assert with_context == ([True] + [False] * (len(drafts) - 1) if cached else [True] * len(drafts))
        if cached:
            assert models.hits["draft"] == len(drafts) - 1
            assert models.hits["target"] == len(verifies) - 1


def test_a_draft_replica_that_lost_the_context_asks_again_and_the_answer_is_the_same(small):
    catalog, target, drafter, prompts = small
    index = catalog.index
    tried = 0
    for p in prompts:
        for params in (SearchParams(3, 3, 1, "strict"), SearchParams(3, 3, 1, "relaxed", 3)):
            wire = Wire(target, drafter, index, cached=True)
            wire.lose_before = {1}  # the second draft call finds nothing: it needs the context again
            models = wire.models()
            out = asyncio.run(remote_speculative(models, [p], index, params, torch.float64,
                                                 features=True))
            off = offline(small, p, params)
            assert out.items == off.items and out.stats["rounds"] == off.stats["rounds"]
            drafts = [r for r in wire.sent if isinstance(r, DraftRequest)]
            if len(drafts) < 3:  # one draft call only (the draft was right): nothing was lost
                continue
            tried += 1
            answers = [r for r in wire.replies if isinstance(r, DraftReply)]
            # call 2 went without the context, was answered "needs context" and went again with it
            assert [d.context is not None for d in drafts[:3]] == [True, False, True]
            assert [a.needs_context for a in answers[:3]] == [False, True, False]
            assert drafts[1].session == drafts[2].session  # the same call, sent again
            assert models.calls["draft"] == len(drafts)
            assert models.hits["draft"] == len(drafts) - 3  # the first, the lost one and its resend
    assert tried >= 2


def test_stacked_draft_calls_of_different_prompt_lengths_equal_one_by_one(small):
    """Stateless draft calls of prompts of different lengths share one batch: their contexts
    are left-padded to the widest (the padding is masked), and each gets its own proposals."""
    catalog, target, drafter, prompts = small
    index = catalog.index
    assert len({len(p) for p in prompts}) > 1
    reqs = []
    for p in prompts:
        wire = Wire(target, drafter, index, cached=False)
        asyncio.run(remote_speculative(wire.models(), [p], index, STRICT, torch.float64, features=True))
        reqs.append(next(r for r in wire.sent if isinstance(r, DraftRequest)))
    alone = [draft_batch(drafter, index, [r])[0] for r in reqs]
    stacked = draft_batch(drafter, index, reqs)
    ctx = cat_contexts([r.context for r in reqs])
    assert ctx is not None and ctx.features.shape[1] == max(len(p) for p in prompts)
    for a, s in zip(alone, stacked):
        assert len(a.steps) == len(s.steps)
        for x, y in zip(a.steps, s.steps):
            assert torch.equal(x.beams.tokens, y.beams.tokens) and torch.equal(x.parent, y.parent)
            torch.testing.assert_close(x.beams.scores, y.beams.scores, atol=1e-9, rtol=0)


def test_chained_and_colocated_with_a_feature_draft_equal_offline(small):
    from atspeed_ray.serving.chained import drive

    catalog, target, drafter, prompts = small
    index = catalog.index

    async def beam(r: BeamRequest):
        return beam_batch(target, index, [r])[0]

    for params in (STRICT, RELAXED):
        offs = [offline(small, p, params) for p in prompts]
        wire = Wire(target, drafter, index, cached=True)
        for p, off in zip(prompts, offs):
            req = SpeculateRequest(p, params, features=True)
            out = asyncio.run(drive(req, index, wire.propose, wire.verify, beam, lambda key: None,
                                    torch.float64, None, True))
            assert out.fallback is None and out.items == off.items[0]
            assert out.stats["rounds"] == off.stats["rounds"][0]
        col = speculate_batch(target, drafter, index, [SpeculateRequest(p, params) for p in prompts])
        for out, off in zip(col, offs):
            assert out.items == off.items[0] and out.stats["rounds"] == off.stats["rounds"][0]


def test_payloads_with_features_survive_rays_serialiser(small):
    """A DeploymentHandle carries a payload as plain data: dataclasses whose leaves are torch
    tensors, numbers, strings and None (no callables, no live objects), so Ray's serialiser
    needs nothing of ours; a deep copy (what the handle makes of it) keeps the features."""
    import copy
    import dataclasses

    def plain(x: object) -> bool:
        if dataclasses.is_dataclass(x):
            return all(plain(getattr(x, f.name)) for f in dataclasses.fields(x))
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        if isinstance(x, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in x.items())
        return x is None or isinstance(x, (torch.Tensor, int, float, str, bool))

    catalog, target, drafter, prompts = small
    index = catalog.index
    wire = Wire(target, drafter, index, cached=False)
    asyncio.run(remote_speculative(wire.models(), [prompts[0]], index, STRICT, torch.float64,
                                   features=True))
    draft_req = next(r for r in wire.sent if isinstance(r, DraftRequest))
    verify_reply = next(r for r in wire.replies if isinstance(r, VerifyReply))
    assert plain(draft_req) and plain(verify_reply)
    back = copy.deepcopy(draft_req)
    assert torch.equal(back.beams.features, draft_req.beams.features)
    assert torch.equal(back.context.features, draft_req.context.features)
    assert torch.equal(back.context.valid, draft_req.context.valid)
    back = copy.deepcopy(verify_reply)
    assert torch.equal(back.root_features, verify_reply.root_features)
    assert all(torch.equal(a, b) for a, b in zip(back.step_features, verify_reply.step_features))
    assert torch.equal(back.context.features, verify_reply.context.features)
