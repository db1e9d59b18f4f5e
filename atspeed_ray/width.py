"""Choosing the draft widths by cost: ``--draft-beams auto`` (``bench``, ``evaluate``, the
pipeline) and ``draft_beams_factor: auto`` (the serve configs).

A wider draft tree gets more of the target's top-K drafted, so fewer rounds (target calls) per
request; but every verification pass then carries more tree tokens and every draft step is a
wider beam step. Which widths are cheapest depends on the models, the machine and the batch: on a
CPU the target's pass is compute-bound, so a wide tree costs almost as much as it saves; on a GPU
it costs little more than the oracle pass. And the levels differ: the draft may hold the target's
top K at code 1 with N = K but need N = 20 K at code 2. So the width is chosen per drafted level
(code position): ``SearchParams.draft_beams`` as a tuple, N_l at code position l.

``choose_width`` measures it on a few calibration prompts (the validation split):

* acceptance: one strict speculative search over the prompts with the candidate's widths gives
  the mean rounds (= target calls) per request; the counters do not depend on timing, so one run
  is exact;
* cost of a round (``Cost``; by default ``timed_cost``): one target pass over prefix + the first
  round's draft tree (``tree_pass``: sum over its drafted levels of N_l tokens, ``round_levels``)
  plus the draft's first round (``draft_round``), per request at the batch size that will be
  used. The candidates of one stage are timed together: each candidate's two calls in each of
  ``repeat`` rounds, all of a round back to back in an order that rotates from one round to the
  next (``benchmarking.interleaved``), and each cost is the least over the rounds (noise only
  adds time): a slow spell of the machine falls on every candidate alike instead of deciding
  which one wins;
* expected time per request = rounds x (pass + draft round). Later rounds re-use the cached
  prefix and draft fewer steps, so this over-counts them a little; it ranks candidates, the
  chosen one is then measured like any other.

The search (``settings.AUTO_*``): first one width for every level, N = f x K for the
``AUTO_WIDTH_FACTORS``; then, from the best of those, a coordinate search. First narrower: for
each drafted level in turn, the narrower N = f x K of ``AUTO_WIDTH_FACTORS`` at that level with
the others held, widest first, while each is cheaper than the best so far (a draft that needs
2 K at code 2 may hold codes 3 and 4 at K, and their share of the tree is then wasted on a CPU:
the 4-block feature draft of the shared Beauty target, ``results/beauty-smollm2/RUN.md``). Then
wider: for each drafted level in turn, the wider N = f x K of ``AUTO_LEVEL_FACTORS`` at that level
with the others held (at most ``AUTO_LEVEL_CANDIDATES`` tries in all, narrower ones included),
narrowest first, each priced before it is searched: a
level stops widening at the first width whose one round costs more than a whole request of the
best so far (wider ones cost more still), so on a CPU the wide trees cost one timed pass each
and no strict search, which keeps ``serve``'s start-up short. At each stage a wider candidate replaces the best so far
only where it takes fewer rounds and less expected time (``better``): at equal rounds a wider
tree cannot cost less, so a lower time there is the clock's noise, not a reason to widen. The
search's result is the same for every width (strict), so only time decides. Where a pass costs
about the same for 10 or 200 tree tokens (a GPU) a level whose wider tree cuts rounds is widened;
where the pass grows with the tree (a CPU) the widths stay narrow. ``cost`` may be given (a model
of the machine, as the tests do). Pure torch: the serving driver uses it too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from atspeed_ray.benchmarking import (
    batches, device_clock, draft_round, interleaved, timing_threads, tree_pass,
)
from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.drafting import Drafter, as_drafter
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.settings import (
    AUTO_LEVEL_CANDIDATES, AUTO_LEVEL_FACTORS, AUTO_WIDTH_FACTORS, EXPAND_LAST,
)
from atspeed_ray.width_policy import LevelWidth, WidthPolicy, one_or_levels, widths_text


@dataclass(frozen=True)
class RoundCost:
    """What one round of a candidate costs, per request (ms)."""

    pass_ms: float  # one target pass over prefix + the first round's draft tree
    draft_ms: float  # the draft's first round (0 when gamma = 0)


# A cost model: the round cost of each candidate search of one stage, measured together
# (``timed_cost``; the tests give a model of a machine instead).
Cost = Callable[[Sequence[SearchParams]], list[RoundCost]]


@dataclass(frozen=True)
class WidthCandidate:
    """The measurements of one candidate (widths, gamma), per request (ms)."""

    widths: tuple[int, ...]  # draft width N_l per code position, the last holding for later codes
    gamma: int  # draft steps per round
    rounds: float  # mean rounds (= target calls) per request, strict
    tree_tokens: int  # tokens of the first round's draft tree: sum over its drafted levels of N_l
    pass_ms: float  # one target pass over prefix + that tree
    draft_ms: float  # the draft's first round (prefill + its drafted steps at their widths)

    @property
    def n(self) -> int:
        """The widest level's N."""
        return max(self.widths)

    @property
    def draft_beams(self) -> int | tuple[int, ...]:
        """As ``SearchParams.draft_beams`` and a measured table hold it: one N, or per level."""
        return one_or_levels(self.widths)

    @property
    def table_value(self) -> int | str:
        """As the serve config's ``draft_widths`` holds it: N, or per level ``10/200/20``."""
        w = self.draft_beams
        return w if isinstance(w, int) else widths_text(w)

    @property
    def expected_ms(self) -> float:
        return self.rounds * (self.pass_ms + self.draft_ms)

    def label(self, k: int) -> str:
        """``20``, or per level ``10/200/20 (1k/20k/2k)``."""
        w = self.draft_beams
        return str(w) if isinstance(w, int) else f"{widths_text(w)} ({widths_text(w, k)})"


