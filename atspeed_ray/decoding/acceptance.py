"""Acceptance: walk the drafted steps with the target's distributions (``verification``).

Strict mode accepts step j when the target's own top-K at step j are all among the drafted
beams. Relaxed mode makes the target's K beams at step j K draws without replacement from p
(the softmax of the target's cumulative scores over the children of its current beams: the
target's own sampled beam search, what a bonus step draws) by recursive rejection sampling over
the drafted beams in the order the draft sampled them (``recursive_accept``); the step is
accepted when K drafted beams are taken. At the first rejection the target's own choice at that
step is taken (strict: its top-K; relaxed: the drafted beams taken plus the remaining draws, the
current one from its residual). If all drafted steps pass, the target's distribution after the
last one gives a bonus step. So relaxed output follows the target's sampled beam search whatever
the draft; the draft only changes how many steps a round accepts (results/relaxed/RUN.md).

Relaxed mode's draws at step j are numbered (``accept_draw``) so that a row draws the same numbers
whatever rows it is stacked with: the draws of its bonus step are those of a step where it
drafted nothing (which it has when stacked with rows that drafted more).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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


Draw = Literal["accept", "fill", "resample"]
_DRAWS: tuple[Draw, ...] = ("accept", "fill", "resample")


def accept_draw(j: int, what: Draw) -> int:
    """The number of relaxed acceptance's draw ``what`` at step ``j`` (1-based) of a round."""
    return len(_DRAWS) * j + _DRAWS.index(what)


def _normalise(w: Tensor, fallback: Tensor) -> Tensor:
    """``w`` [B, F] scaled to sum 1 per row; rows whose sum is not positive: ``fallback``'s."""
    total = w.sum(1, keepdim=True)
    ok = total > 0
    return torch.where(ok, w / torch.where(ok, total, 1.0), fallback)


@dataclass
class Recursion:
    """The state of recursive rejection sampling over one step's drafts, per request.

    The target's beams at a step are K draws without replacement from p; each draw is made
    from the drafts in their sampling order: draft y, drawn from what is left of q (``q_left``),
    is taken with probability min(1, r(y) / q_c(y)), where r is the current draw's distribution
    (p without the beams already taken, minus what earlier rejected drafts covered).
    """

    taken: Tensor  # [B, F] bool: drafted beams taken as target beams
    r: Tensor  # [B, F] the distribution the current draw follows (sums to 1)
    seen: Tensor  # [B, F] bool: drafts already read (q_c excludes them)
    q_left: Tensor  # [B] q's mass not yet drafted

    def p_left(self, p: Tensor) -> Tensor:
        """p without the beams taken, renormalised: where a new draw starts [B, F]."""
        return _normalise(p.masked_fill(self.taken, 0.0), p)


def recursive_accept(p: Tensor, q: Tensor, d_flat: Tensor, u: Tensor, K: int
                     ) -> tuple[Recursion, Tensor]:
    """Recursive rejection sampling of K draws without replacement from ``p`` [B, F] with the
    drafts ``d_flat`` [B, N] (in the order the draft sampled them without replacement from ``q``
    [B, F]; -1: not a proposal here) and uniforms ``u`` [B, N]. Returns the state after the
    drafts and which drafts were taken [B, N] (at most K per request)."""
    B, N = d_flat.shape
    st = Recursion(torch.zeros_like(p, dtype=torch.bool), p.clone(),
                   torch.zeros_like(p, dtype=torch.bool), q.sum(1))
    took = torch.zeros(B, N, dtype=torch.bool, device=p.device)
    rows = torch.arange(B, device=p.device)
    for n in range(N):
        y = d_flat[:, n]  # [B]
        live = (y >= 0) & (st.taken.sum(1) < K)
        y_c = y.clamp(min=0)
        q_c = q.masked_fill(st.seen, 0.0) / st.q_left.clamp(min=1e-30)[:, None]  # [B, F]
        q_y, r_y = q_c[rows, y_c], st.r[rows, y_c]
        ok = live & (u[:, n] * q_y < r_y)
        took[:, n] = ok
        taken = st.taken.clone()
        taken[rows, y_c] |= ok
        p_next = Recursion(taken, st.r, st.seen, st.q_left).p_left(p)
        rejected = _normalise((st.r - q_c).clamp(min=0.0), st.r)
        r = torch.where(ok[:, None], p_next, torch.where(live[:, None], rejected, st.r))
        seen = st.seen.clone()
        seen[rows, y_c] |= live
        st = Recursion(taken, r, seen, torch.where(live, st.q_left - q[rows, y_c], st.q_left))
    return st, took


