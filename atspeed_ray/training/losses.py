"""Draft-alignment losses: pure functions of logits (no model, no data, no Ray).

Two spaces appear here:

* **vocabulary space** ``[..., V]``: the model's logits over its whole vocabulary. Next-item
  cross-entropy (``sft``, ``seqkd``) is taken here, log-softmax over the full vocabulary, exactly
  like the scores beam search uses.
* **column space** ``[..., C]``: at one position of one sequence, the C candidate code tokens of
  that depth (``ItemIndex.level_tokens``), with ``valid [..., C]`` marking the children of the
  sequence's trie prefix. Every distribution-matching loss works here: draft (q) and target (p)
  are both renormalised over the valid codes, disallowed tokens are masked out (the distributions
  live on the code vocabulary of the depth, masked by the item trie). It also means that a
  position with a single valid child costs nothing (both distributions are a point mass there).

Per-position losses (shape ``[...]``) are returned unreduced; :func:`combine` reduces them with a
position weight and mixes them as ``(1 - alpha) * SFT + alpha * align``.

Names (``align --loss NAME``), and the sequences each one is taken on:

=============  ==========  =============================================================
name           positions   align term (per position)
=============  ==========  =============================================================
``sft``        --          none: plain next-item cross-entropy (alpha is ignored)
``seqkd``      teacher     cross-entropy of the draft on the target's top-K sequences
``wordkd``     truth       forward KL, KL(p || q), over the valid codes
``tvdkd``      truth       total variation, 0.5 * sum |q - p|, over the valid codes
``atspeed-r``  teacher     total variation over the valid codes (AtSpeed-R)
``atspeed-s``  teacher     top-K reverse KL over the draft's top-K codes + p_K * H(q)
=============  ==========  =============================================================

"truth" = the ground-truth next item's codes, "teacher" = the target's top-K beam-search
sequences of the same prompt (one loss term per position of every teacher sequence).

A feature draft (``training/feature.py``) trains level by level on the target's beams instead:
``atspeed-s`` there is ``candidate_kl`` (the KL over the K x C candidate extensions a beam step
ranks), ``atspeed-r`` is ``beam_tvd`` (``tvd`` after each of the target's beams), each with
``feature_regression`` on the predicted hidden states.
``temperature`` divides both logits before the (masked) softmax in every distribution loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from atspeed_ray.settings import LOSS_NAMES, check_choice

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------- helpers
def masked_log_softmax(logits: Tensor, valid: Tensor, temperature: float = 1.0) -> Tensor:
    """log-softmax of ``logits / temperature`` over the ``valid`` entries ([..., C] each).

    Invalid entries get -inf. A row with no valid entry is treated as all-valid (finite output)
    so that padded positions never produce NaN; give them zero weight.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    empty = ~valid.any(-1, keepdim=True)
    valid = valid | empty
    x = torch.where(valid, logits.float() / temperature, NEG_INF)
    x = torch.where(empty, 0.0, x)  # rows without valid entries (and their -inf inputs)
    return x.log_softmax(-1)


def _safe(logp: Tensor, valid: Tensor) -> Tensor:
    """-inf -> 0 at invalid entries, so that 0 * (logq - logp) has a zero (not NaN) gradient."""
    return torch.where(valid, logp, 0.0)


# ---------------------------------------------------------------------------- per-position losses
def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Next-token CE over the full vocabulary: logits [..., V], targets [...] -> [...]."""
    logp = logits.float().log_softmax(-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def forward_kl(q_logits: Tensor, p_logits: Tensor, valid: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p || q) = sum_c p (log p - log q) over the valid codes. All [..., C] -> [...]."""
    logq = _safe(masked_log_softmax(q_logits, valid, temperature), valid)
    logp = _safe(masked_log_softmax(p_logits, valid, temperature), valid)
    return (logp.exp() * (logp - logq)).sum(-1)


