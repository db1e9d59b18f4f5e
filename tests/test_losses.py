"""Alignment losses: hand-computed values, masking, gradient directions, alpha = 0 == SFT."""

from __future__ import annotations

import math

import pytest
import torch

from atspeed_ray.settings import LOSS_NAMES
from atspeed_ray.training.losses import (
    LOSSES, combine, cross_entropy, forward_kl, get_loss, masked_log_softmax, topk_reverse_kl, tvd,
)

ln = math.log
VALID = torch.tensor([True, True, True, False])


def logits(probs: list[float]) -> torch.Tensor:
    """Log of (unnormalised) probabilities; 0 -> a huge logit that masking must ignore."""
    return torch.tensor([ln(p) if p > 0 else 50.0 for p in probs], dtype=torch.float64)


# ---------------------------------------------------------------------------- values
def test_cross_entropy_value():
    x = torch.tensor([[0.0, ln(3.0)]])
    assert cross_entropy(x, torch.tensor([0])).item() == pytest.approx(ln(4.0))
    assert cross_entropy(x, torch.tensor([1])).item() == pytest.approx(ln(4 / 3))


def test_masked_log_softmax_ignores_invalid_and_survives_empty_rows():
    out = masked_log_softmax(logits([2, 1, 1, 0]), VALID).exp()
    assert out.tolist() == pytest.approx([0.5, 0.25, 0.25, 0.0])
    empty = masked_log_softmax(torch.tensor([[1.0, float("-inf")]]), torch.tensor([[False, False]]))
    assert torch.isfinite(empty).all()


def test_forward_kl_value():
    q, p = logits([0.5, 0.25, 0.25, 0]), logits([0.25, 0.5, 0.25, 0])
    # KL(p||q) = .25 ln(.25/.5) + .5 ln(.5/.25) + .25 ln 1 = .25 ln 2
    assert forward_kl(q, p, VALID).item() == pytest.approx(0.25 * ln(2))


def test_tvd_value_and_temperature():
    q, p = logits([0.5, 0.25, 0.25, 0]), logits([0.25, 0.5, 0.25, 0])
    assert tvd(q, p, VALID).item() == pytest.approx(0.25)
    # temperature 2: q ~ sqrt([2, 1, 1]), p ~ sqrt([1, 2, 1])
    s = math.sqrt(2)
    qq = [s / (s + 2), 1 / (s + 2), 1 / (s + 2)]
    pp = [1 / (s + 2), s / (s + 2), 1 / (s + 2)]
    want = 0.5 * sum(abs(a - b) for a, b in zip(qq, pp))
    assert tvd(q, p, VALID, temperature=2.0).item() == pytest.approx(want)


def atspeed_s_by_hand(qs: list[float], ps: list[float]) -> float:
    """KL(q||p) + p_K H(q) on already-selected, unnormalised probabilities (draft's order)."""
    q = [x / sum(qs) for x in qs]
    p = [x / sum(ps) for x in ps]
    rkl = sum(a * ln(a / b) for a, b in zip(q, p))
    return rkl + p[-1] * -sum(a * ln(a) for a in q)


def test_atspeed_s_value():
    # draft q ~ [4, 3, 2, 1]: top-2 = codes 0, 1. Target p ~ [1, 3, 5, 1] there: [1, 3].
    q, p = logits([4, 3, 2, 1]), logits([1, 3, 5, 1])
    valid = torch.ones(4, dtype=torch.bool)
    got = topk_reverse_kl(q, p, valid, k=2).item()
    assert got == pytest.approx(atspeed_s_by_hand([4, 3], [1, 3]))
    no_reg = topk_reverse_kl(q, p, valid, k=2, density=False).item()
    assert no_reg == pytest.approx(4 / 7 * ln((4 / 7) / (1 / 4)) + 3 / 7 * ln((3 / 7) / (3 / 4)))
    # temperature 2 on both: probabilities become square roots before renormalising
    got_t = topk_reverse_kl(q, p, valid, k=2, temperature=2.0).item()
    assert got_t == pytest.approx(atspeed_s_by_hand([2, math.sqrt(3)], [1, math.sqrt(3)]))


def test_atspeed_s_masks_invalid_codes_and_handles_few_valid():
    # code 3 is invalid and has a huge draft logit: it must not enter the top-K
    q, p = logits([4, 3, 2, 0]), logits([1, 3, 5, 0])
    assert topk_reverse_kl(q, p, VALID, k=2).item() == pytest.approx(atspeed_s_by_hand([4, 3], [1, 3]))
    # only 3 valid codes, k = 4: all three are used, p_K is the target's at the last of them
    assert topk_reverse_kl(q, p, VALID, k=4).item() == pytest.approx(
        atspeed_s_by_hand([4, 3, 2], [1, 3, 5]))


def test_losses_are_zero_when_draft_equals_target():
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    valid = torch.rand(3, 5, 7) > 0.3
    valid[..., 0] = True
    assert forward_kl(x, x, valid).abs().max() < 1e-12
    assert tvd(x, x, valid).abs().max() < 1e-12
    # AtSpeed-S keeps the density term p_K H(q) even at q = p
    rkl = topk_reverse_kl(x, x, valid, k=3, density=False)
    assert rkl.abs().max() < 1e-12