def accept_relaxed(cands: Candidates, d_flat: Tensor, step: DraftStep, cur_idx: Tensor, K: int,
                   drafted: Tensor, keys: Tensor | None, j: int) -> tuple[Step, Tensor, Tensor]:
    """The target's K beams at step ``j`` as K draws without replacement from p (the softmax of
    the candidates' cumulative scores), made by recursive rejection sampling from the drafted
    beams (``recursive_accept``; draws ``accept_draw(j, ...)`` of the rows' acceptance keys
    ``keys`` [B], None: torch's generator). The draft's q is its sampling distribution restricted
    to the children of the target's current beams and renormalised: the valid drafts, in their
    order, are draws without replacement from it.

    ``drafted`` [B] is False for requests with nothing drafted at this step: they sample from p
    exactly as a bonus step does (the same draw, the same keys).
    Returns (the step taken if this is where the round stops: the drafted beams taken, then the
    current draw from its residual and the rest from p; whether K were taken [B]; the K taken
    drafted beams [B, K], in draft order)."""
    B, F = cands.scores.shape
    C = cands.num_columns
    p = torch.softmax(cands.scores, dim=1)  # [B, K * C] target's beam-sampling distribution
    n_prev = step.q.shape[1] // C
    q = take(step.q.view(B, n_prev, C), cur_idx).reshape(B, F)  # draft's, in target space
    q = _normalise(q * drafted[:, None], torch.zeros_like(q))  # given the target's beams
    N = d_flat.shape[1]
    u = uniform(keys, accept_draw(j, "accept"), (B, N), p.device, p.dtype)
    st, took = recursive_accept(p, q, d_flat, u, K)
    enough = took.sum(1) >= K
    order = torch.arange(N, 0, -1, device=p.device, dtype=p.dtype)  # earlier drafts first
    chosen = torch.where(took, order, 0.0).topk(K, dim=1).indices  # [B, K]
    # where the round stops: the taken beams, the current draw from r, the others from p
    first = torch.log(st.r) + gumbel(keys, accept_draw(j, "resample"), cands.scores)
    first = first.masked_fill(st.taken, float("-inf"))
    x = first.argmax(1, keepdim=True)  # [B, 1]
    rest = torch.log(p) + gumbel(keys, accept_draw(j, "fill"), cands.scores)
    key = rest.masked_fill(st.taken, float("inf")).scatter(1, x, float("inf"))
    # nothing drafted: sample from p as the bonus step does (its key: the scores themselves)
    plain = cands.scores + gumbel(keys, accept_draw(j, "resample"), cands.scores)
    key = torch.where(drafted[:, None], key, plain)
    return choose(cands, key, K), enough, chosen


def accept_relaxed_top(cands: Candidates, d_flat: Tensor, step: DraftStep, cur_idx: Tensor,
                       K: int, drafted: Tensor, keys: Tensor | None, j: int
                       ) -> tuple[Step, Tensor, Tensor]:
    """``relaxed_keep="top"``: each valid drafted beam y is accepted with probability
    min(1, p(y) / q(y)) (q renormalised to the children of the target's current beams); with K
    accepted, the K with the best target scores are kept; where the round stops, the target's
    own top-K (a beam step). Same arguments and returns as ``accept_relaxed``."""
    B, F = cands.scores.shape
    C = cands.num_columns
    p = torch.softmax(cands.scores, dim=1)  # [B, F]
    n_prev = step.q.shape[1] // C
    q = take(step.q.view(B, n_prev, C), cur_idx).reshape(B, F)
    q = _normalise(q * drafted[:, None], torch.zeros_like(q))
    y = d_flat.clamp(min=0)  # [B, N]
    u = uniform(keys, accept_draw(j, "accept"), tuple(y.shape), p.device, p.dtype)
    accepted = (d_flat >= 0) & (u * q.gather(1, y) < p.gather(1, y))  # [B, N]
    enough = accepted.sum(1) >= K
    best = torch.where(accepted, cands.scores.gather(1, y), float("-inf"))
    chosen = best.topk(K, dim=1).indices  # [B, K] the accepted ones the target scores best
    return beam_step(cands, K), enough, chosen


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
                accept = accept_relaxed_top if params.relaxed_keep == "top" else accept_relaxed
                stop_step, ok, nxt = accept(cands, d_flat, s, cur_idx, K, j <= g, keys, j)
            else:
                stop_step, ok, nxt = accept_strict(cands, d_flat, K)
            ok = ok & (j <= g)
        else:  # bonus step (or the last step of a request with nothing drafted)
            sampled = params.sample and params.relaxed_keep == "sample"
            noise = gumbel(keys, accept_draw(j, "resample"), cands.scores) if sampled else None
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
