"""Speculative beam search (AtSpeed): N-to-K drafting, one tree-attention verification per round.

One round, for every active request at once (each accepts and rejects on its own):

1. **Draft** (``drafting``, ``g = min(gamma, L - 1 - t)`` forwards of the draft): starting from
   the K current beams, a width-N beam search (strict: top N; relaxed: N samples without
   replacement). Every step's beams and parent pointers are kept.
2. **Verify** (``verification``, one forward of the target): the current beams' uncached last
   tokens and all drafted tokens of all steps are packed after the cached prefix as a tree; tree
   attention gives the target's distribution after every drafted beam.
3. **Accept** (``acceptance``) step by step, strict (the target's top-K must all be drafted) or
   relaxed (recursive rejection sampling: K draws without replacement from the target's
   p); at the first rejection the target's own choice at that step is taken;
   if all drafted steps pass, a bonus step.
4. Both caches drop rejected branches; finished requests leave the batch.

Strict mode returns exactly the target's beam search (same items, order and scores).

The loop is written once, as a generator (``speculative_loop``) that yields the model calls it
needs: ``speculative_search`` answers them with in-process models and tree caches
(``LocalModels``); the serving ingress answers them with remote, stateless replica calls.
The search parameters travel as one ``SearchParams``. Relaxed mode's random numbers come from
``params.seed``, each row's place and the round (``noise``): the loop counts rounds and hands
each phase its rows' keys, so a request draws the same numbers in whatever batch it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch
from torch import Tensor

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.acceptance import accept_round
from atspeed_ray.decoding.beam import (
    Beams, DecodeResult, check_code_head, root_beams, score_dtype, take,
)
from atspeed_ray.decoding.decoder import head_columns
from atspeed_ray.decoding.drafting import (
    Drafter, DraftStep, LMDrafter, ProposeCall, as_drafter, draft_forwards,
)
from atspeed_ray.decoding.feed import Context
from atspeed_ray.decoding.noise import round_streams, row_streams
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.decoding.timing import Timings, phase, whole
from atspeed_ray.decoding.cache import TreeCache
from atspeed_ray.decoding.verification import Verified, verify_phase
from atspeed_ray.settings import DEFAULT_GAMMA, DEFAULT_MODE, Mode

# ---------------------------------------------------------------------------------------------
# The loop, written once. It is a generator ("sans-IO"): it yields the model calls it needs
# (ProposeCall, VerifyCall, EndRoundCall) and receives their replies through ``send``. A driver
# answers them: ``LocalModels`` with in-process models and tree caches (offline decoding), the
# serving ingress with DeploymentHandle calls to remote replicas (stateless rounds).


@dataclass
class VerifyCall:
    """Target side: ONE forward over the drafted tree; reply a ``Verified``."""

    beams: Beams  # [B, K, L]
    t: Tensor  # [B]
    steps: list[DraftStep]  # G steps of [B, N] drafted beams (may be empty)
    prompts: list[list[int]]
    features: bool = False  # reply the target's hidden states too (``Verified.root_features``)


@dataclass
class EndRoundCall:
    """After acceptance: caches may drop rejected branches (reply: ``beams`` with renumbered
    slots) and finished requests (``keep`` [B'] = rows that stay active, None = all stay)."""

    beams: Beams
    keep: Tensor | None


ModelCall = ProposeCall | VerifyCall | EndRoundCall
SpeculativeLoop = Generator[ModelCall, object, DecodeResult]
STAT_NAMES = ("target_calls", "draft_calls", "rounds", "accepted_steps")
# per request and code position d (0-based): rounds whose drafted step at d was verified, and
# rounds where it was accepted ([B, L] counters; where strict acceptance is lost, by position)
POSITION_STAT_NAMES = ("drafted_at_position", "accepted_at_position")


@dataclass
class Answers:
    """The loop's output, filled in as requests finish (indexed by original request)."""

    tokens: Tensor  # [B, K, L]
    scores: Tensor  # [B, K] (-inf: not an item)
    stats: dict[str, Tensor]  # STAT_NAMES -> [B], POSITION_STAT_NAMES -> [B, L] counters

    @classmethod
    def empty(cls, B: int, K: int, L: int, device: torch.device, dtype: torch.dtype) -> Answers:
        stats = {n: torch.zeros(B, dtype=torch.long, device=device) for n in STAT_NAMES}
        stats.update({n: torch.zeros(B, L, dtype=torch.long, device=device)
                      for n in POSITION_STAT_NAMES})
        return cls(torch.zeros(B, K, L, dtype=torch.long, device=device),
                   torch.full((B, K), float("-inf"), dtype=dtype, device=device), stats)

    def count_round(self, rows: Tensor, t: Tensor, g: Tensor, forwards: int, accepted: Tensor
                    ) -> None:
        """One round of requests ``rows`` [B'] that started at ``t`` [B'] tokens: one target
        call, ``forwards`` draft calls where g > 0; drafted step j (at code position t + j - 1)
        was verified if j <= min(accepted + 1, g), and accepted if j <= accepted."""
        self.stats["rounds"][rows] += 1
        self.stats["target_calls"][rows] += 1
        self.stats["draft_calls"][rows] += torch.where(g > 0, forwards, 0)
        self.stats["accepted_steps"][rows] += accepted
        L = self.tokens.shape[2]
        pos = torch.arange(L, device=t.device)  # [L]
        j = pos - t[:, None] + 1  # [B', L] the step number of each position in this round
        verified = (j >= 1) & (j <= torch.minimum(accepted + 1, g)[:, None])
        self.stats["drafted_at_position"][rows] += verified.long()
        self.stats["accepted_at_position"][rows] += (verified & (j <= accepted[:, None])).long()

    def store(self, rows: Tensor, beams: Beams) -> None:
        """The final beams of requests ``rows`` [B'] (``beams`` [B', K, L])."""
        self.tokens[rows] = beams.tokens
        self.scores[rows] = beams.scores.to(self.scores.dtype)

    def result(self, index: ItemIndex, best_first: bool) -> DecodeResult:
        """The decode result; ``best_first`` sorts each request's beams by score (relaxed)."""
        tokens, scores = self.tokens, self.scores
        if best_first:
            order = scores.argsort(dim=1, descending=True, stable=True)
            scores, tokens = scores.gather(1, order), take(tokens, order)
        items = torch.where(torch.isfinite(scores), index.items_of(tokens), -1)
        return DecodeResult(items.tolist(), tokens, scores,
                            {n: v.tolist() for n, v in self.stats.items()})


def speculative_loop(prompts: list[list[int]], index: ItemIndex, params: SearchParams,
                     keep_cache: bool = True, dtype: torch.dtype = torch.float32,
                     timings: Timings | None = None, features: bool = False,
                     streams: Tensor | None = None) -> SpeculativeLoop:
    """The speculative beam search loop over ``prompts``; model calls are yielded (see above).

    ``index`` must be on the device the beams live on; ``dtype`` is the beam score dtype
    (``score_dtype(target)``). With ``keep_cache=False`` every round starts with no cached token
    (``Beams.forget_slots``): the draft and the target recompute prompt and beams in each forward.
    ``stats`` of the result: per-request lists target_calls, draft_calls, rounds, accepted_steps.
    ``timings`` (optional) adds each phase's wall time: the draft and verify calls as the driver
    answers them, acceptance, and the bookkeeping after it (the end-of-round call included).
    ``features`` (a drafter that reads the target's hidden states, ``Drafter.wants_features``):
    every verification returns them and the beams carry them (``Beams.features``); the first
    round then drafts nothing (there are no features yet): it is the target's prefill and its
    exact first code.
    ``streams`` [B] int64: each request's stream key for relaxed sampling; default
    ``row_streams(params.seed, B)`` (None when unseeded). A caller that stacks requests of
    different seeds passes each one's key as row 0 of its own search (``noise.row_streams``).
    """
    device = index.device
    B, L, K = len(prompts), index.L, params.k
    beams = root_beams(B, K, L, ["target", "draft"], device, dtype)
    t = torch.zeros(B, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)  # original request of each active row
    answers = Answers.empty(B, K, L, device, dtype)
    active_prompts = prompts
    context: Context | None = None  # the target's hidden states over the prompts (``features``)
    if not params.sample:  # strict mode draws nothing
        streams = None
    elif streams is None:
        streams = row_streams(params.seed, B, device)
    streams = None if streams is None else streams.to(device)  # [B'] of the active rows
    round_no = 0
    while rows.numel() > 0:
        if not keep_cache:
            beams = beams.forget_slots()
        g = (L - 1 - t).clamp(max=params.gamma)  # drafted steps usable per request
        if features and beams.features is None:  # the first round: the target's prefill
            g = torch.zeros_like(g)
        G = int(g.max())
        steps: list[DraftStep] = []
        if G > 0:
            with phase(timings, "draft"):
                reply = yield ProposeCall(beams, t, g, active_prompts, params, context,
                                          round_streams(streams, round_no, "draft"))
            steps, beams = reply  # type: ignore[misc]
        with phase(timings, "verify"):
            verified = yield VerifyCall(beams, t, steps, active_prompts, features)
        assert isinstance(verified, Verified)
        if verified.context is not None:  # a pass that fed the prompts (the first, or stateless)
            context = verified.context
        with phase(timings, "accept"):
            beams, acc = accept_round(verified, t, g, index, params,
                                      round_streams(streams, round_no, "accept"))
        with phase(timings, "bookkeeping"):
            answers.count_round(rows, t, g, draft_forwards(steps), acc)
            t = t + acc + 1
            # ---- drop rejected branches from the caches, retire finished requests
            done = t >= L
            keep = (~done).nonzero().flatten() if bool(done.any()) else None
            beams = yield EndRoundCall(beams, keep)  # type: ignore[assignment]
            if keep is not None:
                answers.store(rows[done], beams.select_rows(done))
                beams, t, rows = beams.select_rows(keep), t[keep], rows[keep]
                context = None if context is None else context.select_rows(keep)
                streams = None if streams is None else streams[keep]
                active_prompts = [active_prompts[i] for i in keep.tolist()]
            round_no += 1
    return answers.result(index, best_first=params.sample)


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

    def __init__(self, target: torch.nn.Module, draft: Drafter | torch.nn.Module,
                 index: ItemIndex, keep_cache: bool = True):
        self.target, self.index, self.keep_cache = target, index, keep_cache
        self.drafter = as_drafter(draft)
        self.tcache: TreeCache | None = None
        self.dcache: TreeCache | None = None

    def __call__(self, call: ModelCall) -> object:
        if isinstance(call, ProposeCall):
            return self.propose(call)
        if isinstance(call, VerifyCall):
            return self.verify(call)
        assert isinstance(call, EndRoundCall)
        return self.end_round(call)

    def propose(self, call: ProposeCall) -> tuple[list[DraftStep], Beams]:
        if not self.keep_cache:
            self.dcache = None
        steps, beams, self.dcache = self.drafter.propose(call, self.index, self.dcache)
        return steps, beams

    def verify(self, call: VerifyCall) -> Verified:
        if not self.keep_cache:
            self.tcache = None
        verified, self.tcache = verify_phase(self.target, self.tcache, call.beams, call.t,
                                             call.steps, call.prompts, self.index, call.features)
        return verified

    def end_round(self, call: EndRoundCall) -> Beams:
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
def speculative_search(target: torch.nn.Module, draft: Drafter | torch.nn.Module,
                       prompts: list[list[int]],
                       index: ItemIndex, params: SearchParams, keep_cache: bool = True,
                       timings: Timings | None = None, streams: Tensor | None = None
                       ) -> DecodeResult:
    """Top-``params.k`` items per prompt by speculative beam search (see the module docstring).

    ``stats`` holds per-request lists: target_calls, draft_calls, rounds, accepted_steps.
    ``keep_cache=False`` runs every round stateless (prompt and beams recomputed each forward):
    the same result, the mode used when draft and target are remote replicas without caches.
    ``timings`` (optional, ``Timings``) adds the time of each phase and of the whole call.
    ``streams`` [B]: relaxed sampling's per-request stream keys (``speculative_loop``).
    ``draft`` is a ``Drafter`` or a causal LM (``LMDrafter``), which may have a code head
    (``FastLlama.restrict_head``); the target may not.
    """
    index = index.to(next(target.parameters()).device)
    if head_columns(target) is not None:
        raise ValueError("the target has a code head: its scores must be over the whole "
                         "vocabulary (a code head is for drafts)")
    drafter = as_drafter(draft)
    if isinstance(drafter, LMDrafter):
        check_code_head(drafter.model, index)
    loop = speculative_loop(prompts, index, params, keep_cache, score_dtype(target), timings,
                            drafter.wants_features, streams)
    with whole(timings):
        return run_loop(loop, LocalModels(target, drafter, index, keep_cache))


def speculative_beam_search(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    prompts: list[list[int]],
    index: ItemIndex,
    k: int,
    draft_beams: int | tuple[int, ...] | None = None,
    gamma: int = DEFAULT_GAMMA,
    mode: Mode = DEFAULT_MODE,
    seed: int | None = None,
    keep_cache: bool = True,
) -> DecodeResult:
    """``speculative_search`` with the search parameters given one by one (draft width
    ``draft_beams`` = N or one per code position, default k; relaxed: ``seed``, None = torch's default generator)."""
    params = SearchParams(k, draft_beams, gamma, mode, seed)
    return speculative_search(target, draft, prompts, index, params, keep_cache)