def rank(c: WidthCandidate) -> tuple[float, int, int, int]:
    """The order candidates are compared in: least expected time, then the smaller tree."""
    return (c.expected_ms, c.tree_tokens, c.n, c.gamma)


def better(best: WidthCandidate, wider: Sequence[WidthCandidate]) -> WidthCandidate:
    """``best``, or one of the ``wider`` candidates (the same search, some level wider) that takes
    fewer rounds and less expected time. Among those of equal rounds only the smallest tree
    competes: at equal rounds a wider tree cannot cost less, a lower time there is the clock's
    noise, not a reason to widen."""
    fewer: dict[float, WidthCandidate] = {}  # rounds -> the smallest tree that takes them
    for c in sorted(wider, key=lambda c: (c.tree_tokens, c.n)):
        if c.rounds < best.rounds:
            fewer.setdefault(c.rounds, c)
    if not fewer:
        return best
    c = min(fewer.values(), key=rank)
    return c if c.expected_ms < best.expected_ms else best


@dataclass(frozen=True)
class WidthChoice:
    """The chosen widths and gamma for top-``k`` at ``batch_size``, and every candidate measured
    (in the order the search measured them)."""

    k: int
    batch_size: int
    prompts: int  # calibration prompts
    candidates: list[WidthCandidate]
    pick: int  # the chosen one's place in candidates

    @property
    def best(self) -> WidthCandidate:
        return self.candidates[self.pick]

    @property
    def policy(self) -> WidthPolicy:
        """``auto`` with the chosen widths measured at this k."""
        return WidthPolicy().with_measured({self.k: self.best.widths})

    def params(self, base: SearchParams) -> SearchParams:
        """``base`` with the chosen widths (resolved by ``policy``) and gamma."""
        return dataclasses.replace(base, draft_beams=self.policy.resolve(base.k),
                                   gamma=self.best.gamma)

    def record(self) -> dict:
        """JSON-able: the choice and the table it was chosen from."""
        best = self.best
        return {"k": self.k, "batch_size": self.batch_size, "prompts": self.prompts,
                "chosen_n": best.n, "chosen_widths": list(best.widths),
                "chosen": best.table_value, "chosen_gamma": best.gamma,
                "candidates": [{**dataclasses.asdict(c), "widths": list(c.widths), "n": c.n,
                                "expected_ms": c.expected_ms} for c in self.candidates]}

    def summary(self) -> str:
        """One line: the choice and each candidate's expected ms per request."""
        best = self.best
        parts = ", ".join(f"N={c.label(self.k)}{'' if c.gamma == best.gamma else f'/g{c.gamma}'}: "
                          f"{c.rounds:.2f} calls x ({c.pass_ms:.1f} + {c.draft_ms:.1f}) = "
                          f"{c.expected_ms:.1f}" for c in self.candidates)
        return (f"auto width K={self.k} batch {self.batch_size}: N={best.label(self.k)} "
                f"gamma={best.gamma} (expected ms/request on {self.prompts} calibration prompts: "
                f"{parts})")


