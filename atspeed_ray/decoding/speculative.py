"""Speculative beam search (AtSpeed): N-to-K drafting, one tree-attention verification per round.

One round, for every active request at once (each accepts and rejects on its own):

1. **Draft** (``g`` forwards of the draft): starting from the K current beams, a width-N beam
   search (strict: top N; relaxed: N samples without replacement from the softmax over
   cumulative scores) for ``g = min(gamma, L - 1 - t)`` steps. Every step's beams and parent
   pointers are kept.
2. **Verify** (one forward of the target): the current beams' uncached last tokens and all
   drafted tokens of all steps are packed after the cached prefix (on the first round: after the
   prompt) as a tree; tree attention gives the target's distribution after every drafted beam.
3. **Accept** step by step: strict mode accepts step j when the target's own top-K at step j are
   all among the drafted beams; relaxed mode accepts each drafted beam with probability
   min(1, p/q) and needs K of them. At the first rejection the target's own choice at that step is
   taken (strict: its top-K; relaxed: the accepted ones plus draws from norm(max(p - q, 0))).
   If all drafted steps pass, the target's distribution after the last one gives a bonus step.
4. Both caches drop rejected branches; finished requests leave the batch.

Strict mode returns exactly the target's beam search (same items, order and scores).

The loop is written once, as a generator (``speculative_loop``) that yields the model calls it
needs: ``speculative_beam_search`` answers them with in-process models and tree caches
(``LocalModels``); the serving ingress answers them with remote, stateless replica calls.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.beam import (
    Beams, Candidates, DecodeResult, Step, beam_step, choose, column_log_probs, expand,
    expand_columns, gumbel_like, log_probs, prefill, root_beams, score_dtype, step_nodes, take,
)
from atspeed_ray.decoding.tree import Nodes, TreeCache, tree_forward

from atspeed_ray.settings import MODES, Mode, check_choice


@dataclass
class DraftStep:
    """The N beams the draft proposes at one step."""

    beams: Beams  # [B, N] beams (scores: target prefix score + draft log-probs)
    parent: Tensor  # [B, N] index of the parent among the previous step's beams
    valid: Tensor  # [B, N] bool: a real proposal the target may accept
    q: Tensor | None  # relaxed: [B, M_prev * C] draft sampling distribution over extensions
    q_sel: Tensor | None  # relaxed: [B, N] draft probability of each proposal


def pending_nodes(beams: Beams, t: Tensor, name: str) -> tuple[Nodes, Tensor, Tensor]:
    """Nodes for each beam's tokens not yet in cache ``name`` (a suffix of its path).

    Returns (nodes [B, M * P], index of each beam's last pending node [B, M], depth [B, M, P]).
    """
    B, M, L = beams.tokens.shape
    slots = beams.slots[name]
    at = torch.arange(L, device=t.device)
    n_pend = ((slots < 0) & (at < t[:, None, None])).sum(-1)  # [B, M]
    P = max(int(n_pend.max()), 1)
    p = torch.arange(P, device=t.device)
    depth = (t[:, None, None] - P + p).expand(B, M, P)  # right-aligned: last one at t - 1
    live = torch.isfinite(beams.scores)[..., None]
    valid = (depth >= (t[:, None] - n_pend)[..., None]) & (depth >= 0) & live
    tokens = beams.tokens.gather(2, depth.clamp(min=0))
    own = torch.arange(M * P, device=t.device).view(1, M, P)
    parent = torch.where((p > 0) & valid.roll(1, dims=2), own - 1, -1).expand(B, M, P)
    cached = slots[:, :, None, :].expand(B, M, P, L)
    nodes = Nodes(tokens.reshape(B, M * P), depth.reshape(B, M * P), parent.reshape(B, M * P),
                  cached.reshape(B, M * P, L), valid.reshape(B, M * P))
    last = torch.where((n_pend > 0), own[..., -1], -1)  # [B, M]; -1: the prompt is the front
    return nodes, last, depth


def record_pending(beams: Beams, name: str, nodes: Nodes, depth: Tensor, slots: Tensor) -> Beams:
    """Write the cache slots of fed pending nodes into ``beams.slots[name]``."""
    B, M, P = depth.shape
    old = beams.slots[name]
    d = depth.clamp(min=0)
    new = torch.where(nodes.valid.view(B, M, P), slots.view(B, M, P), old.gather(2, d))
    out = dict(beams.slots)
    out[name] = old.scatter(2, d, new)
    return replace(beams, slots=out)


def forget_slots(beams: Beams) -> Beams:
    """The same beams with nothing cached anywhere (for a stateless forward)."""
    return replace(beams, slots={k: torch.full_like(v, -1) for k, v in beams.slots.items()})


def where_rows(mask: Tensor, a: Beams, b: Beams) -> Beams:
    """Per request: ``a`` where ``mask`` [B] else ``b``."""
    def pick(x: Tensor, y: Tensor) -> Tensor:
        return torch.where(mask.view(-1, *([1] * (x.dim() - 1))), x, y)
    return Beams(pick(a.tokens, b.tokens), pick(a.scores, b.scores), pick(a.node, b.node),
                 {k: pick(a.slots[k], b.slots[k]) for k in a.slots})


def feed(model: torch.nn.Module, cache: TreeCache | None, beams: Beams, t: Tensor, name: str,
         prompts: list[list[int]], build_extra=None, extra_levels: int = 0
         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Beams, TreeCache]:
    """One forward of ``model`` over the beams' uncached tokens (+ extra tree nodes).

    With ``cache=None`` the prompt goes in first and nothing needs to be cached: that is the first
    round, or a stateless call (beams whose ``slots[name]`` are all -1).
    ``build_extra(last, offset)`` returns nodes hanging below the pending ones (``last`` [B, M]:
    index of each beam's last pending node, -1 if its front is the prompt's end) in
    ``extra_levels`` levels.
    Returns (log-probs after each beam [B, M, V], logits of the extra nodes, their cache slots,
    their offset, beams with slots recorded, cache).
    """
    pend, last, depth = pending_nodes(beams, t, name)
    offset = pend.tokens.shape[1]
    parts = [pend]
    if build_extra is not None:
        parts.append(build_extra(last, offset))
    nodes = Nodes(*(torch.cat([getattr(p, f) for p in parts], 1)
                    for f in ("tokens", "depth", "parent", "cached", "valid")))
    max_chain = depth.shape[2] + extra_levels  # longest in-chunk ancestor chain
    if cache is None:
        prompt_last, cache, logits, slots = prefill(model, prompts, nodes, max_chain)
        front = torch.where((last >= 0)[..., None], take(logits, last.clamp(min=0)),
                            prompt_last[:, None, :])
    else:
        logits, cache, slots = tree_forward(model, cache, nodes, max_chain=max_chain)
        front = take(logits, last.clamp(min=0))
    beams = record_pending(beams, name, pend, depth, slots[:, :offset])
    return log_probs(front), logits[:, offset:], slots[:, offset:], offset, beams, cache


def draft_phase(draft: torch.nn.Module, dcache: TreeCache | None, beams: Beams, t: Tensor,
                g: Tensor, G: int, prompts: list[list[int]], index: ItemIndex, N: int,
                sample: bool, generator: torch.Generator | None
                ) -> tuple[list[DraftStep], Beams, TreeCache]:
    """G draft forwards: width-N beam search (or sampling) from the K current beams."""
    logp, _, _, _, beams, dcache = feed(draft, dcache, beams, t, "draft", prompts)
    steps: list[DraftStep] = []
    parents = beams
    L = index.L
    for j in range(1, G + 1):
        depth = (t + j - 1).clamp(max=L - 1)  # requests with g < j draft nothing valid here
        cands = expand(logp, parents.scores, parents.node, depth, index)
        step = beam_step(cands, N, sample=sample, generator=generator)
        child = parents.extend(step, depth)
        q = q_sel = None
        if sample:
            q = torch.softmax(cands.scores, dim=1)
            q_sel = q.gather(1, step.flat)
        valid = torch.isfinite(step.score) & (j <= g)[:, None]
        if j < G:
            logits, dcache, slots = tree_forward(draft, dcache, step_nodes(child, depth, "draft"),
                                                 max_chain=0)
            child = child.with_slots("draft", depth, slots)
            logp = log_probs(logits)
        steps.append(DraftStep(child, step.parent, valid, q, q_sel))
        parents = child
    return steps, beams, dcache


def verify_phase(target: torch.nn.Module, tcache: TreeCache | None, beams: Beams, t: Tensor,
                 steps: list[DraftStep], prompts: list[list[int]], index: ItemIndex
                 ) -> tuple[Tensor, list[Tensor], Beams, list[DraftStep], TreeCache]:
    """ONE target forward over [prompt | pending beam tokens] + all drafted tokens (a tree).

    Returns (target log-probs in column space (``column_log_probs``) after the current beams
    [B, K, C] and after each step's drafted beams [B, N, C] per step, beams and steps with target
    cache slots filled in, the cache).
    """
    B, L = beams.tokens.shape[0], beams.tokens.shape[2]

    def drafted_nodes(last: Tensor, offset: int) -> Nodes:
        parts, starts = [], []
        for j, s in enumerate(steps, start=1):
            d = (t + j - 1).clamp(max=L - 1)
            tok = s.beams.tokens.gather(2, d[:, None, None].expand(B, s.parent.shape[1], 1)).squeeze(-1)
            parent = last.gather(1, s.parent) if j == 1 else starts[-1] + s.parent
            starts.append(offset + sum(p.tokens.shape[1] for p in parts))
            parts.append(Nodes(tok, d[:, None].expand_as(tok), parent, s.beams.slots["target"], s.valid))
        if not parts:
            z = torch.zeros(B, 0, dtype=torch.long, device=t.device)
            return Nodes(z, z, z, z[..., None].expand(B, 0, L), z.bool())
        return Nodes(*(torch.cat([getattr(p, f) for p in parts], 1)
                       for f in ("tokens", "depth", "parent", "cached", "valid")))

    root_logp, node_logits, slots, _, beams, tcache = feed(
        target, tcache, beams, t, "target", prompts, drafted_nodes, extra_levels=len(steps))
    root_logp = column_log_probs(root_logp, t.clamp(max=L - 1), index)
    step_logp = []
    parents = beams
    new_steps = []
    start = 0
    for j, s in enumerate(steps, start=1):
        n = s.parent.shape[1]
        step_logp.append(column_log_probs(log_probs(node_logits[:, start:start + n]),
                                          (t + j).clamp(max=L - 1), index))
        # target slots along the drafted path: parent's, plus this node's own
        own = slots[:, start:start + n]
        tslots = take(parents.slots["target"], s.parent)
        d = (t + j - 1).clamp(max=L - 1)[:, None, None].expand(B, n, 1)
        tslots = tslots.scatter(2, d, torch.where(s.valid, own, -1)[..., None])
        child = replace(s.beams, slots={**s.beams.slots, "target": tslots})
        new_steps.append(replace(s, beams=child))
        parents = child
        start += n
    return root_logp, step_logp, beams, new_steps, tcache


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


def accept_relaxed(cands: Candidates, d_flat: Tensor, step: DraftStep, cur_idx: Tensor, K: int,
                   drafted: Tensor, generator: torch.Generator | None) -> tuple[Step, Tensor, Tensor]:
    """Accept drafted beam y with probability min(1, p(y)/q(y)).

    ``drafted`` [B] is False for requests with nothing drafted at this step: they sample from p.
    Returns (the step taken if this is where the round stops: the accepted beams plus draws from
    norm(max(p - q, 0)); whether >= K were accepted [B]; K accepted drafted beams [B, K])."""
    B, F = cands.scores.shape
    C = cands.num_columns
    p = torch.softmax(cands.scores, dim=1)  # [B, K * C] target's beam-sampling distribution
    n_prev = step.q.shape[1] // C
    q = take(step.q.view(B, n_prev, C), cur_idx).reshape(B, F)  # draft's, in target space
    q = q * drafted[:, None]
    p_y = torch.where(d_flat >= 0, p.gather(1, d_flat.clamp(min=0)), 0.0)
    u = torch.rand(p_y.shape, generator=generator, device=p_y.device, dtype=p_y.dtype)
    accepted = (d_flat >= 0) & (u * step.q_sel < p_y)  # [B, N]
    enough = accepted.sum(1) >= K
    pick = torch.rand(p_y.shape, generator=generator, device=p_y.device, dtype=p_y.dtype)
    chosen = torch.where(accepted, pick, -1.0).topk(K, dim=1).indices  # K random accepted ones
    # where the round stops: keep every accepted beam, fill up from the residual distribution
    is_acc = torch.zeros(B, F + 1, dtype=torch.bool, device=p.device)
    is_acc.scatter_(1, torch.where(accepted, d_flat, F), True)
    is_acc = is_acc[:, :F]
    resid = (p - q).clamp(min=0).masked_fill(is_acc, 0.0)
    empty = resid.sum(1, keepdim=True) <= 0
    resid = torch.where(empty, p.masked_fill(is_acc, 0.0), resid)
    key = torch.log(resid) + gumbel_like(resid, generator)
    key = key.masked_fill(is_acc, float("inf"))
    return choose(cands, key, K), enough, chosen


def accept_round(beams: Beams, root_logp: Tensor, step_logp: list[Tensor], steps: list[DraftStep],
                 t: Tensor, g: Tensor, index: ItemIndex, K: int, sample: bool,
                 generator: torch.Generator | None) -> tuple[Beams, Tensor]:
    """Walk the drafted steps with the target's column log-probs (``verify_phase``); return the K
    new beams per request and the number of accepted steps [B] (``accepted + 1`` tokens longer)."""
    L, C, G = index.L, index.num_columns, len(steps)
    cur, cur_logp = beams, root_logp
    cur_idx = torch.arange(K, device=t.device).expand(t.shape[0], K)
    n_prev = K
    acc = torch.zeros_like(t)
    stopped = torch.zeros_like(t, dtype=torch.bool)
    final = beams
    for j in range(1, G + 2):
        depth = (t + j - 1).clamp(max=L - 1)
        cands = expand_columns(cur_logp, cur.scores, cur.node, depth, index)
        if j <= G:
            s = steps[j - 1]
            d_flat = drafted_flat(s, cur_idx, n_prev, depth, index, C)
            if sample:
                stop_step, ok, nxt = accept_relaxed(cands, d_flat, s, cur_idx, K, j <= g, generator)
            else:
                stop_step, ok, nxt = accept_strict(cands, d_flat, K)
            ok = ok & (j <= g)
        else:  # bonus step (or the last step of a request with nothing drafted)
            stop_step = beam_step(cands, K, sample=sample, generator=generator)
            ok = torch.zeros_like(stopped)
        stop = ~stopped & ~ok
        final = where_rows(stop, cur.extend(stop_step, depth), final)
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
        cur_logp = take(step_logp[j - 1], nxt_c)
        cur_idx, n_prev = nxt, s.parent.shape[1]
    return final, acc


# ---------------------------------------------------------------------------------------------
# The loop, written once. It is a generator ("sans-IO"): it yields the model calls it needs
# (ProposeCall, VerifyCall, EndRoundCall) and receives their replies through ``send``. A driver
# answers them: ``LocalModels`` with in-process models and tree caches (offline decoding), the
# serving ingress with DeploymentHandle calls to remote replicas (stateless rounds).


@dataclass
class ProposeCall:
    """Draft side: reply ``(steps, beams)`` as ``draft_phase`` returns them (without the cache)."""

    beams: Beams  # [B, K, L] current beams
    t: Tensor  # [B] tokens generated so far
    g: Tensor  # [B] drafted steps usable per request
    G: int  # max(g): number of draft steps to run
    prompts: list[list[int]]  # [B] prompt token ids of the active requests
    N: int  # draft width
    sample: bool  # relaxed mode: sample N without replacement instead of top N
    generator: torch.Generator | None


@dataclass
class Verified:
    """Reply to a VerifyCall (``verify_phase`` without the cache)."""

    root_logp: Tensor  # [B, K, C] target column log-probs after the current beams
    step_logp: list[Tensor]  # per drafted step: [B, N, C] after each drafted beam
    beams: Beams  # the current beams (target slots may be filled in)
    steps: list[DraftStep]  # the drafted steps (target slots may be filled in)


@dataclass
class VerifyCall:
    """Target side: ONE forward over the drafted tree; reply a ``Verified``."""

    beams: Beams  # [B, K, L]
    t: Tensor  # [B]
    steps: list[DraftStep]  # G steps of [B, N] drafted beams (may be empty)
    prompts: list[list[int]]


@dataclass
class EndRoundCall:
    """After acceptance: caches may drop rejected branches (reply: ``beams`` with renumbered
    slots) and finished requests (``keep`` [B'] = rows that stay active, None = all stay)."""

    beams: Beams
    keep: Tensor | None


ModelCall = ProposeCall | VerifyCall | EndRoundCall
SpeculativeLoop = Generator[ModelCall, object, DecodeResult]


def check_args(k: int, draft_beams: int | None, gamma: int, mode: str) -> int:
    """Validate the search parameters; return the draft width N."""
    N = k if draft_beams is None else draft_beams
    if k < 1 or N < k:
        raise ValueError(f"need 1 <= k <= draft_beams, got k={k}, draft_beams={N}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    check_choice(mode, MODES, "mode")
    return N


def speculative_loop(
    prompts: list[list[int]],
    index: ItemIndex,
    k: int,
    draft_beams: int | None = None,
    gamma: int = 3,
    mode: Mode = "strict",
    generator: torch.Generator | None = None,
    keep_cache: bool = True,
    dtype: torch.dtype = torch.float32,
) -> SpeculativeLoop:
    """The speculative beam search loop over ``prompts``; model calls are yielded (see above).

    ``index`` must be on the device the beams live on; ``dtype`` is the beam score dtype
    (``score_dtype(target)``). With ``keep_cache=False`` every round starts with no cached token
    (``forget_slots``): the draft and the target recompute prompt and beams in each forward.
    ``stats`` of the result: per-request lists target_calls, draft_calls, rounds, accepted_steps.
    """
    N = check_args(k, draft_beams, gamma, mode)
    sample = mode == "relaxed"
    device = index.device
    B, L, K = len(prompts), index.L, k
    beams = root_beams(B, K, L, ["target", "draft"], device, dtype)
    t = torch.zeros(B, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)  # original request of each active row
    out_tokens = torch.zeros(B, K, L, dtype=torch.long, device=device)
    out_scores = torch.full((B, K), float("-inf"), dtype=dtype, device=device)
    stats = {n: torch.zeros(B, dtype=torch.long, device=device)
             for n in ("target_calls", "draft_calls", "rounds", "accepted_steps")}
    active_prompts = prompts
    while rows.numel() > 0:
        if not keep_cache:
            beams = forget_slots(beams)
        g = (L - 1 - t).clamp(max=gamma)  # drafted steps usable per request
        G = int(g.max())
        steps: list[DraftStep] = []
        if G > 0:
            reply = yield ProposeCall(beams, t, g, G, active_prompts, N, sample, generator)
            steps, beams = reply  # type: ignore[misc]
        verified = yield VerifyCall(beams, t, steps, active_prompts)
        assert isinstance(verified, Verified)
        beams, steps = verified.beams, verified.steps
        beams, acc = accept_round(beams, verified.root_logp, verified.step_logp, steps, t, g,
                                  index, K, sample, generator)
        t = t + acc + 1
        stats["rounds"][rows] += 1
        stats["target_calls"][rows] += 1
        stats["draft_calls"][rows] += torch.where(g > 0, G, 0)
        stats["accepted_steps"][rows] += acc
        # ---- drop rejected branches from the caches, retire finished requests
        done = t >= L
        keep = (~done).nonzero().flatten() if bool(done.any()) else None
        beams = yield EndRoundCall(beams, keep)  # type: ignore[assignment]
        if keep is not None:
            out_tokens[rows[done]] = beams.tokens[done]
            out_scores[rows[done]] = beams.scores[done].to(out_scores.dtype)
            beams, t, rows = beams.select_rows(keep), t[keep], rows[keep]
            active_prompts = [active_prompts[i] for i in keep.tolist()]
    if sample:  # best first by the target's score
        order = out_scores.argsort(dim=1, descending=True, stable=True)
        out_scores = out_scores.gather(1, order)
        out_tokens = take(out_tokens, order)
    items = torch.where(torch.isfinite(out_scores), index.items_of(out_tokens), -1)
    return DecodeResult(items.tolist(), out_tokens, out_scores,
                        {n: v.tolist() for n, v in stats.items()})


def run_loop(loop: SpeculativeLoop, answer: Callable[[ModelCall], object]) -> DecodeResult:
    """Drive ``loop`` to its end, answering each yielded call with ``answer(call)``."""
    try:
        call = next(loop)
        while True:
            call = loop.send(answer(call))
    except StopIteration as stop:
        return stop.value


class LocalModels:
    """Answers the loop's calls with in-process models, keeping one tree cache per model."""

    def __init__(self, target: torch.nn.Module, draft: torch.nn.Module, index: ItemIndex,
                 keep_cache: bool = True):
        self.target, self.draft, self.index, self.keep_cache = target, draft, index, keep_cache
        self.tcache: TreeCache | None = None
        self.dcache: TreeCache | None = None

    def __call__(self, call: ModelCall) -> object:
        if isinstance(call, ProposeCall):
            if not self.keep_cache:
                self.dcache = None
            steps, beams, self.dcache = draft_phase(
                self.draft, self.dcache, call.beams, call.t, call.g, call.G, call.prompts,
                self.index, call.N, call.sample, call.generator)
            return steps, beams
        if isinstance(call, VerifyCall):
            if not self.keep_cache:
                self.tcache = None
            root_logp, step_logp, beams, steps, self.tcache = verify_phase(
                self.target, self.tcache, call.beams, call.t, call.steps, call.prompts, self.index)
            return Verified(root_logp, step_logp, beams, steps)
        assert isinstance(call, EndRoundCall)
        beams, keep = call.beams, call.keep
        assert self.tcache is not None
        if keep is not None:  # finished requests leave first: their rows are not compacted
            self.tcache = self.tcache.select_rows(keep)
            if self.dcache is not None:
                self.dcache = self.dcache.select_rows(keep)
            if keep.numel() == 0:  # the last round: nothing left to compact
                return beams
        for name, cache in (("target", self.tcache), ("draft", self.dcache)):
            if cache is not None:
                slots = beams.slots[name]  # [B, K, L]
                beams.slots[name] = (cache.compact(slots) if keep is None
                                     else slots.index_put((keep,), cache.compact(slots[keep])))
        return beams


@torch.no_grad()
def speculative_beam_search(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    prompts: list[list[int]],
    index: ItemIndex,
    k: int,
    draft_beams: int | None = None,
    gamma: int = 3,
    mode: Mode = "strict",
    generator: torch.Generator | None = None,
    keep_cache: bool = True,
) -> DecodeResult:
    """Top-``k`` items per prompt by speculative beam search (see the module docstring).

    ``stats`` holds per-request lists: target_calls, draft_calls, rounds, accepted_steps.
    ``keep_cache=False`` runs every round stateless (prompt and beams recomputed each forward):
    the same result, the mode used when draft and target are remote replicas without caches.
    """
    check_args(k, draft_beams, gamma, mode)
    index = index.to(next(target.parameters()).device)
    loop = speculative_loop(prompts, index, k, draft_beams, gamma, mode, generator, keep_cache,
                            score_dtype(target))
    return run_loop(loop, LocalModels(target, draft, index, keep_cache))
