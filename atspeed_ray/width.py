"""Choosing the draft width by cost: ``--draft-beams auto`` (``bench``, ``evaluate``, the
pipeline) and ``draft_beams_factor: auto`` (the serve configs).

A wider draft tree (N > K) gets more of the target's top-K drafted, so fewer rounds (target
calls) per request; but every verification pass then carries N x gamma tree tokens and every
draft step is a width-N beam step. Which N is cheapest depends on the models, the machine and
the batch: on a CPU the target's pass is compute-bound, so a wide tree costs almost as much as
it saves; on a GPU it costs little more than the oracle pass.

``choose_width`` measures it on a few calibration prompts (the validation split) for every
candidate (N, gamma):

* acceptance: one strict speculative search over the prompts gives the mean rounds (= target
  calls) per request; the counters do not depend on timing, so one run is exact;
* cost of a round: one target pass over prefix + N x gamma tree tokens (``oracle_pass`` with
  width N) plus the draft's first round (``draft_round``), per request at the batch size that
  will be used. Every candidate's two calls are timed in each of ``repeat`` rounds, all of a
  round back to back in an order that rotates from one round to the next
  (``benchmarking.interleaved``), and each cost is the least over the rounds (noise only adds
  time): a slow spell of the machine falls on every candidate alike instead of deciding which
  one wins, and each candidate keeps its quietest round;
* expected time per request = rounds x (pass + draft round). Later rounds re-use the cached
  prefix and draft fewer steps, so this over-counts them a little; it ranks candidates, the
  chosen one is then measured like any other.

The candidate with the least expected time wins. The search's result is the same for every N
(strict), so only time decides. Pure torch: the serving driver uses it too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from atspeed_ray.benchmarking import (
    batches, device_clock, draft_round, interleaved, oracle_pass, timing_threads,
)
from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.drafting import Drafter
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.settings import AUTO_WIDTH_FACTORS, EXPAND_LAST
from atspeed_ray.width_policy import LevelWidth, WidthPolicy


@dataclass(frozen=True)
class WidthCandidate:
    """The measurements of one candidate (N, gamma), per request (ms)."""

    n: int  # draft width N
    gamma: int  # draft steps per round
    rounds: float  # mean rounds (= target calls) per request, strict
    pass_ms: float  # one target pass over prefix + N x gamma tree tokens
    draft_ms: float  # the draft's first round (prefill + min(gamma, L-1) width-N steps)

    @property
    def expected_ms(self) -> float:
        return self.rounds * (self.pass_ms + self.draft_ms)


@dataclass(frozen=True)
class WidthChoice:
    """The chosen (N, gamma) for top-``k`` at ``batch_size``, and every candidate measured."""

    k: int
    batch_size: int
    prompts: int  # calibration prompts
    candidates: list[WidthCandidate]

    @property
    def best(self) -> WidthCandidate:
        return min(self.candidates, key=lambda c: (c.expected_ms, c.n, c.gamma))

    @property
    def policy(self) -> WidthPolicy:
        """``auto`` with the chosen width measured at this k."""
        return WidthPolicy().with_measured({self.k: self.best.n})

    def params(self, base: SearchParams) -> SearchParams:
        """``base`` with the chosen width (resolved by ``policy``) and gamma."""
        import dataclasses

        return dataclasses.replace(base, draft_beams=self.policy.resolve(base.k),
                                   gamma=self.best.gamma)

    def record(self) -> dict:
        """JSON-able: the choice and the table it was chosen from."""
        return {"k": self.k, "batch_size": self.batch_size, "prompts": self.prompts,
                "chosen_n": self.best.n, "chosen_gamma": self.best.gamma,
                "candidates": [{**asdict(c), "expected_ms": c.expected_ms} for c in self.candidates]}

    def summary(self) -> str:
        """One line: the choice and each candidate's expected ms per request."""
        parts = ", ".join(f"N={c.n}{'' if c.gamma == self.best.gamma else f'/g{c.gamma}'}: "
                          f"{c.rounds:.2f} calls x ({c.pass_ms:.1f} + {c.draft_ms:.1f}) = "
                          f"{c.expected_ms:.1f}" for c in self.candidates)
        return (f"auto width K={self.k} batch {self.batch_size}: N={self.best.n} gamma={self.best.gamma} "
                f"(expected ms/request on {self.prompts} calibration prompts: {parts})")