def candidate_widths(k: int, factors: tuple[float, ...] = AUTO_WIDTH_FACTORS) -> list[int]:
    """The distinct widths N = ceil(f * k) tried for top-``k``, smallest first."""
    return sorted({LevelWidth(f, per_k=True).of(k) for f in factors})


def first_drafted(draft: Drafter | torch.nn.Module) -> int:
    """The first code position (0-based) a round from the root drafts: 0 for a draft that
    reads tokens, 1 for one that reads the target's features (code 1 comes from the target's
    prefill)."""
    return 1 if as_drafter(draft).wants_features else 0


def round_levels(params: SearchParams, L: int, start: int) -> tuple[int, ...]:
    """The level widths of the first round's draft tree: the g = min(gamma, L - 1 - start) code
    positions start, start + 1, ... it drafts (``speculative``: ``g``), each at its width."""
    w = params.widths
    g = max(0, min(params.gamma, L - 1 - start))
    return tuple(w[min(start + j, len(w) - 1)] for j in range(g))


def level_tries(widths: tuple[int, ...], level: int, k: int, L: int,
                factors: tuple[float, ...] = AUTO_LEVEL_FACTORS, narrower: bool = False
                ) -> list[tuple[int, ...]]:
    """``widths`` with code position ``level`` widened to each N = ceil(f * k) of ``factors``
    that is wider than it now, narrowest first (``narrower``: narrowed to each that is narrower,
    widest first), the other drafted levels (0 .. L - 2) held."""
    full = [widths[min(i, len(widths) - 1)] for i in range(max(L - 1, 1))]
    ns = candidate_widths(k, factors)
    ns = [n for n in reversed(ns) if n < full[level]] if narrower else [n for n in ns if n > full[level]]
    return [tuple(full[:level] + [n] + full[level + 1:]) for n in ns]


