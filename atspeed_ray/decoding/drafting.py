"""The draft's half of a round: a width-N beam search (strict: top N; relaxed: N samples without
replacement from the softmax over cumulative scores) from the K current beams, ``g`` steps per
request (``G = max(g)`` draft forwards). Every step's beams and parent pointers are kept: they are
the tree the target verifies in one forward.

Strict mode may end a round with *children steps* (``SearchParams.expand_last``): instead of
the draft's top N, a step holds every trie child of the step before it. From the first step after
which every step left holds at most ``expand_last`` children per request, the round ends with
such steps (the last alone where only it is narrow; on Beauty codes 3 and 4 below a drafted code
2; a round's first step is drafted unless it is its only one). They need no draft scores, so no
draft forward scores them, and verification accepts each whenever the step before is accepted:
the target's own top-K at that step can only be children of its top-K before it. They pay where
the trie is narrow (Beauty: 1.7 children per prefix at the third code, 72 at the second).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.beam import (
    Beams, Step, beam_step, choose, expand, expand_columns, log_probs, row_slices, step_nodes,
)
from atspeed_ray.decoding.decoder import head_columns
from atspeed_ray.decoding.feed import Context, feed
from atspeed_ray.decoding.noise import gumbel
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.decoding.cache import TreeCache
from atspeed_ray.decoding.tree import tree_forward


def _cat_opt(xs: Sequence[Tensor | None]) -> Tensor | None:
    return None if any(x is None for x in xs) else torch.cat(list(xs))  # type: ignore[arg-type]


@dataclass
class DraftStep:
    """The N beams the draft proposes at one step."""

    beams: Beams  # [B, N] beams (scores: target prefix score + draft log-probs)
    parent: Tensor  # [B, N] index of the parent among the previous step's beams
    valid: Tensor  # [B, N] bool: a real proposal the target may accept
    q: Tensor | None  # relaxed: [B, M_prev * C] draft sampling distribution over extensions
    q_sel: Tensor | None  # relaxed: [B, N] draft probability of each proposal
    children: bool = False  # every trie child of the previous step (no draft forward scored it)

    def select_rows(self, rows: Tensor | slice) -> DraftStep:
        """Requests ``rows`` only."""
        return DraftStep(self.beams.select_rows(rows), self.parent[rows], self.valid[rows],
                         None if self.q is None else self.q[rows],
                         None if self.q_sel is None else self.q_sel[rows], self.children)

    def to(self, device: torch.device) -> DraftStep:
        return DraftStep(self.beams.to(device), self.parent.to(device), self.valid.to(device),
                         None if self.q is None else self.q.to(device),
                         None if self.q_sel is None else self.q_sel.to(device), self.children)

    def widen(self, width: int) -> DraftStep:
        """The same proposals in ``width`` >= N columns, the extra ones invalid (a strict step,
        so that steps of different widths stack: a children step's width varies by request)."""
        B, N = self.parent.shape
        if width == N:
            return self
        assert self.q is None and width > N, "only a strict step widens"
        pad = torch.zeros(B, width - N, dtype=torch.long, device=self.parent.device)
        beams = self.beams.take(torch.cat([torch.arange(N, device=pad.device).expand(B, N), pad], 1))
        return DraftStep(beams, torch.cat([self.parent, pad], 1),
                         torch.cat([self.valid, pad.bool()], 1), None, None, self.children)

    def split(self, sizes: list[int]) -> list[DraftStep]:
        """Consecutive groups of ``sizes`` requests (the inverse of ``DraftStep.cat``)."""
        return [self.select_rows(rows) for rows in row_slices(sizes)]

    @staticmethod
    def cat(parts: Sequence[DraftStep]) -> DraftStep:
        """The requests of ``parts`` stacked (the sampling distributions only if all have them)."""
        return DraftStep(Beams.cat([p.beams for p in parts]), torch.cat([p.parent for p in parts]),
                         torch.cat([p.valid for p in parts]), _cat_opt([p.q for p in parts]),
                         _cat_opt([p.q_sel for p in parts]), all(p.children for p in parts))


def children_width(parents: Beams, usable: Tensor, index: ItemIndex, cap: int) -> int | None:
    """The width of a step holding every trie child of ``parents`` [B, M] in the requests where
    ``usable`` [B]; None when some request has more than ``cap`` of them (or none has any)."""
    n = ((index.child_table(parents.node) >= 0).sum((1, 2)) * usable).max()  # one host sync
    width = int(n)
    return width if 0 < width <= cap else None


def children_step(parents: Beams, depth: Tensor, index: ItemIndex, width: int) -> Step:
    """Every trie child of ``parents`` [B, M] at ``depth`` [B], in ``width`` columns (the
    children's score is their parent's: no draft scored them; invalid columns are -inf)."""
    B, M = parents.scores.shape
    flat = torch.zeros(B, M, index.num_columns, dtype=parents.scores.dtype,
                       device=parents.scores.device)  # [B, M, C]
    cands = expand_columns(flat, parents.scores, parents.node, depth, index)
    return choose(cands, torch.isfinite(cands.scores).to(flat.dtype), width)  # real children first


def level_widths(params: SearchParams, depth: Tensor, drafting: Tensor) -> tuple[int, Tensor | None]:
    """The width of a drafted step whose requests draft code position ``depth`` [B] (those
    where ``drafting`` [B]): the widest of their levels' widths (``SearchParams.widths``), and
    each request's own width [B] (None when every level has the same width)."""
    if len(params.widths) == 1:
        return params.N, None
    table = torch.tensor(params.widths, device=depth.device)
    own = table[depth.clamp(max=len(params.widths) - 1)]  # [B]
    return int(torch.where(drafting, own, params.k).max()), own  # one host sync


def narrow(step: Step, own: Tensor) -> Step:
    """``step`` [B, W] with each request's columns past its own width ``own`` [B] dead (score
    -inf, no node): their proposals are not valid and they have no live children. Its columns
    are ordered by their key (``choose``), so a request keeps its own top ``own`` (relaxed: its
    first ``own`` draws without replacement), whatever W it was stacked at."""
    dead = torch.arange(step.score.shape[1], device=own.device)[None, :] >= own[:, None]  # [B, W]
    return replace(step, score=step.score.masked_fill(dead, float("-inf")),
                   node=step.node.masked_fill(dead, -1))


# score(beams, depth, parent) -> (log-probs after each beam [B, M, H] over the drafter's head,
# the beams with its cache slots recorded). ``parent`` [B, M]: each beam's parent among the
# beams scored last (None: the current beams, scored first; ``depth`` is then unused).
Scorer = Callable[[Beams, Tensor, Tensor | None], tuple[Tensor, Beams]]


def children_steps(parents: Beams, t: Tensor, g: Tensor, first: int, index: ItemIndex,
                   params: SearchParams) -> list[tuple[Step, Beams]] | None:
    """Steps ``first`` .. max(g) as children steps below ``parents`` [B, M] at ``t`` [B] tokens:
    each step's (Step, beams), when every one of them holds at most ``params.expand_last``
    trie children per request (counted where ``g`` [B] reaches it); None otherwise, or when
    children steps are off. One host sync per step tried."""
    if not params.expand_last:
        return None
    out = []
    for j in range(first, int(g.max()) + 1):
        width = children_width(parents, g >= j, index, params.expand_last)
        if width is None:
            return None
        depth = (t + j - 1).clamp(max=index.L - 1)
        step = children_step(parents, depth, index, width)
        parents = parents.extend(step, depth)
        out.append((step, parents))
    return out


def draft_tree(score: Scorer, beams: Beams, t: Tensor, g: Tensor, index: ItemIndex,
               params: SearchParams, head: Tensor | None, keys: Tensor | None = None
               ) -> tuple[list[DraftStep], Beams]:
    """``max(g)`` drafted steps from the K current ``beams`` [B, K, L] at ``t`` [B] tokens: a
    width-N beam search (or sampling) over the drafter's log-probs (``score``; ``head``: its
    head's token id -> column map, None for a full vocabulary). ``g`` [B]: drafted steps usable
    per request (later steps of a request are drafted but not valid). Strict, with
    ``SearchParams.expand_last``: once every step left can be a children step (each holding at
    most that many trie children per request), the round ends with them, and ``score`` is not
    called for any of them. The first step is drafted unless it is the round's only one (a
    round of children steps alone is the draft-free design: gamma 1). Returns the steps and
    the current beams as ``score`` recorded them. Relaxed: step j samples with draw j of each
    row's drafting key ``keys`` [B] (``ProposeCall.keys``; None: torch's generator)."""
    G = int(g.max())
    L = index.L
    tail = children_steps(beams, t, g, 1, index, params) if G == 1 else None
    logp = None
    if tail is None:  # children steps from the first need no scores: pending tokens wait
        logp, beams = score(beams, t - 1, None)
    steps: list[DraftStep] = []
    parents, j = beams, 0
    while tail is None and j < G:  # drafted steps, until the children steps that end the round
        j += 1
        depth = (t + j - 1).clamp(max=L - 1)  # requests with g < j draft nothing valid here
        q = q_sel = None
        assert logp is not None
        cands = expand(logp, parents.scores, parents.node, depth, index, head)
        width_j, own = level_widths(params, depth, j <= g)
        step = beam_step(cands, width_j, gumbel(keys, j, cands.scores) if params.sample else None)
        if own is not None:
            step = narrow(step, own)
        if params.sample:
            q = torch.softmax(cands.scores, dim=1)
            q_sel = q.gather(1, step.flat)
        child = parents.extend(step, depth)
        valid = torch.isfinite(step.score) & (j <= g)[:, None]
        if j < G:
            tail = children_steps(child, t, g, j + 1, index, params)
            if tail is None:
                logp, child = score(child, depth, step.parent)
        steps.append(DraftStep(child, step.parent, valid, q, q_sel))
        parents = child
    for j, (step, child) in enumerate(tail or [], start=len(steps) + 1):
        valid = torch.isfinite(step.score) & (j <= g)[:, None]
        steps.append(DraftStep(child, step.parent, valid, None, None, children=True))
    return steps, beams


def draft_phase(draft: torch.nn.Module, dcache: TreeCache | None, beams: Beams, t: Tensor,
                g: Tensor, prompts: list[list[int]], index: ItemIndex, params: SearchParams,
                keys: Tensor | None = None) -> tuple[list[DraftStep], Beams, TreeCache | None]:
    """A causal LM's drafting (``LMDrafter``): ``draft_tree`` scored by the draft's own forwards
    on its tree cache ``dcache``: the first over the beams' uncached tokens (the prompt too on a
    first or stateless call), then one per drafted step but a last children step.

    ``beams`` [B, K, L] at ``t`` [B] tokens; ``g`` [B] drafted steps usable per request;
    ``keys`` [B]: relaxed sampling's per-row keys (``ProposeCall.keys``). Returns
    the steps, the beams with the draft's cache slots recorded, and the draft's cache (still
    ``dcache``, maybe None, when the only step was a children step). A code-head draft
    (``head_columns``) scores over its head: log-softmax over the code tokens only.
    """
    cache = dcache

    def score(b: Beams, depth: Tensor, parent: Tensor | None) -> tuple[Tensor, Beams]:
        nonlocal cache
        if parent is None:
            fed = feed(draft, cache, b, t, "draft", prompts)
            cache = fed.cache
            return fed.front_logp, fed.beams
        logits, cache, slots = tree_forward(draft, cache, step_nodes(b, depth, "draft"),
                                            max_chain=0)
        return log_probs(logits), b.with_slots("draft", depth, slots)

    steps, beams = draft_tree(score, beams, t, g, index, params, head_columns(draft), keys)
    return steps, beams, cache


def draft_forwards(steps: list[DraftStep]) -> int:
    """Draft forwards that made ``steps``: one per step but the children steps that end them."""
    return sum(not s.children for s in steps)


# ---------------------------------------------------------------------------------------------
# The drafter contract. The speculative loop asks a drafter for a round's proposals with a
# ``ProposeCall``; whoever answers it (``LocalModels`` offline, the draft replica in serving)
# calls ``Drafter.propose`` with the drafter's own tree cache (None: none yet, or a stateless
# call). A draft kind is a ``Drafter`` (and a loader, ``atspeed_ray.drafts``): ``LMDrafter`` is
# every causal-LM draft (full vocabulary, code head, compact vocabulary: they differ in the
# model, not in how they draft).


@dataclass
class ProposeCall:
    """Draft side: reply ``(steps, beams)`` as ``Drafter.propose`` returns them (without the
    cache)."""

    beams: Beams  # [B, K, L] current beams (``beams.features``: the target's, where asked for)
    t: Tensor  # [B] tokens generated so far
    g: Tensor  # [B] drafted steps usable per request (max(g) >= 1 draft steps are run)
    prompts: list[list[int]]  # [B] prompt token ids of the active requests
    params: SearchParams  # N, mode (sample or top-N)
    context: Context | None = None  # the target's hidden states over the prompts, if asked for
    # relaxed, seeded: [B] int64 key of each row's drafting in this round
    # (``noise.round_streams``); None: unseeded (torch's default generator)
    keys: Tensor | None = None


@runtime_checkable
class Drafter(Protocol):
    """Proposes a round's drafted steps (``DraftStep``: N beams each, with parent pointers)."""

    @property
    def device(self) -> torch.device:
        """Where its tensors live (the beams it is given are moved there)."""

    @property
    def wants_features(self) -> bool:
        """Whether it reads the target's hidden states (``Beams.features``): the target then
        returns them from every verification pass."""

    def propose(self, call: ProposeCall, index: ItemIndex, cache: TreeCache | None
                ) -> tuple[list[DraftStep], Beams, TreeCache | None]:
        """``max(call.g)`` drafted steps from ``call.beams``; the beams with the drafter's cache
        slots recorded; its cache (or None)."""


@dataclass(frozen=True)
class LMDrafter:
    """A causal LM as the draft (``draft_phase``): its own width-N beam search (or sampling)."""

    model: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def wants_features(self) -> bool:
        return False

    def propose(self, call: ProposeCall, index: ItemIndex, cache: TreeCache | None
                ) -> tuple[list[DraftStep], Beams, TreeCache | None]:
        return draft_phase(self.model, cache, call.beams, call.t, call.g, call.prompts, index,
                           call.params, call.keys)


def as_drafter(draft: Drafter | torch.nn.Module) -> Drafter:
    """``draft`` itself if it is a ``Drafter``, else the causal LM ``draft`` as an ``LMDrafter``."""
    return draft if isinstance(draft, Drafter) else LMDrafter(draft)  # type: ignore[return-value]
