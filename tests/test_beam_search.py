"""Constrained beam search against HF generate, full recomputation, and brute-force tries."""

from __future__ import annotations

import pytest
import torch

from atspeed_ray.decoding import beam_search
from tests.helpers import random_catalog, random_model, random_prompts, vocab_size

CODEBOOK = [12, 12, 12, 12]


@pytest.fixture(scope="module")
def setup():
    index = random_catalog(900, CODEBOOK, seed=0)
    V = vocab_size(CODEBOOK)
    model = random_model(V, seed=1)
    prompts = random_prompts(3, V, seed=2)
    return index, V, model, prompts


def hf_beam_search(model, prompt, index, V, k):
    """HF generate with prefix_allowed_tokens_fn: the reference semantics."""
    def allowed(_batch_id, ids):
        gen = ids[len(prompt):]
        node = index.prefix_nodes(gen[None])
        return index.allowed_mask(node, len(gen), V)[0].nonzero().flatten().tolist()

    out = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        num_beams=k, num_return_sequences=k, max_new_tokens=index.L, min_new_tokens=index.L,
        prefix_allowed_tokens_fn=allowed, do_sample=False, output_scores=True,
        output_logits=True, return_dict_in_generate=True, length_penalty=1.0, pad_token_id=0,
        eos_token_id=None,
    )
    seqs = out.sequences[:, len(prompt):]
    if k == 1:  # greedy search: sum the raw log-softmax of the chosen tokens
        logp = torch.stack([torch.log_softmax(lg[0], -1)[t] for lg, t in zip(out.logits, seqs[0])])
        return index.items_of(seqs).tolist(), logp.sum()[None]
    # HF reports the sum of log-probs divided by the generated length
    return index.items_of(seqs).tolist(), out.sequences_scores * index.L


@pytest.mark.parametrize("k", [1, 4, 10])
def test_beam_search_equals_hf_generate(setup, k):
    index, V, model, prompts = setup
    ours = beam_search(model, prompts, index, k)
    assert ours.sequences.shape == (len(prompts), k, index.L)
    for b, prompt in enumerate(prompts):
        items, scores = hf_beam_search(model, prompt, index, V, k)
        assert ours.items[b] == items
        torch.testing.assert_close(ours.scores[b], scores.to(ours.scores.dtype), atol=1e-4, rtol=0)


def recompute_beam_search(model, prompt, index, k):
    """Plain reference: every step re-runs the full prompt + beam (no cache, no tree mask)."""
    beams = [([], 0.0)]
    for d in range(index.L):
        cands = []
        for toks, score in beams:
            logits = model(torch.tensor([prompt + toks])).logits[0, -1]
            logp = torch.log_softmax(logits, -1)
            node = index.prefix_nodes(torch.tensor([toks], dtype=torch.long))
            allowed = index.allowed_mask(node, d, logits.shape[-1])[0].nonzero().flatten()
            cands += [(toks + [int(a)], score + float(logp[a])) for a in allowed]
        beams = sorted(cands, key=lambda c: -c[1])[:k]
    return [int(index.items_of(torch.tensor(t))) for t, _ in beams], [s for _, s in beams]


def test_kv_cached_decoding_equals_full_recomputation(setup):
    index, V, model, prompts = setup
    ours = beam_search(model, prompts, index, 5)
    for b, prompt in enumerate(prompts):
        with torch.no_grad():
            items, scores = recompute_beam_search(model, prompt, index, 5)
        assert ours.items[b] == items
        torch.testing.assert_close(ours.scores[b], torch.tensor(scores, dtype=torch.float64), atol=1e-6, rtol=0)


def test_every_item_exists_and_is_distinct(setup):
    index, V, model, prompts = setup
    out = beam_search(model, prompts, index, 20)
    for items in out.items:
        assert len(set(items)) == 20
        assert bool(index.contains(items).all())
    assert bool((out.scores[:, :-1] >= out.scores[:, 1:]).all()), "best first"


def test_trie_mask_equals_brute_force():
    index = random_catalog(300, [6, 5, 7, 4], seed=3)
    V = vocab_size([6, 5, 7, 4])
    codes = index.codes
    g = torch.Generator().manual_seed(0)
    for depth in range(index.L + 1):
        # prefixes of real items, and random (mostly invalid) prefixes
        real = codes[torch.randint(len(codes), (40,), generator=g), :depth]
        rand = torch.randint(V, (40, depth), generator=g)
        for prefixes in (real, rand):
            node = index.prefix_nodes(prefixes)
            for i, prefix in enumerate(prefixes):
                match = (codes[:, :depth] == prefix).all(1)
                assert bool(node[i] >= 0) == bool(match.any())
                if depth < index.L:
                    expect = torch.zeros(V, dtype=torch.bool)
                    expect[codes[match, depth]] = True
                    got = index.allowed_mask(node[i:i + 1], depth, V)[0]
                    assert torch.equal(got, expect)


def test_beam_search_batch_matches_single(setup):
    index, V, model, prompts = setup
    batch = beam_search(model, prompts, index, 6)
    for b, p in enumerate(prompts):
        single = beam_search(model, [p], index, 6)
        assert single.items[0] == batch.items[b]
        torch.testing.assert_close(single.scores[0], batch.scores[b], atol=1e-9, rtol=0)


@pytest.mark.parametrize("width", [1, 3, 5])
def test_a_step_breaks_ties_by_the_lowest_index_at_any_row_length(width):
    """Beam search and strict acceptance choose among the same candidates laid out in rows of
    different lengths (a step over one root beam: C columns; over K beams: K * C, the rest
    -inf). Exact ties are common with bf16 logits, and topk breaks them in no fixed order, so
    the choice must: the lowest index first, whatever the row's length (it decides which beams
    strict speculation keeps)."""
    from atspeed_ray.decoding.beam import Candidates, choose

    g = torch.Generator().manual_seed(0)
    C = 256
    scores = torch.randint(0, 4, (2, C), generator=g).float() * -0.25  # many exact ties
    for total in (C, 5 * C, 20 * C):
        padded = torch.cat([scores, torch.full((2, total - C), float("-inf"))], 1)
        cands = Candidates(padded, torch.arange(total).expand(2, total), torch.zeros(2, C,
                           dtype=torch.long), C)
        step = choose(cands, padded, width)
        want = [sorted(range(C), key=lambda i: (-float(scores[b, i]), i))[:width] for b in range(2)]
        assert step.flat.tolist() == want, total
