"""One forward of a model over the beams' tokens that its tree cache does not hold yet.

A beam's path is cached up to some depth (``Beams.slots[name]`` says where each token sits, -1
= not cached); the rest of it is *pending*. ``feed`` packs every beam's pending tokens as tree
nodes (optionally with more nodes below them: the drafted tree of a verification pass), runs one
tree-attention forward and records where the fed tokens now sit. Used by both the draft
(``drafting``) and the target (``verification``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from atspeed_ray.decoding.beam import Beams, log_probs, prefill_decode, take
from atspeed_ray.decoding.cache import TreeCache
from atspeed_ray.decoding.tree import Nodes, tree_decode

# build_extra(last, offset) -> nodes below the pending ones (see ``feed``)
ExtraNodes = Callable[[Tensor, int], Nodes]


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


@dataclass
class Context:
    """The target's last-layer hidden states over each request's (left-padded) prompt: opaque to
    the core, for a drafter that reads them (``Drafter.wants_features``)."""

    features: Tensor  # [B, P, E]
    valid: Tensor  # [B, P] bool: a real prompt token

    def select_rows(self, rows: Tensor) -> Context:
        return Context(self.features[rows], self.valid[rows])

    def to(self, device: torch.device) -> Context:
        return Context(self.features.to(device), self.valid.to(device))


def prompt_valid(prompts: list[list[int]], P: int, device: torch.device) -> Tensor:
    """[B, P] bool: the real tokens of ``prompts`` left-padded to ``P`` columns."""
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    return torch.arange(P, device=device) >= (P - lengths)[:, None]


@dataclass
class Fed:
    """What one ``feed`` forward gives."""

    front_logp: Tensor  # [B, M, V] log-probs after each beam (its last token, or the prompt's end)
    extra_logits: Tensor  # [B, T', V] logits of the extra nodes
    slots: Tensor  # [B, T'] cache slots of the extra nodes
    beams: Beams  # the beams with their fed tokens' slots recorded
    cache: TreeCache
    front_hidden: Tensor | None = None  # [B, M, E] hidden states where front_logp was read
    extra_hidden: Tensor | None = None  # [B, T', E] hidden states of the extra nodes
    context: Context | None = None  # the prompt's hidden states (when the prompt went in)


def feed(model: torch.nn.Module, cache: TreeCache | None, beams: Beams, t: Tensor, name: str,
         prompts: list[list[int]], build_extra: ExtraNodes | None = None, extra_levels: int = 0,
         hidden: bool = False) -> Fed:
    """One forward of ``model`` over the beams' uncached tokens (+ extra tree nodes).

    With ``cache=None`` the prompt goes in first and nothing needs to be cached: that is the first
    round, or a stateless call (beams whose ``slots[name]`` are all -1).
    ``build_extra(last, offset)`` returns nodes hanging below the pending ones (``last`` [B, M]:
    index of each beam's last pending node, -1 if its front is the prompt's end; ``offset``: the
    chunk index of the first extra node) in ``extra_levels`` levels. ``hidden``: the model's
    last-layer hidden states at the same places as the logits, too, and over the prompt when it
    goes in (``Fed.context``).
    """
    pend, last, depth = pending_nodes(beams, t, name)
    offset = pend.tokens.shape[1]
    nodes = pend if build_extra is None else Nodes.cat([pend, build_extra(last, offset)])
    max_chain = depth.shape[2] + extra_levels  # longest in-chunk ancestor chain
    at = last.clamp(min=0)

    def front(x: Tensor, prompt_end: Tensor | None) -> Tensor:  # [B, T, ...] -> [B, M, ...]
        if prompt_end is None:
            return take(x, at)
        return torch.where((last >= 0).view(*last.shape, *([1] * (x.dim() - 2))), take(x, at),
                           prompt_end[:, None])

    ctx = None
    if cache is None:
        out, cache, slots = prefill_decode(model, prompts, nodes, max_chain, hidden, context=hidden)
        logits, h = out.logits[:, 1:], None if out.hidden is None else out.hidden[:, 1:]
        end_logits, end_h = out.logits[:, 0], None if out.hidden is None else out.hidden[:, 0]
        if out.context is not None:
            P = cache.prompt_cols
            ctx = Context(out.context[:, :P], prompt_valid(prompts, P, out.context.device))
    else:
        out, cache, slots = tree_decode(model, cache, nodes, max_chain=max_chain, hidden=hidden)
        logits, h, end_logits, end_h = out.logits, out.hidden, None, None
    beams = record_pending(beams, name, pend, depth, slots[:, :offset])
    return Fed(log_probs(front(logits, end_logits)), logits[:, offset:], slots[:, offset:], beams,
               cache, None if h is None else front(h, end_h),
               None if h is None else h[:, offset:], ctx)
