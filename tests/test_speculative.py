"""Speculative beam search: strict mode must equal the target's own beam search (the spec)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import subprocess
import sys

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from atspeed_ray.decoding import beam_search, speculative_beam_search
from atspeed_ray.decoding.speculative import speculative_search
from atspeed_ray.decoding.beam import root_beams
from atspeed_ray.decoding.drafting import draft_phase
from atspeed_ray.decoding.fast_llama import FastLlama, fast_forward
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.decoding.verification import verify_phase
from atspeed_ray.decoding.tree import Nodes, tree_forward
from tests.helpers import (
    STRICT_GRID, WIDE_CHILDREN, assert_same_as_beam_search, plackett_luce, random_catalog,
    random_model, item_set_frequencies, random_prompts, set_tvd, strict_runs, vocab_size,
)

CODEBOOK = [24, 24, 24, 24]


@pytest.fixture(scope="module")
def setup():
    index = random_catalog(2500, CODEBOOK, seed=0)
    V = vocab_size(CODEBOOK)
    target = random_model(V, seed=1)
    unrelated = random_model(V, seed=7, hidden=16, layers=1)
    prompts = random_prompts(3, V, seed=2)
    return index, V, target, unrelated, prompts


@pytest.fixture(scope="module")
def fast_models(setup):
    """The setup's target and unrelated draft on ``FastLlama`` (static preallocated caches)."""
    _, _, target, unrelated, _ = setup
    return fast_forward(target), fast_forward(unrelated)


@pytest.mark.parametrize("forward", ["hf", "fast"])
@pytest.mark.parametrize("k,n_mult,gamma", STRICT_GRID)
def test_strict_equals_beam_search(setup, fast_models, k, n_mult, gamma, forward):
    """On the HF forward (DynamicCache, the plain reference) and on FastLlama (static
    preallocated KV caches written and compacted in place); without and with children steps
    (``expand_last``: a round's last drafted steps hold every trie child of the step before,
    with no draft forward for them), capped at 16 per request (where the trie is narrow;
    elsewhere the top N) and at ``WIDE_CHILDREN`` (every step past the first that fits: the last
    always)."""
    index, V, target, unrelated, prompts = setup
    if forward == "fast":
        target, unrelated = fast_models
    for batch in (prompts[:1], prompts):
        ref = beam_search(target, batch, index, k)
        for draft in (unrelated, target):
            runs = dict(strict_runs(target, draft, batch, index, k, k * n_mult, gamma))
            plain = runs[0]  # no children steps
            for cap, out in runs.items():
                assert_same_as_beam_search(out, ref)
                if cap == WIDE_CHILDREN:  # one draft forward fewer per round
                    per_round = [d / r for d, r in zip(out.stats["draft_calls"], out.stats["rounds"])]
                    assert all(x <= gamma - 1 + 1e-9 for x in per_round), per_round
                    if draft is target:  # every round accepts all, as without children steps
                        assert out.stats["rounds"] == plain.stats["rounds"]
            for key in ("target_calls", "draft_calls", "rounds", "accepted_steps"):
                assert len(out.stats[key]) == len(batch)


@pytest.mark.parametrize("mode", ["strict", "relaxed"])
def test_fewer_live_extensions_than_k_keep_dead_beams_dead(mode):
    """A narrow trie top (2 first codes, 6 two-code prefixes): at K = 10 the target's top-K
    holds dead (-inf) beams for two steps. No drafted beam may take a dead slot (that once
    duplicated beams and dropped the true top-K)."""
    codebook = [2, 3, 24, 24]
    index = random_catalog(200, codebook, seed=4)
    V = vocab_size(codebook)
    target = random_model(V, seed=11)
    unrelated = random_model(V, seed=12, hidden=16, layers=1)
    prompts = random_prompts(3, V, seed=13)
    for k, n in [(5, 5), (10, 10), (10, 20), (20, 40)]:
        ref = beam_search(target, prompts, index, k)
        for draft in (unrelated, target):
            for gamma in (1, 3):
                out = speculative_beam_search(target, draft, prompts, index, k, draft_beams=n,
                                              gamma=gamma, mode=mode, seed=0)
                if mode == "strict":
                    assert_same_as_beam_search(out, ref)
                for items in out.items:
                    live = [i for i in items if i >= 0]
                    assert len(live) == len(set(live)) and set(live) <= set(index.item_ids.tolist())


