"""The parts of the ingress, each without Ray: the fallback policy (``serving/fallback.py``) and
the graph runner (``serving/graphs.py``: separate, one-call, target alone, and ``Runner``, which
picks among them by route and draft breaker). The model calls are plain async functions over the
batched replica work; the breaker runs on a fake clock."""

from __future__ import annotations

import asyncio

import pytest
import torch

from atspeed_ray.decoding import SearchParams, beam_search, speculative_beam_search
from atspeed_ray.serving.batching import BeamRequest, beam_batch, draft_batch, verify_batch
from atspeed_ray.serving.cache import SessionStore
from atspeed_ray.serving.colocated import SpeculateReply, speculate_batch
from atspeed_ray.serving.config import RetryConfig
from atspeed_ray.serving.fallback import DETAIL_CHARS, FallbackPolicy
from atspeed_ray.serving.graphs import OneCallGraph, Runner, SeparateGraph, TargetAlone, answer
from atspeed_ray.serving.retry import DraftBreaker
from tests.helpers import serving_random_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PARAMS = SearchParams(5, 10, 3, "strict")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return serving_random_pair(tmp_path_factory.mktemp("serving_parts"), n_prompts=3)


class Metric:
    """A counter that records its tags (``fallback.CounterLike``)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.seen.append(dict(tags or {}))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def policy(clock: Clock | None = None) -> tuple[FallbackPolicy, dict[str, float], Metric]:
    counts: dict[str, float] = {"routed_target_only": 0}
    metric = Metric()
    return FallbackPolicy(DraftBreaker(RetryConfig(), clock or Clock()), counts, metric), counts, metric


def parts(small, cached: bool = False, propose=None, verify=None):
    """A ``Runner`` over the separate graph on the small pair, its fallback policy, the ingress
    counts, the metric and the releases it asked for."""
    catalog, target, draft, _ = small
    index = catalog.index
    stores = {n: SessionStore(8, 2**30, 60.0) for n in ("draft", "target")}
    released: list[tuple[str, str]] = []

    async def prop(r):
        return draft_batch(draft, index, [r], stores["draft"])[0]

    async def ver(r, stats):
        return verify_batch(target, index, [r], stores["target"])[0]

    async def beam(r, stats):
        return beam_batch(target, index, [r])[0]

    fallback, counts, metric = policy()
    graph = SeparateGraph(propose or prop, verify or ver, lambda m, k: released.append((m, k)),
                          index, torch.float64, 2.0, cached, fallback)
    return Runner(graph, TargetAlone(beam, index.L), fallback, counts), fallback, counts, metric, released


def test_fallback_policy_counts_notes_and_drives_the_breaker():
    clock = Clock()
    fallback, counts, metric = policy(clock)
    stats: dict = {}
    fallback.note("error", "x" * 500, stats)
    assert counts["fallbacks"] == 1 and counts["fallback_error"] == 1
    assert metric.seen == [{"reason": "error"}]
    assert stats["path"] == "fallback" and stats["fallback_reason"] == "error"
    assert len(stats["fallback_detail"]) == DETAIL_CHARS
    ticket = fallback.ticket()
    assert ticket is not None
    fallback.draft_failed(ticket)
    assert fallback.ticket() is None and fallback.snapshot()["open"]  # the cooldown
    clock.now += RetryConfig().draft_cooldown_s + 0.01
    assert fallback.ticket() is not None  # one request tries the draft again
    fallback.draft_ok()
    assert not fallback.snapshot()["open"]


def test_answer_drops_missing_items():
    a = answer([4, -1, 7], [-0.5, float("-inf"), -1.0], {"x": 1})
    assert (a.items, a.scores, a.stats) == ([4, 7], [-0.5, -1.0], {"x": 1})


@pytest.mark.parametrize("cached", [False, True])
def test_separate_graph_gives_the_strict_answer_and_its_costs(small, cached):
    catalog, target, draft, prompts = small
    runner, _, counts, metric, released = parts(small, cached)
    ref = beam_search(target, prompts, catalog.index, 5)
    for b, p in enumerate(prompts):
        spec = speculative_beam_search(target, draft, [p], catalog.index, 5, draft_beams=10, gamma=3)
        out = asyncio.run(runner.decode(p, PARAMS))
        st = out.stats
        assert out.items == [i for i in ref.items[b] if i >= 0]
        torch.testing.assert_close(torch.tensor(out.scores, dtype=torch.float64),
                                   ref.scores[b][:len(out.items)], atol=1e-9, rtol=0)
        assert st["path"] == "speculative" and st["rounds"] == spec.stats["rounds"][0]
        assert st["rounds"] + 1 <= st["handle_calls"] <= 2 * st["rounds"]
        assert st["prompt_tokens"] == len(p) and st["draft_width"] == 10
        assert st["cache_hits"] == (st["handle_calls"] - 2 if cached else 0)
    assert metric.seen == [] and counts.get("fallbacks", 0) == 0
    assert sorted({m for m, _ in released}) == (["draft", "target"] if cached else [])
    assert len(released) == (2 * len(prompts) if cached else 0)


def test_a_failed_draft_falls_back_opens_the_breaker_and_a_failed_target_does_not(small):
    catalog, target, _, prompts = small
    want = [i for i in beam_search(target, prompts[:1], catalog.index, 5).items[0] if i >= 0]

    async def broken(_r):
        raise RuntimeError("draft down")

    runner, fallback, counts, metric, _ = parts(small, propose=broken)
    out = asyncio.run(runner.decode(prompts[0], PARAMS))
    assert out.items == want and out.stats["fallback_reason"] == "error"
    assert out.stats["handle_calls"] == 2  # the failed draft call, then the beam search
    out = asyncio.run(runner.decode(prompts[0], PARAMS))  # the breaker is open: no draft call
    assert out.items == want and out.stats["fallback_reason"] == "draft_down"
    assert out.stats["handle_calls"] == 1
    assert counts["fallback_error"] == 1 and counts["fallback_draft_down"] == 1
    assert [t["reason"] for t in metric.seen] == ["error", "draft_down"]

    async def target_down(_r, _stats):
        raise RuntimeError("target down")

    runner, fallback, counts, _, _ = parts(small, verify=target_down)
    out = asyncio.run(runner.decode(prompts[0], PARAMS))
    assert out.items == want and out.stats["fallback_reason"] == "target_error"
    assert not fallback.snapshot()["open"]


def test_routed_requests_and_the_target_only_app_take_the_target_alone(small):
    catalog, target, _, prompts = small
    want = [i for i in beam_search(target, prompts[:1], catalog.index, 5).items[0] if i >= 0]
    runner, _, counts, _, _ = parts(small)
    out = asyncio.run(runner.decode(prompts[0], PARAMS, "target_only"))
    assert out.items == want and out.stats["path"] == "target_only" and out.stats["routed"]
    assert out.stats["target_forwards"] == catalog.index.L and out.stats["handle_calls"] == 1
    assert counts["routed_target_only"] == 1
    alone = Runner(None, runner.alone, runner.fallback, counts)
    out = asyncio.run(alone.decode(prompts[0], PARAMS))
    assert out.items == want and out.stats["path"] == "target_only" and "routed" not in out.stats
    assert counts["routed_target_only"] == 1


def test_one_call_graph_answers_falls_back_and_survives_a_failed_call(small):
    catalog, target, draft, prompts = small
    index = catalog.index
    want = [i for i in beam_search(target, prompts[:1], index, 5).items[0] if i >= 0]
    fallback, counts, _ = policy()

    async def colocated(r):
        return speculate_batch(target, draft, index, [r])[0]

    async def beam(r, stats):
        return beam_batch(target, index, [r])[0]

    graph = OneCallGraph(colocated, 30.0, index.L, fallback)
    runner = Runner(graph, TargetAlone(beam, index.L), fallback, counts)
    out = asyncio.run(runner.decode(prompts[0], PARAMS))
    assert out.items == want and out.stats["path"] == "speculative" and out.stats["handle_calls"] == 1

    async def lost_draft(r):  # a chained target that answered alone after 2 draft calls
        b = beam_batch(target, index, [BeamRequest([r.prompt], r.params.k)])[0]
        return SpeculateReply(b.items[0], b.scores[0], {}, 1.0, fallback="deadline", detail="late",
                              calls=2)

    out = asyncio.run(Runner(OneCallGraph(lost_draft, 30.0, index.L, fallback), runner.alone,
                             fallback, counts).decode(prompts[0], PARAMS))
    assert out.items == want and out.stats["fallback_reason"] == "deadline"
    assert out.stats["handle_calls"] == 3

    async def dead(r):
        raise RuntimeError("replica died")

    out = asyncio.run(Runner(OneCallGraph(dead, 30.0, index.L, fallback), runner.alone,
                             fallback, counts).decode(prompts[0], PARAMS))
    assert out.items == want and out.stats["fallback_reason"] == "target_error"
    assert out.stats["handle_calls"] == 2


def test_deployments_use_only_names_defined_above_them():
    """Serve serialises a deployment class when it is decorated: a module-level function or
    class of ``deployments.py`` that one uses must be defined above it (else the replica fails
    with a NameError when it starts)."""
    import ast
    from pathlib import Path

    import atspeed_ray.serving.deployments as dep

    tree = ast.parse(Path(dep.__file__).read_text())
    defined = {n.name: n.lineno for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef,
                                                                        ast.AsyncFunctionDef))}
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.decorator_list]
    assert {c.name for c in classes} >= {"DraftModel", "TargetModel", "SpeculativeModel", "Recommender"}
    for cls in classes:
        used = {n.id for n in ast.walk(cls) if isinstance(n, ast.Name)}
        late = sorted(u for u in used if u in defined and defined[u] > cls.lineno)
        assert not late, f"{cls.name} uses {late}, defined below it"


def test_a_slow_probe_replaces_the_other_arms_stale_mean():
    """The routing policy after a load change: the target alone goes from 50 to 300 ms, past
    the speculative mean measured at the lighter load (100 ms), which triggers a probe at once.
    Speculation now takes 900 ms: that one answer replaces the stale mean, so the probes go back
    to their backed-off interval (clipped, the mean crept up by 20% a probe, and every target
    answer above it sent the next probe at once: 7 probes here, 4 now)."""
    from atspeed_ray.serving.routing import Router

    r = Router(probe_every=10)
    for _ in range(6):
        arm = r.choose("strict", 10)
        r.observe("strict", 10, arm, 100.0 if arm == "speculative" else 50.0)
    assert r.best("strict", 10) == "target_only"
    probes = 0
    for _ in range(200):
        arm = r.choose("strict", 10)
        probes += arm == "speculative"
        r.observe("strict", 10, arm, 900.0 if arm == "speculative" else 300.0)
    assert r.best("strict", 10) == "target_only"
    assert probes <= 4, probes