def calibration_batch(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """At least ``batch_size`` prompts (``prompts`` repeated as needed), so that the pass costs
    are measured at the batch size that will run."""
    if not prompts:
        raise ValueError("auto draft width: no calibration prompts")
    reps = -(-batch_size // len(prompts))
    return (prompts * reps)[:max(batch_size, len(prompts))]


def timed_cost(target: torch.nn.Module, draft: Drafter | torch.nn.Module, index: ItemIndex,
               head: list[list[int]], repeat: int, start: int) -> Cost:
    """The measured cost model on this machine: per candidate, its first round's tree pass
    (``tree_pass`` over ``round_levels``) and draft round on the batch ``head``, warmed up, then
    all timed interleaved ``repeat`` times (module docstring), each the least, per request."""

    def measure(grid: Sequence[SearchParams]) -> list[RoundCost]:
        calls = []  # per candidate: its target pass, then its draft round (none when gamma = 0)
        for p in grid:
            calls.append(tree_pass(target, round_levels(p, index.L, start)))
            calls.append(draft_round(target, draft, index, p, [head]) if p.gamma > 0
                         else (lambda _: None))
        with timing_threads(index.device):
            for call in calls:  # warm-up: the first call at a new shape pays one-off costs
                call(head)
            seconds, _ = interleaved([lambda f=f: f(head) for f in calls], repeat,
                                     device_clock(index.device))  # [2 * candidates][repeat]
        ms = [1e3 * min(s) / len(head) for s in seconds]
        return [RoundCost(ms[2 * i], ms[2 * i + 1] if p.gamma > 0 else 0.0)
                for i, p in enumerate(grid)]

    return measure


@torch.no_grad()
def choose_width(target: torch.nn.Module, draft: Drafter | torch.nn.Module, index: ItemIndex,
                 prompts: list[list[int]], k: int, gammas: tuple[int, ...], batch_size: int = 1,
                 repeat: int = 2, factors: tuple[float, ...] = AUTO_WIDTH_FACTORS,
                 level_factors: tuple[float, ...] = AUTO_LEVEL_FACTORS,
                 level_candidates: int = AUTO_LEVEL_CANDIDATES, expand_last: int = EXPAND_LAST,
                 cost: Cost | None = None) -> WidthChoice:
    """The widths per drafted level and the gamma for top-``k`` that the search of the module
    docstring chooses by expected time per request, measured on ``prompts`` (a few validation
    prompts) at ``batch_size``; ``cost``: the round costs (default: ``timed_cost`` on this
    machine)."""
    from atspeed_ray.decoding import speculative_search

    calib = calibration_batch(prompts, batch_size)
    groups = batches(calib, batch_size)
    start = first_drafted(draft)
    round_cost = cost or timed_cost(target, draft, index, groups[0], repeat, start)

    def counted(p: SearchParams, c: RoundCost) -> WidthCandidate:
        r = [x for b in groups  # counters: exact in one run
             for x in speculative_search(target, draft, b, index, p).stats["rounds"]]
        return WidthCandidate(p.widths, p.gamma, sum(r) / len(r),
                              sum(round_levels(p, index.L, start)), c.pass_ms, c.draft_ms)

    def measure(grid: list[SearchParams]) -> list[WidthCandidate]:
        return [counted(p, c) for p, c in zip(grid, round_cost(grid))]

    def search(widths: int | tuple[int, ...], gamma: int) -> SearchParams:
        return SearchParams(k, widths, gamma, "strict", expand_last=expand_last)

    measured = measure([search(n, g) for g in gammas for n in candidate_widths(k, factors)])
    per_gamma = [[c for c in measured if c.gamma == g] for g in gammas]  # each: narrowest first
    best = min((better(cs[0], cs[1:]) for cs in per_gamma), key=rank)
    left = level_candidates

    def untried(ws: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        seen = {search(c.widths, c.gamma).widths for c in measured if c.gamma == best.gamma}
        return [w for w in ws if search(w, best.gamma).widths not in seen]

    for level in range(start, index.L - 1):  # narrower first: a level held at K needs no more
        for w in untried(level_tries(best.widths, level, k, index.L, factors, narrower=True))[:left]:
            left -= 1
            new = measure([search(w, best.gamma)])[0]
            measured.append(new)
            if new.expected_ms >= best.expected_ms:
                break  # narrower still would take as many rounds or more, for less saved
            best = new
    for level in range(start, index.L - 1):  # the drafted code positions, first code first
        for w in untried(level_tries(best.widths, level, k, index.L, level_factors))[:left]:
            left -= 1
            p = search(w, best.gamma)
            c = round_cost([p])[0]
            if c.pass_ms + c.draft_ms >= best.expected_ms:
                # priced out: one round of it costs more than a whole request of the best, and a
                # wider tree at this level costs more still (no strict search run for them)
                break
            new = counted(p, c)
            measured.append(new)
            best = better(best, [new])
    return WidthChoice(k, batch_size, len(calib), measured,
                       next(i for i, c in enumerate(measured) if c is best))


def row_params(params: SearchParams, width: WidthPolicy, target: torch.nn.Module,
               draft: Drafter | torch.nn.Module, index: ItemIndex, calibration: list[list[int]],
               batch_size: int, repeat: int = 2) -> tuple[SearchParams, WidthChoice | None]:
    """The search of a row: ``params`` as given, or with ``--draft-beams auto`` the widths per
    drafted level (and gamma) that ``choose_width`` chooses on the ``calibration`` prompts at
    this batch size, each cost the least of ``repeat`` (at least 2) interleaved timings
    (printed); the choice is returned to be recorded with the row."""
    if not width.auto:
        return params, None
    choice = choose_width(target, draft, index, calibration, params.k, (params.gamma,), batch_size,
                          repeat=max(2, repeat), expand_last=params.expand_last)
    print(f"    {choice.summary()}", flush=True)
    return choice.params(params), choice