def test_draft_equal_to_target_accepts_every_step(setup):
    index, V, target, _, prompts = setup
    for k, n in [(1, 1), (5, 5), (5, 10), (10, 20)]:
        out = speculative_beam_search(target, target, prompts, index, k, draft_beams=n, gamma=3)
        # L = gamma + 1: drafted 3 steps all accepted, the bonus step gives the 4th
        assert out.stats["target_calls"] == [1] * len(prompts)
        assert out.stats["accepted_steps"] == [3] * len(prompts)
        # code positions 1-3 drafted and accepted once each; position 4 is the bonus step
        assert out.stats["drafted_at_position"] == [[1, 1, 1, 0]] * len(prompts)
        assert out.stats["accepted_at_position"] == [[1, 1, 1, 0]] * len(prompts)


def test_unrelated_draft_accepts_little_and_output_is_unchanged(setup):
    index, V, target, unrelated, prompts = setup
    out = speculative_beam_search(target, unrelated, prompts, index, 10, draft_beams=20, gamma=3)
    assert_same_as_beam_search(out, beam_search(target, prompts, index, 10))
    rounds, accepted = sum(out.stats["rounds"]), sum(out.stats["accepted_steps"])
    assert accepted / rounds < 0.5
    assert min(out.stats["target_calls"]) >= 3
    # per request: the accepted positions sum to the accepted steps, each round verifies
    # drafted steps up to its first rejection (one rejection per round that drafted and stopped
    # early), and a position is drafted at most once per round
    for b in range(len(prompts)):
        drafted = out.stats["drafted_at_position"][b]
        acc_at = out.stats["accepted_at_position"][b]
        assert sum(acc_at) == out.stats["accepted_steps"][b]
        assert all(0 <= a <= n <= out.stats["rounds"][b] for a, n in zip(acc_at, drafted))
        assert drafted[-1] == 0  # the last position is never drafted (L - 1 - t steps at most)
        rejections = sum(drafted) - sum(acc_at)
        assert rejections <= out.stats["rounds"][b] and rejections >= 1


def test_stateless_rounds_give_the_same_result(setup):
    index, V, target, unrelated, prompts = setup
    ref = beam_search(target, prompts, index, 5)
    out = speculative_beam_search(target, unrelated, prompts, index, 5, draft_beams=10, gamma=2,
                                  keep_cache=False)
    assert_same_as_beam_search(out, ref)


def plain_last_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1]


