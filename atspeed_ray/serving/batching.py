"""Replica-side work, batched over concurrent requests. Pure torch: no Ray here.

The ingress runs the decoding core's loop (``speculative_loop``) once per HTTP request and sends
the loop's ``ProposeCall`` / ``VerifyCall`` to the replicas as ``DraftRequest`` / ``VerifyRequest``.
A replica's ``@serve.batch`` method gets a list of them, and the functions here stack the
requests along the batch dimension, run the core's ``draft_phase`` / ``verify_phase`` /
``beam_search`` ONCE for the group (each request keeps its own progress ``t``), and split the
result back per request.

Calls are stateless: no KV cache outlives a call. The beams arrive with every cache slot
forgotten (``forget_slots``), so each forward recomputes prompt + beams (``feed`` with
``cache=None``). Requests that cannot be stacked (a different k or draft width, or a seeded
relaxed request whose random stream must stay its own) run as separate groups of the same batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.beam import Beams, beam_search
from atspeed_ray.decoding.speculative import DraftStep, ProposeCall, VerifyCall, draft_phase, verify_phase

T = TypeVar("T")


# ------------------------------------------------------------------------------ payloads
@dataclass
class DraftRequest:
    """A ProposeCall on the wire."""

    beams: Beams  # [B, K, L]
    t: Tensor  # [B]
    g: Tensor  # [B]
    G: int
    prompts: list[list[int]]  # [B]
    N: int
    sample: bool
    generator_state: Tensor | None  # seeded relaxed request: its generator's state

    @classmethod
    def of(cls, call: ProposeCall, seeded: bool) -> "DraftRequest":
        state = call.generator.get_state() if (seeded and call.generator is not None) else None
        return cls(call.beams, call.t, call.g, call.G, call.prompts, call.N, call.sample, state)


@dataclass
class DraftReply:
    steps: list[DraftStep]  # G steps of [B, N] beams
    beams: Beams  # [B, K, L]
    generator_state: Tensor | None  # the seeded generator's state after drafting
    compute_ms: float = 0.0  # time of the batched call this request was part of


@dataclass
class VerifyRequest:
    """A VerifyCall on the wire (drafted steps without the draft's sampling distributions)."""

    beams: Beams  # [B, K, L]
    t: Tensor  # [B]
    steps: list[DraftStep]  # G steps of [B, N]
    prompts: list[list[int]]

    @classmethod
    def of(cls, call: VerifyCall) -> "VerifyRequest":
        return cls(slim(call.beams), call.t, [slim_step(s) for s in call.steps], call.prompts)


@dataclass
class VerifyReply:
    root_logp: Tensor  # [B, K, C] column log-probs (C code columns, not the V-wide vocabulary)
    step_logp: list[Tensor]  # G x [B, N, C]
    compute_ms: float = 0.0


@dataclass
class BeamRequest:
    prompts: list[list[int]]
    k: int


@dataclass
class BeamReply:
    items: list[list[int]]  # [B][k]
    scores: Tensor  # [B, k]
    compute_ms: float = 0.0


def slim(b: Beams) -> Beams:
    """Only what the target reads: drop the draft's slots."""
    return Beams(b.tokens, b.scores, b.node, {"target": b.slots["target"]})


def slim_step(s: DraftStep) -> DraftStep:
    return DraftStep(slim(s.beams), s.parent, s.valid, None, None)


# ------------------------------------------------------------------------------ stacking
def cat_beams(parts: Sequence[Beams]) -> Beams:
    return Beams(torch.cat([p.tokens for p in parts]), torch.cat([p.scores for p in parts]),
                 torch.cat([p.node for p in parts]),
                 {k: torch.cat([p.slots[k] for p in parts]) for k in parts[0].slots})


def split_beams(b: Beams, sizes: list[int]) -> list[Beams]:
    out, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        out.append(Beams(b.tokens[rows], b.scores[rows], b.node[rows],
                         {k: v[rows] for k, v in b.slots.items()}))
        start += n
    return out


def _cat_opt(xs: Sequence[Tensor | None]) -> Tensor | None:
    return None if any(x is None for x in xs) else torch.cat(list(xs))  # type: ignore[arg-type]


def cat_step(parts: Sequence[DraftStep]) -> DraftStep:
    return DraftStep(cat_beams([p.beams for p in parts]), torch.cat([p.parent for p in parts]),
                     torch.cat([p.valid for p in parts]), _cat_opt([p.q for p in parts]),
                     _cat_opt([p.q_sel for p in parts]))


def split_step(s: DraftStep, sizes: list[int]) -> list[DraftStep]:
    beams = split_beams(s.beams, sizes)
    out, start = [], 0
    for n, b in zip(sizes, beams):
        rows = slice(start, start + n)
        out.append(DraftStep(b, s.parent[rows], s.valid[rows],
                             None if s.q is None else s.q[rows],
                             None if s.q_sel is None else s.q_sel[rows]))
        start += n
    return out


def pad_steps(steps: list[DraftStep], beams: Beams, N: int, G: int) -> list[DraftStep]:
    """Extend ``steps`` to ``G`` steps with invalid ones (seen by no node, accepted by no one).

    A request with fewer drafted steps can then share a verify forward with longer ones; its
    extra steps change nothing (invalid tree nodes only attend to themselves)."""
    out = list(steps)
    prev = out[-1].beams if out else beams
    B = beams.tokens.shape[0]
    while len(out) < G:
        zero = torch.zeros(B, N, dtype=torch.long, device=beams.tokens.device)
        dummy = prev.take(zero)  # [B, N, L]
        out.append(DraftStep(dummy, zero, torch.zeros(B, N, dtype=torch.bool, device=zero.device),
                             None, None))
        prev = dummy
    return out


def to_device(x: T, device: torch.device) -> T:
    """Move tensors inside beams, steps, lists and payloads to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device)  # type: ignore[return-value]
    if isinstance(x, Beams):
        return Beams(x.tokens.to(device), x.scores.to(device), x.node.to(device),  # type: ignore[return-value]
                     {k: v.to(device) for k, v in x.slots.items()})
    if isinstance(x, DraftStep):
        return DraftStep(to_device(x.beams, device), x.parent.to(device), x.valid.to(device),  # type: ignore[return-value]
                         None if x.q is None else x.q.to(device),
                         None if x.q_sel is None else x.q_sel.to(device))
    if isinstance(x, list):
        return [to_device(v, device) for v in x]  # type: ignore[return-value]
    return x


def group_by(items: Sequence[T], key: Callable[[T], Hashable]) -> list[list[int]]:
    """Indices of ``items`` grouped by ``key``, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(key(it), []).append(i)
    return list(groups.values())


# ------------------------------------------------------------------------------ the work
@torch.no_grad()
def draft_batch(model: torch.nn.Module, index: ItemIndex, reqs: Sequence[DraftRequest],
                generator: torch.Generator | None = None) -> list[DraftReply]:
    """``draft_phase`` over a batch of requests (``index`` on the model's device)."""
    device = next(model.parameters()).device
    out: list[DraftReply | None] = [None] * len(reqs)

    def key(r: DraftRequest) -> Hashable:
        seeded = id(r) if r.generator_state is not None else None  # a seeded stream runs alone
        return (r.beams.tokens.shape[1], r.N, r.sample, seeded)

    for idx in group_by(reqs, key):
        t0 = time.perf_counter()
        group = [reqs[i] for i in idx]
        first = group[0]
        sizes = [r.beams.tokens.shape[0] for r in group]
        beams = to_device(cat_beams([r.beams for r in group]), device)
        t = torch.cat([r.t for r in group]).to(device)
        g = torch.cat([r.g for r in group]).to(device)
        G = max(r.G for r in group)
        prompts = [p for r in group for p in r.prompts]
        gen = generator
        if first.generator_state is not None:
            gen = torch.Generator(device=device)
            gen.set_state(first.generator_state)
        steps, beams, _ = draft_phase(model, None, beams, t, g, G, prompts, index, first.N,
                                      first.sample, gen if first.sample else None)
        steps = to_device(steps, torch.device("cpu"))
        per_step = [split_step(s, sizes) for s in steps]  # [G][request]
        for j, (i, r, b) in enumerate(zip(idx, group, split_beams(to_device(beams, torch.device("cpu")), sizes))):
            own = [per_step[s][j] for s in range(r.G)]  # a request keeps its own G steps
            state = gen.get_state() if first.generator_state is not None and gen is not None else None
            out[i] = DraftReply(own, b, state, (time.perf_counter() - t0) * 1000)
    return out  # type: ignore[return-value]


@torch.no_grad()
def verify_batch(model: torch.nn.Module, index: ItemIndex, reqs: Sequence[VerifyRequest]
                 ) -> list[VerifyReply]:
    """``verify_phase`` (ONE target forward) over a batch of requests; replies carry column
    log-probs only (a few KB per request instead of V floats per node)."""
    device = next(model.parameters()).device
    cpu = torch.device("cpu")
    out: list[VerifyReply | None] = [None] * len(reqs)

    def key(r: VerifyRequest) -> Hashable:
        return (r.beams.tokens.shape[1], r.steps[0].parent.shape[1] if r.steps else -1)

    for idx in group_by(reqs, key):
        t0 = time.perf_counter()
        group = [reqs[i] for i in idx]
        sizes = [r.beams.tokens.shape[0] for r in group]
        G = max(len(r.steps) for r in group)
        N = group[0].steps[0].parent.shape[1] if G else 0
        padded = [pad_steps(r.steps, r.beams, N, G) for r in group]
        beams = to_device(cat_beams([r.beams for r in group]), device)
        steps = to_device([cat_step([p[j] for p in padded]) for j in range(G)], device)
        t = torch.cat([r.t for r in group]).to(device)
        prompts = [p for r in group for p in r.prompts]
        root_logp, step_logp, _, _, _ = verify_phase(model, None, beams, t, steps, prompts, index)
        root = root_logp.to(cpu).split(sizes)
        per_step = [lp.to(cpu).split(sizes) for lp in step_logp]
        for j, (i, r) in enumerate(zip(idx, group)):
            out[i] = VerifyReply(root[j], [per_step[s][j] for s in range(len(r.steps))],
                                 (time.perf_counter() - t0) * 1000)
    return out  # type: ignore[return-value]


@torch.no_grad()
def beam_batch(model: torch.nn.Module, index: ItemIndex, reqs: Sequence[BeamRequest]) -> list[BeamReply]:
    """Plain target beam search (the fallback and the target-only baseline) over a batch."""
    out: list[BeamReply | None] = [None] * len(reqs)
    for idx in group_by(reqs, lambda r: r.k):
        t0 = time.perf_counter()
        group = [reqs[i] for i in idx]
        sizes = [len(r.prompts) for r in group]
        res = beam_search(model, [p for r in group for p in r.prompts], index, group[0].k)
        scores = res.scores.cpu().split(sizes)
        start = 0
        ms = (time.perf_counter() - t0) * 1000
        for j, (i, n) in enumerate(zip(idx, sizes)):
            out[i] = BeamReply(res.items[start:start + n], scores[j], ms)
            start += n
    return out  # type: ignore[return-value]


__all__ = [
    "BeamReply", "BeamRequest", "DraftReply", "DraftRequest", "VerifyReply", "VerifyRequest",
    "beam_batch", "cat_beams", "draft_batch", "pad_steps", "split_beams", "to_device",
    "verify_batch",
]