def candidate_widths(k: int, factors: tuple[float, ...] = AUTO_WIDTH_FACTORS) -> list[int]:
    """The distinct widths N = ceil(f * k) tried for top-``k``, smallest first."""
    return sorted({LevelWidth(f, per_k=True).of(k) for f in factors})


def calibration_batch(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """At least ``batch_size`` prompts (``prompts`` repeated as needed), so that the pass costs
    are measured at the batch size that will run."""
    if not prompts:
        raise ValueError("auto draft width: no calibration prompts")
    reps = -(-batch_size // len(prompts))
    return (prompts * reps)[:max(batch_size, len(prompts))]


@torch.no_grad()
def choose_width(target: torch.nn.Module, draft: Drafter | torch.nn.Module, index: ItemIndex,
                 prompts: list[list[int]], k: int, gammas: tuple[int, ...], batch_size: int = 1,
                 repeat: int = 2, factors: tuple[float, ...] = AUTO_WIDTH_FACTORS,
                 expand_last: int = EXPAND_LAST) -> WidthChoice:
    """The (N, gamma) with the least expected time per request for top-``k`` (module
    docstring), measured on ``prompts`` (a few validation prompts) at ``batch_size``."""
    from atspeed_ray.decoding import speculative_search

    calib = calibration_batch(prompts, batch_size)
    groups = batches(calib, batch_size)
    head = groups[0]  # the cost of a round is timed on the first full batch
    rows = len(head)
    grid = [SearchParams(k, n, gamma, "strict", expand_last=expand_last)
            for gamma in gammas for n in candidate_widths(k, factors)]
    rounds = [[r for b in groups for r in speculative_search(target, draft, b, index, p).stats["rounds"]]
              for p in grid]  # counters: exact in one run (the first run warms up too)
    calls = []  # per candidate: its target pass, then its draft round (none when gamma = 0)
    for p in grid:
        calls.append(oracle_pass(target, p.N, p.gamma))
        calls.append(draft_round(target, draft, index, p, [head]) if p.gamma > 0 else (lambda _: None))
    with timing_threads(index.device):
        for call in calls:  # warm-up: the first call at a new shape pays one-off costs
            call(head)
        seconds, _ = interleaved([lambda f=f: f(head) for f in calls], repeat,
                                 device_clock(index.device))  # [2 * candidates][repeat]
    ms = [1e3 * min(s) / rows for s in seconds]
    out = [WidthCandidate(p.N, p.gamma, sum(r) / len(r), ms[2 * i], ms[2 * i + 1] if p.gamma > 0 else 0.0)
           for i, (p, r) in enumerate(zip(grid, rounds))]
    return WidthChoice(k, batch_size, len(calib), out)


def row_params(params: SearchParams, width: WidthPolicy, target: torch.nn.Module,
               draft: Drafter | torch.nn.Module, index: ItemIndex, calibration: list[list[int]],
               batch_size: int, repeat: int = 2) -> tuple[SearchParams, WidthChoice | None]:
    """The search of a row: ``params`` as given, or with ``--draft-beams auto`` the width (and
    gamma) that ``choose_width`` finds cheapest on the ``calibration`` prompts at this batch
    size, each cost the least of ``repeat`` (at least 2) interleaved timings (printed); the
    choice is returned to be recorded with the row."""
    if not width.auto:
        return params, None
    choice = choose_width(target, draft, index, calibration, params.k, (params.gamma,), batch_size,
                          repeat=max(2, repeat), expand_last=params.expand_last)
    print(f"    {choice.summary()}", flush=True)
    return choice.params(params), choice
