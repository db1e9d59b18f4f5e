"""Acceptance: walk the drafted steps with the target's distributions (``verification``).

Strict mode accepts step j when the target's own top-K at step j are all among the drafted
beams; relaxed mode accepts each drafted beam with probability min(1, p/q) and needs K of them.
At the first rejection the target's own choice at that step is taken (strict: its top-K;
relaxed: the accepted ones plus draws from norm(max(p - q, 0))). If all drafted steps pass, the
target's distribution after the last one gives a bonus step.

Relaxed mode's draws at step j are numbered (``accept_draw``) so that a row draws the same numbers
whatever rows it is stacked with: the draws of its bonus step are those of a step where it
drafted nothing (which it has when stacked with rows that drafted more).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.beam import Beams, Candidates, Step, beam_step, choose, expand_columns, take
from atspeed_ray.decoding.drafting import DraftStep
from atspeed_ray.decoding.noise import gumbel, uniform
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.decoding.verification import Verified


def drafted_flat(step: DraftStep, cur_idx: Tensor, n_prev: int, depth: Tensor,
                 index: ItemIndex, C: int) -> Tensor:
    """Index of every drafted beam in the target's candidate space [B, K * C] (-1 if its parent
    is not among the target's current beams, or it is not a valid proposal)."""
    B, K = cur_idx.shape
    inv = torch.full((B, n_prev + 1), -1, dtype=torch.long, device=cur_idx.device)
    inv.scatter_(1, torch.where(cur_idx >= 0, cur_idx, n_prev),  # dead beams (-1) map nowhere
                 torch.arange(K, device=cur_idx.device).expand(B, K))
    pos = inv[:, :n_prev].gather(1, step.parent)  # [B, N]
    tok = step.beams.tokens.gather(2, depth[:, None, None].expand(B, pos.shape[1], 1)).squeeze(-1)
    col = index.columns_of(tok, depth[:, None].expand_as(tok))
    ok = (pos >= 0) & (col >= 0) & step.valid
    return torch.where(ok, pos * C + col, -1)


def accept_strict(cands: Candidates, d_flat: Tensor, K: int) -> tuple[Step, Tensor, Tensor]:
    """Target's top-K; whether all are drafted [B]; which drafted beam each one is [B, K]
    (-1 for a dead one: with fewer than K live extensions the target keeps dead beams too)."""
    step = beam_step(cands, K)
    live = torch.isfinite(step.score)  # [B, K]
    match = (step.flat[:, :, None] == d_flat[:, None, :]) & live[..., None]  # [B, K, N]
    found = match.any(-1) | ~live
    return step, found.all(-1), torch.where(live, match.int().argmax(-1), -1)


Draw = Literal["accept", "pick", "resample"]
_DRAWS: tuple[Draw, ...] = ("accept", "pick", "resample")


def accept_draw(j: int, what: Draw) -> int:
    """The number of relaxed acceptance's draw ``what`` at step ``j`` (1-based) of a round."""
    return len(_DRAWS) * j + _DRAWS.index(what)


