"""Feature drafts (``drafts/feature.py``): the strict grid through them on random tiny targets
(HF and FastLlama forwards, children steps, batches), save and load by kind, and the relaxed
distribution at K = 2."""

from __future__ import annotations

import pytest
import torch

from atspeed_ray.decoding import beam_search
from atspeed_ray.decoding.fast_llama import fast_forward
from atspeed_ray.decoding.speculative import speculative_beam_search
from atspeed_ray.drafts import DRAFT_KINDS, draft_kind, load_drafter
from atspeed_ray.drafts.feature import FEATURE, FeatureConfig, FeatureDraft, FeatureDrafter
from atspeed_ray.models import DeviceConfig
from tests.helpers import (
    STRICT_GRID, assert_same_as_beam_search, random_catalog, random_model, random_prompts,
    plackett_luce, strict_runs, vocab_size,
)


@pytest.fixture(scope="module")
def setup():
    codebook = [8, 8, 8, 8]
    index = random_catalog(1500, codebook, seed=0)
    V = vocab_size(codebook)
    target = random_model(V, seed=1)
    draft = FeatureDraft.from_target(target, index, FeatureConfig(hidden=32, layers=2, heads=4))
    torch.manual_seed(5)  # a draft that disagrees with the target: random blocks
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return index, target, FeatureDrafter(draft.double()), random_prompts(3, V, seed=2)


@pytest.mark.parametrize("forward", ["hf", "fast"])
@pytest.mark.parametrize("k,n_mult,gamma", STRICT_GRID)
def test_strict_through_a_feature_draft_equals_beam_search(setup, k, n_mult, gamma, forward):
    index, target, drafter, prompts = setup
    if forward == "fast":
        target = fast_forward(target)
    for batch in (prompts[:1], prompts):
        ref = beam_search(target, batch, index, k)
        for cap, out in strict_runs(target, drafter, batch, index, k, k * n_mult, gamma):
            assert_same_as_beam_search(out, ref)
            # the first round is the target's prefill (no draft call); a round drafts at most
            # min(gamma, L - 1 - t) steps after it
            assert all(r >= 2 for r in out.stats["target_calls"]) or index.L == 1


def test_saved_and_loaded_by_its_kind(setup, tmp_path):
    index, target, drafter, prompts = setup
    assert DRAFT_KINDS["feature"] is FEATURE
    drafter.model.float().save(tmp_path / "d")
    drafter.model.double()
    assert draft_kind(tmp_path / "d") is FEATURE
    back = load_drafter(tmp_path / "d", DeviceConfig(device="cpu"))
    assert isinstance(back, FeatureDrafter) and back.wants_features
    for (name, a), b in zip(drafter.model.float().state_dict().items(), back.model.state_dict().values()):
        assert torch.equal(a, b), name
    drafter.model.double()
    ref = beam_search(target, prompts, index, 5)
    for _, out in strict_runs(target, back, prompts, index, 5, 10, 3):
        assert_same_as_beam_search(out, ref)
    (tmp_path / "d" / "config.json").write_text('{"draft_kind": "feature", "hidden": 32, "nope": 1}')
    with pytest.raises(ValueError, match="config.json: .*nope"):
        load_drafter(tmp_path / "d", DeviceConfig(device="cpu"))


def test_a_fresh_draft_starts_from_the_targets_own_scores(setup):
    """Before training, f^ = the target's feature passed through (identity blocks, zero depth
    embedding): its log-probs over the code head are the target's at the parent, renormalised."""
    index, target, _, prompts = setup
    fresh = FeatureDraft.from_target(target, index, FeatureConfig(hidden=32, layers=1, heads=4))
    h = torch.randn(2, 3, 32, dtype=torch.float64)
    f, logp, _ = fresh.double().step(h, fresh.code_ids[:6].view(2, 3), torch.tensor([1, 2]), None)
    norm = target.model.norm.weight.double()
    want_f = torch.nn.functional.rms_norm(h, (32,), norm, fresh.config.eps)
    torch.testing.assert_close(f, want_f, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logp, torch.log_softmax(want_f @ fresh.head.T, -1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("N", [2, 3])
def test_relaxed_k2_through_a_feature_draft(N):
    """K = 2 on a trie of one first code, 4 second codes and one third code below each, gamma =
    1: the first round is the target's prefill (its one first code), the second drafts the second
    code from the feature draft's q and takes two by recursive rejection sampling, its bonus step
    takes the one third code; the returned item set is the kept set of second codes. Its
    empirical distribution over 4000 seeded runs matches two draws without replacement from the
    target's p (relaxed mode's distribution, whatever the draft)."""
    codebook = [1, 4, 1]
    index = random_catalog(4, codebook, seed=0)
    V = vocab_size(codebook)
    target = random_model(V, seed=21, scale=1.5)
    draft = FeatureDraft.from_target(target, index, FeatureConfig(hidden=32, layers=1, heads=4))
    torch.manual_seed(3)
    with torch.no_grad():
        draft.fc.weight.add_(0.5 * torch.randn_like(draft.fc.weight))
    draft = draft.double()
    prompt = random_prompts(1, V, seed=23)[0]
    first = int(index.level_tokens[0, 0])
    second = index.level_tokens[1, :4].tolist()
    with torch.no_grad():
        out = target.base_model(input_ids=torch.tensor([prompt]))
        h = out.last_hidden_state[0, -1]
        p_all = torch.softmax(target(torch.tensor([prompt + [first]])).logits[0, -1][second], -1)
        _, q_all, _ = draft.step(h.view(1, 1, -1), torch.tensor([[first]]), torch.tensor([0]), None)
        cols = draft.head_columns[torch.tensor(second)]
        q_all = torch.softmax(q_all[0, 0, cols], -1)
    p, q = dict(zip(second, p_all.tolist())), dict(zip(second, q_all.tolist()))
    third = int(index.level_tokens[2, 0])
    item = {b: int(index.items_of(torch.tensor([[first, b, third]]))[0]) for b in second}
    exact: dict[frozenset, float] = {}
    for s, prob in plackett_luce(p, 2).items():  # two draws from the target's p, any draft
        key = frozenset(item[b] for b in s)
        exact[key] = exact.get(key, 0.0) + prob
    n = 4000
    res = speculative_beam_search(target, FeatureDrafter(draft), [prompt] * n, index, 2,
                                  draft_beams=N, gamma=1, mode="relaxed", seed=0)
    assert res.stats["draft_calls"] == [1] * n  # the second code is drafted, once per request
    emp: dict[frozenset, float] = {}
    for items in res.items:
        emp[frozenset(items)] = emp.get(frozenset(items), 0.0) + 1 / n
    tvd = 0.5 * sum(abs(emp.get(x, 0.0) - exact.get(x, 0.0)) for x in set(emp) | set(exact))
    assert tvd < 0.05
