"""The draft's half of a round: a width-N beam search (strict: top N; relaxed: N samples without
replacement from the softmax over cumulative scores) from the K current beams, ``g`` steps per
request (``G = max(g)`` draft forwards). Every step's beams and parent pointers are kept: they are
the tree the target verifies in one forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.beam import (
    Beams, beam_step, expand, head_columns, log_probs, row_slices, step_nodes,
)
from atspeed_ray.decoding.feed import feed
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.decoding.tree import TreeCache, tree_forward


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

    def select_rows(self, rows: Tensor | slice) -> DraftStep:
        """Requests ``rows`` only."""
        return DraftStep(self.beams.select_rows(rows), self.parent[rows], self.valid[rows],
                         None if self.q is None else self.q[rows],
                         None if self.q_sel is None else self.q_sel[rows])

    def to(self, device: torch.device) -> DraftStep:
        return DraftStep(self.beams.to(device), self.parent.to(device), self.valid.to(device),
                         None if self.q is None else self.q.to(device),
                         None if self.q_sel is None else self.q_sel.to(device))

    def split(self, sizes: list[int]) -> list[DraftStep]:
        """Consecutive groups of ``sizes`` requests (the inverse of ``DraftStep.cat``)."""
        return [self.select_rows(rows) for rows in row_slices(sizes)]

    @staticmethod
    def cat(parts: Sequence[DraftStep]) -> DraftStep:
        """The requests of ``parts`` stacked (the sampling distributions only if all have them)."""
        return DraftStep(Beams.cat([p.beams for p in parts]), torch.cat([p.parent for p in parts]),
                         torch.cat([p.valid for p in parts]), _cat_opt([p.q for p in parts]),
                         _cat_opt([p.q_sel for p in parts]))


def draft_phase(draft: torch.nn.Module, dcache: TreeCache | None, beams: Beams, t: Tensor,
                g: Tensor, prompts: list[list[int]], index: ItemIndex, params: SearchParams
                ) -> tuple[list[DraftStep], Beams, TreeCache]:
    """``max(g)`` draft forwards: a width-N beam search (or sampling) from the K current beams.

    ``beams`` [B, K, L] at ``t`` [B] tokens; ``g`` [B] drafted steps usable per request (later
    steps of a request are drafted but not valid). Returns the steps, the beams with the draft's
    cache slots recorded, and the draft's cache. A code-head draft (``head_columns``) scores
    over its head: log-softmax over the code tokens only.
    """
    G = int(g.max())
    generator = params.generator if params.sample else None
    logp, _, _, beams, dcache = feed(draft, dcache, beams, t, "draft", prompts)
    steps: list[DraftStep] = []
    parents = beams
    L, head = index.L, head_columns(draft)
    for j in range(1, G + 1):
        depth = (t + j - 1).clamp(max=L - 1)  # requests with g < j draft nothing valid here
        cands = expand(logp, parents.scores, parents.node, depth, index, head)
        step = beam_step(cands, params.N, sample=params.sample, generator=generator)
        child = parents.extend(step, depth)
        q = q_sel = None
        if params.sample:
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