def accept_relaxed(cands: Candidates, d_flat: Tensor, step: DraftStep, cur_idx: Tensor, K: int,
                   drafted: Tensor, keys: Tensor | None, j: int) -> tuple[Step, Tensor, Tensor]:
    """Accept drafted beam y with probability min(1, p(y)/q(y)) (step ``j``: draws
    ``accept_draw(j, ...)`` of the rows' acceptance keys ``keys`` [B], None: torch's generator).

    ``drafted`` [B] is False for requests with nothing drafted at this step: they sample from p
    exactly as a bonus step does (the same draw, the same keys).
    Returns (the step taken if this is where the round stops: the accepted beams plus draws from
    norm(max(p - q, 0)); whether >= K were accepted [B]; K accepted drafted beams [B, K])."""
    B, F = cands.scores.shape
    C = cands.num_columns
    p = torch.softmax(cands.scores, dim=1)  # [B, K * C] target's beam-sampling distribution
    n_prev = step.q.shape[1] // C
    q = take(step.q.view(B, n_prev, C), cur_idx).reshape(B, F)  # draft's, in target space
    q = q * drafted[:, None]
    p_y = torch.where(d_flat >= 0, p.gather(1, d_flat.clamp(min=0)), 0.0)
    u = uniform(keys, accept_draw(j, "accept"), tuple(p_y.shape), p_y.device, p_y.dtype)
    accepted = (d_flat >= 0) & (u * step.q_sel < p_y)  # [B, N]
    enough = accepted.sum(1) >= K
    pick = uniform(keys, accept_draw(j, "pick"), tuple(p_y.shape), p_y.device, p_y.dtype)
    chosen = torch.where(accepted, pick, -1.0).topk(K, dim=1).indices  # K random accepted ones
    # where the round stops: keep every accepted beam, fill up from the residual distribution
    is_acc = torch.zeros(B, F + 1, dtype=torch.bool, device=p.device)
    is_acc.scatter_(1, torch.where(accepted, d_flat, F), True)
    is_acc = is_acc[:, :F]
    resid = (p - q).clamp(min=0).masked_fill(is_acc, 0.0)
    empty = resid.sum(1, keepdim=True) <= 0
    resid = torch.where(empty, p.masked_fill(is_acc, 0.0), resid)
    # nothing drafted: sample from p as the bonus step does (its key: the scores themselves)
    key = torch.where(drafted[:, None], torch.log(resid), cands.scores)
    key = (key + gumbel(keys, accept_draw(j, "resample"), key)).masked_fill(is_acc, float("inf"))
    return choose(cands, key, K), enough, chosen


def accept_round(verified: Verified, t: Tensor, g: Tensor, index: ItemIndex, params: SearchParams,
                 keys: Tensor | None = None) -> tuple[Beams, Tensor]:
    """Walk the drafted steps with the target's column log-probs; return the K new beams per
    request and the number of accepted steps [B] (``accepted + 1`` tokens longer). Relaxed:
    ``keys`` [B] are the rows' acceptance keys of this round (``noise.round_streams``; None:
    torch's default generator)."""
    beams, steps, K = verified.beams, verified.steps, params.k
    L, C, G = index.L, index.num_columns, len(steps)
    cur, cur_logp = beams, verified.root_logp
    cur_feat = verified.root_features  # [B, K, F] where cur_logp was read (None: not asked)
    cur_idx = torch.arange(K, device=t.device).expand(t.shape[0], K)
    n_prev = K
    acc = torch.zeros_like(t)
    stopped = torch.zeros_like(t, dtype=torch.bool)
    final: Beams | None = None
    for j in range(1, G + 2):
        depth = (t + j - 1).clamp(max=L - 1)
        cands = expand_columns(cur_logp, cur.scores, cur.node, depth, index)
        if j <= G:
            s = steps[j - 1]
            d_flat = drafted_flat(s, cur_idx, n_prev, depth, index, C)
            if params.sample:
                stop_step, ok, nxt = accept_relaxed(cands, d_flat, s, cur_idx, K, j <= g, keys, j)
            else:
                stop_step, ok, nxt = accept_strict(cands, d_flat, K)
            ok = ok & (j <= g)
        else:  # bonus step (or the last step of a request with nothing drafted)
            noise = gumbel(keys, accept_draw(j, "resample"), cands.scores) if params.sample else None
            stop_step = beam_step(cands, K, noise)
            ok = torch.zeros_like(stopped)
        stop = ~stopped & ~ok
        feat = None if cur_feat is None else take(cur_feat, stop_step.parent)
        ended = cur.extend(stop_step, depth, feat)  # every row takes it once: where it stops
        final = ended if final is None else ended.where_rows(stop, final)
        acc += (~stopped & ok).long()
        stopped |= stop
        if j > G or bool(stopped.all()):
            break
        # continue from the accepted drafted beams, with the target's scores (dead stay dead)
        alive = nxt >= 0
        nxt_c = nxt.clamp(min=0)
        nxt_flat = d_flat.gather(1, nxt_c)
        scores = cands.scores.gather(1, nxt_flat.clamp(min=0))
        cur = replace(s.beams.take(nxt_c), scores=scores.masked_fill(~alive, float("-inf")))
        cur_logp = take(verified.step_logp[j - 1], nxt_c)
        if cur_feat is not None:
            assert verified.step_features is not None
            cur_feat = take(verified.step_features[j - 1], nxt_c)
        cur_idx, n_prev = nxt, s.parent.shape[1]
    assert final is not None
    return final, acc