def random_tree(T: int, g: torch.Generator) -> list[int]:
    return [int(torch.randint(-1, i, (1,), generator=g)) if i else -1 for i in range(T)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tree_attention_equals_plain_forward_over_each_path(arch):
    torch.manual_seed(0)
    V = 60
    if arch == "llama":
        model = random_model(V, seed=3)
    else:
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             intermediate_size=64)).double().eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in (5, 9)]
    B, T1, T2 = 2, 7, 5
    # chunk 1: prompt block + a random tree hanging below the prompt
    par1 = torch.tensor([random_tree(T1, g) for _ in range(B)])
    tok1 = torch.randint(1, V, (B, T1), generator=g)
    paths1 = [[[] for _ in range(T1)] for _ in range(B)]
    for b, i in itertools.product(range(B), range(T1)):
        p = int(par1[b, i])
        paths1[b][i] = (paths1[b][p] if p >= 0 else []) + [i]
    depth1 = torch.tensor([[len(paths1[b][i]) - 1 for i in range(T1)] for b in range(B)])
    nodes1 = Nodes(tok1, depth1, par1, torch.full((B, T1, 4), -1), torch.ones(B, T1, dtype=torch.bool))
    from atspeed_ray.decoding.tree import left_pad
    with torch.no_grad():
        logits1, cache, slots1 = tree_forward(model, None, nodes1, prompt=left_pad(prompts, 0, torch.device("cpu")))
    P = logits1.shape[1] - T1
    for b, i in itertools.product(range(B), range(T1)):
        path = prompts[b] + [int(tok1[b, j]) for j in paths1[b][i]]
        torch.testing.assert_close(logits1[b, P + i], plain_last_logits(model, path))
    # chunk 2: new nodes below cached chunk-1 nodes (and below each other)
    anchor = torch.randint(0, T1, (B, T2), generator=g)
    par2 = torch.tensor([random_tree(T2, g) for _ in range(B)])
    tok2 = torch.randint(1, V, (B, T2), generator=g)
    cached2 = torch.full((B, T2, 4), -1)
    depth2 = torch.zeros(B, T2, dtype=torch.long)
    paths2 = [[None] * T2 for _ in range(B)]
    for b, i in itertools.product(range(B), range(T2)):
        p = int(par2[b, i])
        if p >= 0:  # the parent is in this chunk: inherit its anchor
            anchor[b, i] = anchor[b, p]
            paths2[b][i] = paths2[b][p] + [int(tok2[b, i])]
        else:
            paths2[b][i] = [int(tok2[b, i])]
        chain = paths1[b][int(anchor[b, i])]
        cached2[b, i, : len(chain)] = slots1[b, chain]
        depth2[b, i] = len(chain) + len(paths2[b][i]) - 1
    nodes2 = Nodes(tok2, depth2, par2, cached2, torch.ones(B, T2, dtype=torch.bool))
    with torch.no_grad():
        logits2, cache, _ = tree_forward(model, cache, nodes2)
    for b, i in itertools.product(range(B), range(T2)):
        chain = [int(tok1[b, j]) for j in paths1[b][int(anchor[b, i])]]
        torch.testing.assert_close(logits2[b, i], plain_last_logits(model, prompts[b] + chain + paths2[b][i]))


def test_verification_pass_logits_at_every_drafted_node(setup):
    """The target's one verification forward gives, at every drafted node, the logits of a plain
    forward over that node's path (first round: prompt + drafted tree)."""
    index, V, target, unrelated, prompts = setup
    K, N, G = 3, 6, 3
    B, L = len(prompts), index.L
    beams = root_beams(B, K, L, ["target", "draft"], torch.device("cpu"), torch.float64)
    t = torch.zeros(B, dtype=torch.long)
    g = torch.full((B,), G)
    with torch.no_grad():
        steps, beams, _ = draft_phase(unrelated, None, beams, t, g, prompts, index,
                                      SearchParams(K, N, G))
        verified, _ = verify_phase(target, None, beams, t, steps, prompts, index)
    root_logp, step_logp, steps = verified.root_logp, verified.step_logp, verified.steps
    # replies are in column space: the log-probs of the code tokens of the next depth
    for b in range(B):
        plain = torch.log_softmax(plain_last_logits(target, prompts[b]), -1)
        torch.testing.assert_close(root_logp[b, 0], plain[index.column_tokens(0)])
    for j, (s, lp) in enumerate(zip(steps, step_logp), start=1):
        cols = index.column_tokens(min(j, L - 1))
        for b, n in itertools.product(range(B), range(N)):
            path = prompts[b] + s.beams.tokens[b, n, :j].tolist()
            plain = torch.log_softmax(plain_last_logits(target, path), -1)
            torch.testing.assert_close(lp[b, n], plain[cols])


def test_relaxed_items_exist_and_draft_equal_to_target_accepts_all(setup):
    index, V, target, unrelated, prompts = setup
    out = speculative_beam_search(target, unrelated, prompts, index, 10, draft_beams=20,
                                  mode="relaxed", seed=0)
    for items in out.items:
        assert len(set(items)) == 10 and bool(index.contains(items).all())
    assert bool((out.scores[:, :-1] >= out.scores[:, 1:]).all())
    same = speculative_beam_search(target, target, prompts, index, 5, draft_beams=5, gamma=3,
                                   mode="relaxed", seed=1)
    assert same.stats["accepted_steps"] == [3] * len(prompts)
    assert same.stats["target_calls"] == [1] * len(prompts)