# ---------------------------------------------------------------------------- gradients
def descend(loss_fn, q: torch.Tensor, steps: int = 200, lr: float = 0.5) -> torch.Tensor:
    q = q.clone().requires_grad_(True)
    opt = torch.optim.SGD([q], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(q).sum().backward()
        assert torch.isfinite(q.grad).all()
        opt.step()
    return q.detach()


def test_atspeed_s_pulls_draft_topk_onto_target_topk():
    # target's top-2 = codes {0, 1}; the draft starts with top-2 = {2, 0} and code 1 third
    p = logits([0.4, 0.35, 0.05, 0.1, 0.1, 0])
    q0 = logits([0.3, 0.15, 0.4, 0.1, 0.05, 0])
    valid = torch.tensor([True] * 5 + [False])
    k = 2
    masked = lambda x: torch.where(valid, x, float("-inf"))  # noqa: E731
    assert set(masked(q0).topk(k).indices.tolist()) == {0, 2}
    q = descend(lambda x: topk_reverse_kl(x, p, valid, k), q0)
    assert set(masked(q).topk(k).indices.tolist()) == {0, 1}
    mass = lambda x: masked_log_softmax(x, valid).exp()[[0, 1]].sum().item()  # noqa: E731
    assert mass(q) > mass(q0)


@pytest.mark.parametrize("fn", [forward_kl, tvd])
def test_distribution_losses_move_q_toward_p(fn):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(4, 6, generator=g, dtype=torch.float64)
    q0 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    valid = torch.rand(4, 6, generator=g) > 0.3
    valid[:, 0] = True
    q = descend(lambda x: fn(x, p, valid), q0, steps=100, lr=0.5)
    assert tvd(q, p, valid).sum() < 0.5 * tvd(q0, p, valid).sum()
    assert fn(q, p, valid).sum() < fn(q0, p, valid).sum()


def test_cross_entropy_raises_the_target_token():
    x0 = torch.zeros(2, 5, dtype=torch.float64)
    t = torch.tensor([3, 1])
    x = descend(lambda x: cross_entropy(x, t), x0, steps=5, lr=0.5)
    assert (x.log_softmax(-1).gather(1, t[:, None]) > x0.log_softmax(-1).gather(1, t[:, None])).all()


# ---------------------------------------------------------------------------- combine / registry
def random_inputs(seed: int = 0, B: int = 3, K: int = 4, L: int = 4, V: int = 11, C: int = 5):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    valid = torch.rand(B, K, L, C, generator=g) > 0.4
    valid[..., 0] = True
    return dict(
        truth_logits=r(B, L, V), truth_codes=torch.randint(V, (B, L), generator=g),
        teacher_logits=r(B, K, L, V), teacher_codes=torch.randint(V, (B, K, L), generator=g),
        teacher_valid=torch.ones(B, K, dtype=torch.bool),
        q_cols=r(B, K, L, C), p_cols=r(B, K, L, C), valid_cols=valid,
        seq_weight=torch.ones(B, K))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_alpha_zero_equals_sft(name):
    kw = random_inputs()
    sft = cross_entropy(kw["truth_logits"], kw["truth_codes"]).mean()
    loss, parts = combine(name, alpha=0.0, **kw)
    assert loss.item() == pytest.approx(sft.item(), abs=1e-12)
    assert parts["sft"] == pytest.approx(sft.item())


@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"sft"}))
def test_combine_mixes_sft_and_align(name):
    kw = random_inputs(1)
    l0, parts = combine(name, alpha=0.0, **kw)
    l1, parts1 = combine(name, alpha=1.0, **kw)
    lh, _ = combine(name, alpha=0.3, **kw)
    assert lh.item() == pytest.approx(0.7 * l0.item() + 0.3 * l1.item())
    assert l1.item() == pytest.approx(parts1["align"])


def test_combine_weights_skip_padded_sequences():
    kw = random_inputs(2)
    w = kw["seq_weight"].clone()
    w[:, 2:] = 0
    full, _ = combine("atspeed-r", alpha=1.0, **{**kw, "seq_weight": w})
    cut = {k: (v[:, :2] if k in ("q_cols", "p_cols", "valid_cols", "seq_weight") else v)
           for k, v in kw.items()}
    ref, _ = combine("atspeed-r", alpha=1.0, **cut)
    assert full.item() == pytest.approx(ref.item())


def test_registry_and_bad_names():
    assert set(LOSSES) == {"sft", "seqkd", "wordkd", "tvdkd", "atspeed-s", "atspeed-r"}
    assert tuple(LOSSES) == LOSS_NAMES  # the registry is keyed by the shared names
    assert get_loss("atspeed-s").on == "teacher" and get_loss("tvdkd").on == "truth"
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("nope")
    with pytest.raises(ValueError, match="alpha"):
        combine("sft", torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), alpha=1.5)
    with pytest.raises(ValueError, match="needs"):
        combine("atspeed-s", torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), alpha=0.5)