def tvd(q_logits: Tensor, p_logits: Tensor, valid: Tensor, temperature: float = 1.0) -> Tensor:
    """Total variation 0.5 * sum_c |q - p| over the valid codes. All [..., C] -> [...]."""
    q = masked_log_softmax(q_logits, valid, temperature).exp()
    p = masked_log_softmax(p_logits, valid, temperature).exp()
    return 0.5 * (q - p).abs().sum(-1)


def candidate_kl(scores: Tensor, p_logp: Tensor, q_logp: Tensor, valid: Tensor,
                 temperature: float = 1.0) -> Tensor:
    """The sequence-level KL(p || q) over the candidate extensions of M beams, the space a beam
    step ranks: candidate (m, c) scores ``scores[m] + logp[m, c]`` under the target's (p) and the
    draft's (q) log-probs, the trie's invalid ones (``valid`` False) and dead beams (-inf score)
    removed (a feature draft's AtSpeed-S term). scores [B, M], p_logp / q_logp / valid [B, M, C]
    -> the mean over B."""
    live = torch.isfinite(scores)
    s = torch.where(live, scores, 0.0)[..., None]
    ok = (valid & live[..., None]).flatten(1)
    return forward_kl((s + q_logp).flatten(1), (s + p_logp).flatten(1), ok, temperature).mean()


def beam_tvd(scores: Tensor, p_logp: Tensor, q_logp: Tensor, valid: Tensor,
             temperature: float = 1.0) -> Tensor:
    """AtSpeed-R on one level of M beams (a feature draft's relaxed term): the total variation
    (``tvd``) between the target's (p) and the draft's (q) next-code distributions after each
    live beam, over the trie's valid codes; dead beams (-inf score) carry no weight.
    scores [B, M], p_logp / q_logp / valid [B, M, C] -> the mean over the live beams."""
    return weighted_mean(tvd(q_logp, p_logp, valid, temperature), torch.isfinite(scores))


def feature_regression(pred: Tensor, target: Tensor, live: Tensor) -> Tensor:
    """Smooth-L1 between predicted and the target's hidden states [B, M, E], averaged over the
    live beams ``live`` [B, M] (EAGLE's feature loss)."""
    per = torch.nn.functional.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(-1)
    return weighted_mean(per, live.float())


def topk_reverse_kl(q_logits: Tensor, p_logits: Tensor, valid: Tensor, k: int,
                    temperature: float = 1.0, density: bool = True) -> Tensor:
    """AtSpeed-S: at each position, take the draft's top-``k`` valid codes S (by q's logits).

    With q_S, p_S the softmax of ``logits / temperature`` restricted to S (both renormalised),
    the loss is  KL(q_S || p_S) + p_K * H(q_S),  where p_K = p_S at the k-th code of S (the
    draft's k-th best; the last one when fewer than k codes are valid) and H the entropy. p_K is
    the target's, so it carries no gradient. Positions with fewer valid codes use all of them.
    All inputs [..., C] -> [...].
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, q_logits.shape[-1])
    masked = torch.where(valid, q_logits.float(), NEG_INF)
    idx = masked.topk(k, dim=-1).indices  # [..., k], draft's best first; invalid ones last
    sel = valid.gather(-1, idx)  # [..., k]
    logq = _safe(masked_log_softmax(q_logits.gather(-1, idx), sel, temperature), sel)
    logp = _safe(masked_log_softmax(p_logits.gather(-1, idx), sel, temperature), sel)
    q = logq.exp() * sel
    rkl = (q * (logq - logp)).sum(-1)
    if not density:
        return rkl
    last = (sel.sum(-1, keepdim=True) - 1).clamp(min=0)  # the k-th (or last valid) selected code
    p_k = logp.gather(-1, last).squeeze(-1).exp().detach()
    entropy = -(q * logq).sum(-1)
    return rkl + p_k * entropy


# ---------------------------------------------------------------------------- registry
On = Literal["none", "truth", "teacher"]


@dataclass(frozen=True)
class AlignLoss:
    """One named objective: which sequences its align term is on, and whether it needs the
    target's distributions (p) there."""

    name: str
    on: On
    needs_target: bool
    term: Callable[..., Tensor] | None  # per-position align term; None for sft / seqkd (CE)