def tvd(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def test_relaxed_sampling_follows_the_target_distribution():
    """K = 1: relaxed SD is speculative sampling, so the first code of the returned item is
    distributed as the target's (trie-renormalised) first-code distribution, even with a
    deliberately bad draft. Bound: total variation distance < 0.05 over 4000 samples (expected
    sampling noise ~0.02), while the draft's own distribution is > 0.25 away."""
    codebook = [8, 6, 6, 6]
    index = random_catalog(400, codebook, seed=5)
    V = vocab_size(codebook)
    target = random_model(V, seed=11, scale=2.0)
    bad = random_model(V, seed=12, scale=6.0)
    prompt = random_prompts(1, V, seed=13)[0]
    first = index.level_tokens[0, : codebook[0]]  # first-level code tokens
    allowed = index.allowed_mask(torch.zeros(1, dtype=torch.long), 0, V)[0][first]
    with torch.no_grad():
        p = torch.softmax(plain_last_logits(target, prompt)[first].masked_fill(~allowed, -torch.inf), -1)
        q = torch.softmax(plain_last_logits(bad, prompt)[first].masked_fill(~allowed, -torch.inf), -1)
    assert tvd(p, q) > 0.25, "the draft must be deliberately bad for this test to mean anything"
    n = 4000
    out = speculative_beam_search(target, bad, [prompt] * n, index, 1, draft_beams=1, gamma=3,
                                  mode="relaxed", seed=0)
    col = index.columns_of(out.sequences[:, 0, 0], 0)
    emp = torch.bincount(col, minlength=len(first)).double() / n
    assert tvd(emp, p.double()) < 0.05
    assert tvd(emp, q.double()) > 0.2


def test_decoding_core_imports_no_ray():
    code = "import sys, atspeed_ray.decoding, atspeed_ray.data; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# per code position widths (``SearchParams.draft_beams`` as a tuple, ``--draft-beams 2k/8k/2k``):
# (k, widths, gamma), the widest level first, in the middle, last, and a narrow-then-wide mix
LEVEL_GRID = [(1, (1, 4, 2), 2), (3, (3, 9, 3), 3), (5, (10, 5), 2), (5, (5, 5, 15), 1),
              (10, (20, 10, 30, 10), 3)]


@pytest.mark.parametrize("forward", ["hf", "fast"])
@pytest.mark.parametrize("k,widths,gamma", LEVEL_GRID)
def test_strict_equals_beam_search_with_a_width_per_level(setup, fast_models, k, widths, gamma,
                                                          forward):
    """The draft keeps N_l beams at code position l (``drafting.level_widths``): a round whose
    requests draft different positions is as wide as the widest and each request's extra
    columns are dead. Strict output is still exactly the target's beam search, alone and in a
    batch (whose rows draft different positions), with and without children steps."""
    index, V, target, unrelated, prompts = setup
    if forward == "fast":
        target, unrelated = fast_models
    for batch in (prompts[:1], prompts):
        ref = beam_search(target, batch, index, k)
        for draft in (unrelated, target):
            for cap, out in strict_runs(target, draft, batch, index, k, widths, gamma):
                assert_same_as_beam_search(out, ref)


def test_a_step_is_as_wide_as_its_widest_drafting_request():
    from atspeed_ray.decoding.beam import Step
    from atspeed_ray.decoding.drafting import level_widths, narrow

    params = SearchParams(2, (2, 8, 4))
    depth, drafting = torch.tensor([0, 1, 3]), torch.tensor([True, False, True])
    width, own = level_widths(params, depth, drafting)
    assert width == 4 and own is not None and own.tolist() == [2, 8, 4]  # row 1 drafts nothing
    assert level_widths(SearchParams(2, 6), depth, drafting) == (6, None)
    step = Step(*(torch.zeros(3, 4, dtype=torch.long) for _ in range(2)), torch.zeros(3, 4),
                torch.ones(3, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long))
    kept = torch.isfinite(narrow(step, own).score)
    assert kept.sum(1).tolist() == [2, 4, 4] and not kept[0, 2:].any()


def test_relaxed_with_a_width_per_level_is_the_same_alone_and_in_a_batch(setup):
    """A request's first N_l draws are its own whatever width its batch drafts at."""
    index, V, target, unrelated, prompts = setup
    params = SearchParams(3, (3, 9, 6), 2, "relaxed", 5)
    others = random_prompts(3, V, seed=33)
    for p in prompts[:2]:
        alone = speculative_search(target, unrelated, [p], index, params)
        batched = speculative_search(target, unrelated, [p] + others, index, params)
        assert batched.items[0] == alone.items[0]


def test_search_params_are_checked_once_naming_the_bad_value():
    assert SearchParams(5).N == 5 and SearchParams(5, 10).N == 10
    assert SearchParams(3, mode="relaxed").sample and not SearchParams(3).sample
    for kwargs, word in (({"k": 0}, "k"), ({"k": 5, "draft_beams": 4}, "draft_beams"),
                         ({"k": 1, "gamma": -1}, "gamma"), ({"k": 1, "mode": "fast"}, "mode"),
                         ({"k": 1, "seed": -1}, "seed"), ({"k": 1, "seed": 2**63}, "seed")):
        with pytest.raises(ValueError, match=word):
            SearchParams(**kwargs)
    with pytest.raises(AttributeError):
        SearchParams(5).k = 6  # frozen: one search, one set of parameters


def test_search_params_are_plain_fields_that_round_trip_through_json():
    """No torch object inside: the spec travels as JSON and comes back equal."""
    for p in (SearchParams(5), SearchParams(5, 10, 2, "relaxed", seed=2**62 + 3),
              SearchParams(3, 6, 0, "strict", expand_last=8)):
        fields = dataclasses.asdict(p)
        assert all(isinstance(v, (int, str, type(None))) for v in fields.values())
        assert SearchParams(**json.loads(json.dumps(fields))) == p
    levels = SearchParams(3, (3, 9, 6, 6), 2)  # per code position; a repeated last one is dropped
    assert levels.draft_beams == (3, 9, 6) and levels.N == 9 and levels.widths == (3, 9, 6)
    assert SearchParams(**json.loads(json.dumps(dataclasses.asdict(levels)))) == levels
    assert SearchParams(3, (6, 6)).draft_beams == 6
    with pytest.raises(ValueError, match="draft_beams"):
        SearchParams(3, (3, 2))


def test_seeded_uniforms_are_splitmix64_and_depend_on_their_row_only():
    """The int64 tensor arithmetic wraps like splitmix64 on unsigned ints (checked against
    Python integers), and a row's uniforms are the same alone and in a batch."""
    from atspeed_ray.decoding import noise

    M = 2**64

    def mix(z: int) -> int:
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % M
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB % M
        return z ^ (z >> 31)

    xs = [0, 1, 2**63 + 5, 12345678901234567, M - 1]
    got = noise._mix(torch.tensor([noise._i64(x) for x in xs])).tolist()
    assert [g % M for g in got] == [mix(x) for x in xs]
    keys = noise.round_streams(noise.row_streams(7, 300), 2, "accept")
    assert keys is not None
    u = noise.uniform(keys, 5, (300, 64), torch.device("cpu"), torch.float64)
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    alone = noise.uniform(keys[4:5], 5, (1, 64), torch.device("cpu"), torch.float64)
    assert torch.equal(alone[0], u[4])
    other = noise.uniform(noise.round_streams(noise.row_streams(7, 300), 2, "draft"), 5,
                          (300, 64), torch.device("cpu"), torch.float64)
    assert not torch.equal(u, other)  # each phase its own numbers


def test_relaxed_seed_gives_the_same_answer_alone_and_in_any_batch(setup):
    """A seeded relaxed request draws its numbers from its seed, its row and the round only:
    alone (row 0) it gets the answer it gets as row 0 of a batch of other requests (which
    draft and finish differently); stacked with rows of other seeds (``streams``, as the
    co-located replica stacks requests) each row gets its own alone answer. The same seed
    twice gives the same answer; different seeds give different samples."""
    from atspeed_ray.decoding.noise import row_streams

    index, V, target, unrelated, prompts = setup
    others = random_prompts(4, V, seed=31)

    def run(ps: list[list[int]], seed: int | None, streams: torch.Tensor | None = None):
        return speculative_search(target, unrelated, ps, index,
                                  SearchParams(5, 10, 3, "relaxed", seed), streams=streams)

    for p in prompts:
        alone = run([p], 7)
        batched = run([p] + others, 7)
        assert batched.items[0] == alone.items[0]
        assert {n: v[0] for n, v in batched.stats.items()} == {n: v[0] for n, v in alone.stats.items()}
        assert run([p], 7).items == alone.items  # reproducible
    seeds = [3, 11, 3]
    mixed = run(prompts, None, torch.cat([row_streams(s, 1) for s in seeds]))  # type: ignore[misc]
    for b, (p, s) in enumerate(zip(prompts, seeds)):
        assert mixed.items[b] == run([p], s).items[0]
    samples = {tuple(run(prompts[:1], s).items[0]) for s in range(8)}
    assert len(samples) > 1, "different seeds must give different samples"
    rows = run([prompts[0]] * 8, 5).items  # rows of one search draw from different streams
    assert len({tuple(r) for r in rows}) > 1


@pytest.mark.parametrize("N", [2, 3])
def test_relaxed_k2_follows_the_targets_sampled_first_step(N):
    """K = 2 on a trie of 4 items (4 first codes, one second code each), gamma = 1: the round
    drafts the first code and takes two of them by recursive rejection sampling; the bonus step
    then keeps both children, so the returned item set is the set of first codes kept, which must
    be two draws without replacement from the target's p, whatever the draft. The empirical
    distribution of the item sets over 4000 seeded runs must match it (TVD < 0.05; sampling
    noise ~0.015 over the 6 possible sets) and be far (> 0.1) from the draft's own (tests/
    test_relaxed.py checks several levels and rounds)."""
    codebook = [4, 1]
    index = random_catalog(4, codebook, seed=0)
    V = vocab_size(codebook)
    target = random_model(V, seed=21, scale=1.5)
    bad = random_model(V, seed=22, scale=3.0)
    prompt = random_prompts(1, V, seed=23)[0]
    K = 2
    first = index.level_tokens[0, :4].tolist()
    with torch.no_grad():
        p, q = (dict(zip(first, torch.softmax(plain_last_logits(m, prompt)[first], -1).tolist()))
                for m in (target, bad))
    item = {a: int(index.items_of(torch.tensor([[a, int(index.level_tokens[1, 0])]]))[0])
            for a in first}

    def as_items(seqs: dict[tuple[int, ...], float]) -> dict[frozenset, float]:
        out: dict[frozenset, float] = {}
        for s, prob in seqs.items():
            key = frozenset(item[a] for a in s)
            out[key] = out.get(key, 0.0) + prob
        return out

    exact = as_items(plackett_luce(p, K))
    wrong = as_items(plackett_luce(q, K))
    n = 4000
    out = speculative_beam_search(target, bad, [prompt] * n, index, K, draft_beams=N, gamma=1,
                                  mode="relaxed", seed=0)
    emp = item_set_frequencies(out.items)
    assert set_tvd(exact, wrong) > 0.15, "the draft must differ for this test to mean anything"
    assert set_tvd(emp, exact) < 0.05
    assert set_tvd(emp, wrong) > 0.1


def test_static_caches_are_not_reallocated_during_a_search(setup, fast_models):
    """On FastLlama both tree caches are allocated once per request batch (K = 10, N = 20,
    gamma = 3: every round fits the first allocation) and the result is still exact."""
    from atspeed_ray.decoding.beam import score_dtype
    from atspeed_ray.decoding.speculative import LocalModels, run_loop, speculative_loop

    index, V, _, _, prompts = setup
    target, draft = fast_models
    models = LocalModels(target, draft, index)
    loop = speculative_loop(prompts, index, SearchParams(10, 20, 3), dtype=score_dtype(target))
    out = run_loop(loop, models)
    assert_same_as_beam_search(out, beam_search(target, prompts, index, 10))
    assert models.tcache is not None and models.dcache is not None
    assert models.tcache.kv.grows == 0 and models.dcache.kv.grows == 0
    assert max(out.stats["rounds"]) > 1, "more than one round must have run"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_strict_equals_beam_search_on_the_compiled_step(setup):
    """``FastLlama.compile_step`` (torch.compile of the per-layer blocks, dynamic shapes): strict
    speculative search still returns the target's beam search, over K, N, gamma and batch, with
    an unrelated draft and with a code-head draft. Slow: inductor's first compile on CPU (on the
    shared 2-core machine it had not finished within 1500 s)."""
    index, V, target, unrelated, prompts = setup
    models = [FastLlama(m) for m in (target, unrelated)]
    code_ids = (index.token_column >= 0).nonzero()[:, 1].unique()
    models.append(FastLlama(unrelated, head_ids=code_ids))
    for m in models:
        m.compile_step()
    f_target, f_unrelated, f_head = models
    for k, n, gamma in ((1, 2, 3), (5, 10, 2), (10, 20, 3)):
        for batch in (prompts[:1], prompts):
            ref = beam_search(target, batch, index, k)
            assert_same_as_beam_search(beam_search(f_target, batch, index, k), ref)
            for draft in (f_unrelated, f_head):
                out = speculative_beam_search(f_target, draft, batch, index, k, draft_beams=n,
                                              gamma=gamma, mode="strict")
                assert_same_as_beam_search(out, ref)


@pytest.mark.parametrize("k,n,gamma", [(1, 1, 2), (1, 3, 3), (5, 5, 2), (5, 10, 3), (10, 20, 3)])
def test_a_verified_children_step_is_always_accepted(setup, k, n, gamma):
    """The target's top-K at a children step are children of its top-K at the step before, so
    a round that accepts every drafted step accepts the children steps after it too: it never
    stops among them (with n = 3 below one code-1 beam, codes 2 and 3 are both children steps)."""
    from atspeed_ray.decoding.acceptance import accept_round

    index, V, target, unrelated, prompts = setup
    B, L = len(prompts), index.L
    params = SearchParams(k, n, gamma, "strict", expand_last=WIDE_CHILDREN)
    beams = root_beams(B, k, L, ["target", "draft"], torch.device("cpu"), torch.float64)
    t = torch.zeros(B, dtype=torch.long)
    g = torch.full((B,), gamma)
    seen, tails = set(), set()
    for draft in (unrelated, random_model(V, seed=11, hidden=16, layers=1), target):
        with torch.no_grad():
            steps, b, _ = draft_phase(draft, None, beams, t, g, prompts, index, params)
            kinds = [s.children for s in steps]  # drafted steps, then children steps to the end
            assert kinds[-1] and not kinds[0] and kinds == sorted(kinds), kinds
            verified, _ = verify_phase(target, None, b, t, steps, prompts, index)
            _, acc = accept_round(verified, t, g, index, params)
        drafted = kinds.count(False)
        assert not bool(((acc >= drafted) & (acc < gamma)).any()), (acc, kinds)
        seen.update(acc.tolist())
        tails.add(gamma - drafted)
    assert gamma in seen  # the property is not vacuous: some round got through the children steps
    assert max(tails) == (2 if (k, n, gamma) == (1, 3, 3) else 1), tails


def test_children_steps_are_strict_only():
    with pytest.raises(ValueError, match="expand_last"):
        SearchParams(3, 6, 3, "relaxed", expand_last=8)
    with pytest.raises(ValueError, match="expand_last"):
        SearchParams(3, 6, 3, "strict", expand_last=-1)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch without MKL")
def test_strict_equals_beam_search_on_packed_weights(setup):
    """``FastLlama.pack_weights`` (fp32, MKL-packed projections and head: decoding's default on
    CPU): strict speculative search returns the packed target's own beam search, over K, N,
    gamma, children steps and batch, with an unrelated draft and with a code-head draft."""
    index, V, target, unrelated, prompts = setup
    code_ids = (index.token_column >= 0).nonzero()[:, 1].unique()
    fp32 = [copy.deepcopy(m).float() for m in (target, unrelated)]  # the fixture's stay fp64
    models = [FastLlama(m) for m in fp32] + [FastLlama(fp32[1], head_ids=code_ids)]
    assert all(m.pack_weights() for m in models)
    f_target, f_unrelated, f_head = models
    for k, n, gamma in ((1, 2, 3), (5, 10, 2), (10, 20, 3), (20, 20, 3)):
        for batch in (prompts[:1], prompts):
            ref = beam_search(f_target, batch, index, k)
            for draft in (f_unrelated, f_head, f_target):
                for cap in (0, 16):
                    out = speculative_search(f_target, draft, batch, index,
                                             SearchParams(k, n, gamma, expand_last=cap))
                    assert_same_as_beam_search(out, ref)
