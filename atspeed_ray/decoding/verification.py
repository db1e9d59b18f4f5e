"""The target's half of a round: ONE forward over the current beams' uncached tokens and every
drafted token of every step, packed as a tree after the cached prefix (on the first round:
after the prompt). Tree attention gives the target's distribution after every drafted beam; the
replies are in column space (``column_log_probs``: the C code tokens of the next depth, not the
V-wide vocabulary), which is all acceptance reads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.beam import Beams, column_log_probs, log_probs, take
from atspeed_ray.decoding.drafting import DraftStep
from atspeed_ray.decoding.feed import Context, feed
from atspeed_ray.decoding.cache import TreeCache
from atspeed_ray.decoding.tree import Nodes


@dataclass
class Verified:
    """What verification gives acceptance."""

    root_logp: Tensor  # [B, K, C] target column log-probs after the current beams
    step_logp: list[Tensor]  # per drafted step: [B, N, C] after each drafted beam
    beams: Beams  # the current beams (target slots may be filled in)
    steps: list[DraftStep]  # the drafted steps (target slots may be filled in)
    # opaque per-node features (the target's hidden states, when a drafter wants them), at the
    # same places as the log-probs: root [B, K, F], per drafted step [B, N, F]
    root_features: Tensor | None = None
    step_features: list[Tensor] | None = None
    context: Context | None = None  # the prompt's hidden states, when this pass fed the prompt


def drafted_nodes(steps: list[DraftStep], t: Tensor, L: int, last: Tensor, offset: int) -> Nodes:
    """The drafted tree as nodes below the pending ones (``feed``'s ``build_extra``): step j's
    beams at depth t + j - 1, each below its parent of step j - 1 (step 1: below the current
    beam's last pending node ``last`` [B, K], -1 = the prompt's end); ``offset`` = chunk index of
    the first drafted node."""
    B = t.shape[0]
    parts: list[Nodes] = []
    start = offset
    for j, s in enumerate(steps, start=1):
        n = s.parent.shape[1]
        d = (t + j - 1).clamp(max=L - 1)
        tok = s.beams.tokens.gather(2, d[:, None, None].expand(B, n, 1)).squeeze(-1)  # [B, N]
        if j == 1:
            parent = last.gather(1, s.parent)
        else:
            parent = start + s.parent
            start += parts[-1].tokens.shape[1]
        parts.append(Nodes(tok, d[:, None].expand_as(tok), parent, s.beams.slots["target"], s.valid))
    return Nodes.cat(parts)


def with_target_slots(steps: list[DraftStep], beams: Beams, slots: Tensor, t: Tensor, L: int
                      ) -> list[DraftStep]:
    """The drafted steps with their target cache slots filled in: each drafted beam's path is
    its parent's, plus its own node's slot (``slots`` [B, sum N]: the drafted nodes in order)."""
    out, parents, start = [], beams, 0
    for j, s in enumerate(steps, start=1):
        B, n = s.parent.shape
        own = slots[:, start:start + n]
        tslots = take(parents.slots["target"], s.parent)
        d = (t + j - 1).clamp(max=L - 1)[:, None, None].expand(B, n, 1)
        tslots = tslots.scatter(2, d, torch.where(s.valid, own, -1)[..., None])
        child = replace(s.beams, slots={**s.beams.slots, "target": tslots})
        out.append(replace(s, beams=child))
        parents, start = child, start + n
    return out


def verify_phase(target: torch.nn.Module, tcache: TreeCache | None, beams: Beams, t: Tensor,
                 steps: list[DraftStep], prompts: list[list[int]], index: ItemIndex,
                 features: bool = False) -> tuple[Verified, TreeCache]:
    """ONE target forward over [prompt | pending beam tokens] + all drafted tokens (a tree).

    Returns the target's column log-probs after the current beams and after every drafted beam,
    with beams and steps whose target cache slots are filled in, and the target's cache;
    ``features``: its last-layer hidden states at the same places too.
    """
    L = index.L
    extra = partial(drafted_nodes, steps, t, L) if steps else None
    fed = feed(target, tcache, beams, t, "target", prompts, extra, extra_levels=len(steps),
               hidden=features)
    root_logp = column_log_probs(fed.front_logp, t.clamp(max=L - 1), index)
    step_logp, step_feat, start = [], [], 0
    for j, s in enumerate(steps, start=1):
        n = s.parent.shape[1]
        step_logp.append(column_log_probs(log_probs(fed.extra_logits[:, start:start + n]),
                                          (t + j).clamp(max=L - 1), index))
        if fed.extra_hidden is not None:
            step_feat.append(fed.extra_hidden[:, start:start + n])
        start += n
    steps = with_target_slots(steps, fed.beams, fed.slots, t, L)
    return Verified(root_logp, step_logp, fed.beams, steps, fed.front_hidden,
                    step_feat if features else None, fed.context), fed.cache