# the one registry of the objectives, keyed by ``settings.LOSS_NAMES`` (what each one does: the
# table in this module's docstring)
LOSSES: dict[str, AlignLoss] = {
    spec.name: spec
    for spec in [
        AlignLoss("sft", "none", False, None),
        AlignLoss("seqkd", "teacher", False, None),
        AlignLoss("wordkd", "truth", True, forward_kl),
        AlignLoss("tvdkd", "truth", True, tvd),
        AlignLoss("atspeed-s", "teacher", True, topk_reverse_kl),
        AlignLoss("atspeed-r", "teacher", True, tvd),
    ]
}


assert tuple(LOSSES) == LOSS_NAMES, "training.losses.LOSSES and settings.LOSS_NAMES disagree"


def get_loss(name: str) -> AlignLoss:
    return LOSSES[check_choice(name, LOSS_NAMES, "loss")]


def weighted_mean(values: Tensor, weight: Tensor) -> Tensor:
    """sum(values * weight) / sum(weight), 0 when the weight is all zero."""
    weight = weight.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp(min=1e-12)


def combine(
    name: str,
    truth_logits: Tensor,  # [B, L, V] draft logits before each ground-truth code
    truth_codes: Tensor,  # [B, L] ground-truth code tokens
    alpha: float = 0.5,
    *,
    teacher_logits: Tensor | None = None,  # [B, K, L, V] draft logits along the teacher sequences
    teacher_codes: Tensor | None = None,  # [B, K, L]
    teacher_valid: Tensor | None = None,  # [B, K] bool: a real teacher sequence
    q_cols: Tensor | None = None,  # [B, S, L, C] draft logits in column space on ``on`` sequences
    p_cols: Tensor | None = None,  # [B, S, L, C] target logits/log-probs there
    valid_cols: Tensor | None = None,  # [B, S, L, C] bool: trie children
    seq_weight: Tensor | None = None,  # [B, S] weight of each ``on`` sequence (0 = padding)
    temperature: float = 1.0,
    topk: int = 10,
) -> tuple[Tensor, dict[str, float]]:
    """``(1 - alpha) * SFT + alpha * align`` for loss ``name``; returns (loss, parts for logging).

    ``sft`` ignores alpha. For ``seqkd`` the align term is the CE on the teacher sequences; for the
    others it is the per-position term of the registry on ``q_cols`` / ``p_cols``, averaged over
    the positions of the sequences with ``seq_weight > 0``.
    """
    spec = get_loss(name)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    sft = cross_entropy(truth_logits, truth_codes).mean()
    if spec.name == "sft":
        return sft, {"sft": float(sft.detach())}
    if spec.name == "seqkd":
        if teacher_logits is None or teacher_codes is None or teacher_valid is None:
            raise ValueError("seqkd needs teacher_logits, teacher_codes and teacher_valid")
        ce = cross_entropy(teacher_logits, teacher_codes)  # [B, K, L]
        align = weighted_mean(ce, teacher_valid[..., None].expand_as(ce))
    else:
        if q_cols is None or p_cols is None or valid_cols is None or seq_weight is None:
            raise ValueError(f"{name} needs q_cols, p_cols, valid_cols and seq_weight")
        if spec.name == "atspeed-s":
            per_pos = topk_reverse_kl(q_cols, p_cols, valid_cols, topk, temperature)
        else:
            per_pos = spec.term(q_cols, p_cols, valid_cols, temperature)  # [B, S, L]
        align = weighted_mean(per_pos, seq_weight[..., None].expand_as(per_pos))
    loss = (1.0 - alpha) * sft + alpha * align
    return loss, {"sft": float(sft.detach()), "align": float(align.detach())}
