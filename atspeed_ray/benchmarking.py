"""What ``bench`` and ``evaluate`` share: their command-line values and the speed measurements.

* command line (the integer lists ``--k`` and ``--batch-size`` are ``flags.parse_ks`` / ``parse_counts``):
  ``SpeedFlags``, the fields their flags are generated from (``flags.options``; ``--draft-beams``
  is a ``width_policy.WidthPolicy``), and ``positive``;
* measurements: ``timed`` / ``time_per_batch``, the bounds' calls (``oracle_pass``: one target
  pass over a full tree; ``draft_round``: the draft's first round, ``draft_round_time`` times
  it alone) and ``measure_speculative``, which times the target's beam search against
  speculative beam search on the same prompts in the same process, the bounds' calls beside
  each pair, with the speculative time split by phase (``breakdown_ms``: draft, verify, accept,
  bookkeeping, rest per request), and ``draft_cover``, the width each code position needs;
  the draft is any kind (``drafts.load_drafter``): a causal LM, or a feature draft, whose
  round starts after the target's prefill (``first_proposal``) and whose widths come from the
  target's features along the target's beams (``feature_cover``);
* paired timing (pure, any clock): ``interleaved`` times several calls back to back in a
  rotating order, ``time_pairs`` does it per prompt (or batch) for beam search and speculation,
  ``Speedup`` turns the pairs into WS with its spread and the ``unstable`` flag, and
  ``paired_speedup`` measures again (at most ``EXTRA_PASSES`` times) while a row is unstable;
* ``--draft-beams auto``: ``width.row_params`` picks N per drafted level, K and batch size by measured cost
  on a few validation prompts before the row is timed (``width`` imports this module, never
  the other way round).

Torch is imported inside the functions: the CLI imports this module for ``--help``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from atspeed_ray.settings import (
    AUTO_WIDTH_PROMPTS, DEFAULT_COMPILE, DEFAULT_DRAFT_BEAMS, DEFAULT_FORWARD, DEFAULT_GAMMA,
    DEFAULT_KS, DEFAULT_MODE, DEFAULT_PACK, DEFAULT_RELAXED_KEEP, EXPAND_LAST, TIMING_THREADS,
    Forward, Mode, Precision, RelaxedKeep,
)
from atspeed_ray.width_policy import Width, WidthPolicy

if TYPE_CHECKING:
    import torch

    from atspeed_ray.data.index import ItemIndex
    from atspeed_ray.decoding.drafting import Drafter, ProposeCall
    from atspeed_ray.decoding.search import SearchParams
    from atspeed_ray.decoding.timing import Timings
    from atspeed_ray.drafts.feature import FeatureDraft

X = TypeVar("X")
Y = TypeVar("Y")
Batch = list[list[int]]  # prompts decoded together
Clock = Callable[[], float]  # seconds, monotonic (time.perf_counter, or a test's fake clock)

# A row is unstable when the interquartile range of its per-prompt ratios is wider than this
# fraction of its WS, or when its repeats' WS (each the median over the prompts of one repeat)
# span more than UNSTABLE_REPEATS of it; it is then measured again, at most EXTRA_PASSES times,
# and flagged ``unstable`` if no pass is stable. Prompts differ (one is answered in one round,
# another in three), so some spread is real: the threshold is wide enough for that.
UNSTABLE_SPREAD = 0.5
UNSTABLE_REPEATS = 0.1
EXTRA_PASSES = 2


# ----------------------------------------------------------------------------- command line
def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)




class SpeedFlags(BaseModel):
    """The flags ``bench``, ``bench-beam``, ``evaluate`` and ``draft_tradeoff`` share, each
    default defined here once; each command lists the fields it exposes (``flags.options``:
    name, type, default, choices and help come from the field) and may add its own in a
    subclass (``bench.BenchFlags``, ``evaluate.EvaluateFlags``)."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="prepared folder, release folder or 'synthetic'")
    target: str = Field(description="HF model dir of the target")
    k: list[int] = Field(default_factory=lambda: list(DEFAULT_KS),
                         description="K values (items returned), comma-separated")
    mode: Mode = Field(DEFAULT_MODE, description="verification: strict top-K (the target's own "
                                                 "beam search) or relaxed sampling")
    draft_beams: Width = Field(
        default_factory=lambda: WidthPolicy.parse(DEFAULT_DRAFT_BEAMS),
        description="draft width: N, a multiple of K such as 2k (raised to K where smaller), "
                    "auto (one per drafted code, chosen per K and batch size by measured cost "
                    "on --calibration-prompts validation prompts), or one of those per code "
                    "position, first code first, the last holding for later codes, such as "
                    "2k/8k/2k (the draft keeps that many beams at that code)")
    calibration_prompts: int = Field(AUTO_WIDTH_PROMPTS, ge=1, description="--draft-beams "
                                     "auto: validation prompts the choice is measured on")
    gamma: int = Field(DEFAULT_GAMMA, ge=0, description="draft steps per round")
    seed: int = Field(0, ge=0, description="relaxed mode's seed")
    repeat: int = Field(2, ge=1, description=(
        "time beam search and speculation on every prompt (batch) this many times, back to "
        "back, the order alternating; WS is the median of the per-prompt ratios"))
    split: str = Field("test", description="the split whose prompts are decoded")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto")
    forward: Forward = Field(DEFAULT_FORWARD, description="decoding forward: compact FastLlama "
                                                          "(Llama checkpoints) or the HF model's")
    compile: bool = Field(DEFAULT_COMPILE, description="torch.compile FastLlama's per-layer "
                          "blocks (see the README's 'Compiled decoding step' for when it pays)")
    pack: bool = Field(DEFAULT_PACK, description="lay FastLlama's weights out once for the CPU "
                       "GEMM library (oneDNN bf16, MKL fp32; not with --compile, nothing on a GPU)")
    precision: Precision = Field("auto", description=(
        "decoding dtype: auto = bf16 on a GPU, fp32 on a CPU; bf16 on a CPU with AMX or "
        "AVX512-BF16 (fp32 on other CPUs); the one used is printed"))
    expand_last: int = Field(EXPAND_LAST, ge=0, description=(
        "strict: a round ends with children steps, each holding every trie child of the step "
        "before it, from the first step after which every step left has at most this many per "
        "request (no draft forward for them; each accepted whenever the step before is); 0 = the "
        "draft's top N"))
    relaxed_keep: RelaxedKeep = Field(DEFAULT_RELAXED_KEEP, description=(
        "relaxed rows: sample = the target's sampled beam search, exact for any draft; top = "
        "experimental, keeps the accepted beams with the best target scores (closer to beam "
        "search, depends on the draft; results/relaxed/RUN.md)"))
    out: str | None = Field(None, description="write the results as JSON here")


# the decoding flags' switches: --compile/--no-compile, --pack/--no-pack
SWITCHES = {"compile": {"action": argparse.BooleanOptionalAction},
            "pack": {"action": argparse.BooleanOptionalAction}}


def write_json(out: str | None, result: dict) -> None:
    """``result`` as JSON at ``out`` (nothing if None)."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")


# ----------------------------------------------------------------------------- measurements
def batches(xs: list[X], size: int) -> list[list[X]]:
    """``xs`` in consecutive chunks of ``size`` (the last one may be shorter)."""
    return [xs[i:i + size] for i in range(0, len(xs), size)]


def timed(fn: Callable[[], X], repeat: int = 1) -> tuple[float, X]:
    """(best wall time of ``repeat`` calls of ``fn`` in seconds, the last call's result); CUDA
    work is waited for."""
    import torch

    best, out = float("inf"), None
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out  # type: ignore[return-value]


def time_per_batch(one: Callable[[Batch], Any], prompt_batches: list[Batch], repeat: int) -> float:
    """Sum over batches of the best of ``repeat`` timings of ``one(batch)``."""
    return sum(timed(lambda b=b: one(b), repeat=repeat)[0] for b in prompt_batches)


@contextmanager
def timing_threads(device: torch.device, threads: int = TIMING_THREADS) -> Iterator[int]:
    """Run the block with ``threads`` torch threads on the CPU (``settings.TIMING_THREADS``; 0
    keeps torch's own count), the count before restored after; yields the count timed with."""
    import torch

    before = torch.get_num_threads()
    if device.type != "cpu" or threads <= 0:
        yield before
        return
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def device_clock(device: torch.device) -> Clock:
    """``time.perf_counter`` that first waits for the device's queued work (CUDA)."""
    import torch

    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


def interleaved(sides: Sequence[Callable[[], X]], repeat: int, clock: Clock = time.perf_counter,
                start: int = 0) -> tuple[list[list[float]], list[list[X]]]:
    """Time every side ``repeat`` times, all sides of one repeat back to back, the order rotating
    by one side each repeat (two sides: alternating) and beginning at side ``start``: a slow
    spell of the machine then falls on every side alike, not on whichever ran during it.
    Returns (seconds [side][repeat], results [side][repeat])."""
    n = len(sides)
    seconds: list[list[float]] = [[0.0] * repeat for _ in range(n)]
    results: list[list[Any]] = [[None] * repeat for _ in range(n)]
    for r in range(repeat):
        for j in range(n):
            i = (start + r + j) % n
            t0 = clock()
            results[i][r] = sides[i]()
            seconds[i][r] = clock() - t0
    return seconds, results


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``xs`` (inclusive method; one value: itself)."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


@dataclass(frozen=True)
class PairTimes:
    """Seconds of the target's beam search (``plain``) and of speculative beam search (``spec``)
    on each timed unit (a prompt, or a batch of ``--batch-size`` prompts), per repeat; the two
    calls of a (unit, repeat) pair ran back to back, and the calls ``beside`` them (the bounds'
    passes) right after."""

    plain: tuple[tuple[float, ...], ...]  # [units][repeat]
    spec: tuple[tuple[float, ...], ...]  # [units][repeat]
    beside: tuple[tuple[tuple[float, ...], ...], ...] = ()  # [side][units][repeat]

    def side(self, name: str | int) -> tuple[tuple[float, ...], ...]:
        """[units][repeat]: "plain", "spec" or the index of a side ``beside``."""
        return self.plain if name == "plain" else self.spec if name == "spec" else self.beside[name]

    def bound(self, sides: Sequence[int]) -> float:
        """The speedup of beam search over the sum of the ``beside`` calls ``sides``, paired like
        WS: the median over the units of each unit's median over its repeats."""
        return statistics.median(
            statistics.median(self.plain[u][r] / sum(self.beside[i][u][r] for i in sides)
                              for r in range(len(self.plain[u])))
            for u in range(len(self.plain)))

    def ratios(self) -> list[float]:
        """[units]: each unit's ratio plain / spec, the median over its repeats of the ratio of
        the same pair (two calls that shared the machine's state)."""
        return [statistics.median(p / s for p, s in zip(ps, ss))
                for ps, ss in zip(self.plain, self.spec)]

    def repeat_ws(self) -> list[float]:
        """[repeat]: the WS each repeat alone gives (the median over the units of its ratios)."""
        return [statistics.median(ps[r] / ss[r] for ps, ss in zip(self.plain, self.spec))
                for r in range(len(self.plain[0]))]

    def typical(self, side: str | int) -> list[int]:
        """[units]: the repeat whose time is the (lower) median of the unit's times on ``side``
        (``PairTimes.side``): a real call, so its phase timings can be reported with it."""
        return [sorted(range(len(ts)), key=ts.__getitem__)[(len(ts) - 1) // 2]
                for ts in self.side(side)]

    def total(self, side: str | int) -> float:
        """Seconds of ``side`` summed over the units, each unit at its ``typical`` repeat."""
        return sum(ts[r] for ts, r in zip(self.side(side), self.typical(side)))


@dataclass(frozen=True)
class Speedup:
    """The walltime speedup of one row and how far it can be trusted.

    WS is the **median of the per-unit ratios** (``PairTimes.ratios``), not the ratio of two
    medians (or sums) of times: each ratio divides two calls that ran back to back on the same
    prompt, so a background load that comes and goes slowly cancels inside it, whereas a median
    of beam-search times and one of speculation times are taken over calls made at different
    moments and let the load back in. It is the speedup of a typical request. Its spread is the
    interquartile range [``q1``, ``q3``] of the same ratios, which holds WS by construction:
    differences between prompts (rounds per request) and noise both widen it."""

    ws: float  # median of the per-unit ratios
    q1: float  # their first quartile
    q3: float  # their third quartile
    prompts: int  # prompts timed
    units: int  # ratios (prompts, or batches of them)
    repeat_ws: tuple[float, ...]  # [repeat] each repeat's WS
    passes: int = 1  # measurements made (1 + extra passes while unstable)

    @classmethod
    def of(cls, times: PairTimes, prompts: int, passes: int = 1) -> Speedup:
        q1, ws, q3 = quartiles(times.ratios())
        return cls(ws, q1, q3, prompts, len(times.plain), tuple(times.repeat_ws()), passes)

    @property
    def spread(self) -> float:
        """(q3 - q1) / WS."""
        return (self.q3 - self.q1) / self.ws

    @property
    def disagreement(self) -> float:
        """(largest - smallest repeat WS) / WS (0 with one repeat)."""
        return (max(self.repeat_ws) - min(self.repeat_ws)) / self.ws

    @property
    def instability(self) -> float:
        """> 1 when unstable: the larger of spread and disagreement over their thresholds."""
        return max(self.spread / UNSTABLE_SPREAD, self.disagreement / UNSTABLE_REPEATS)

    @property
    def unstable(self) -> bool:
        return self.instability > 1.0

    def fields(self) -> dict[str, Any]:
        """The row's columns: ``ws``, ``ws_q1``, ``ws_q3``, ``ws_prompts``, ``ws_units``,
        ``ws_repeats`` (each repeat's WS), ``ws_passes``, ``unstable``."""
        return {"ws": self.ws, "ws_q1": self.q1, "ws_q3": self.q3, "ws_prompts": self.prompts,
                "ws_units": self.units, "ws_repeats": list(self.repeat_ws),
                "ws_passes": self.passes, "unstable": self.unstable}

    def text(self) -> str:
        return ws_text(self.fields())


def ws_text(row: dict[str, Any], flag: bool = True) -> str:
    """A row's WS with the interquartile range of its per-prompt ratios: ``1.23x [1.10-1.35]``,
    and `` unstable`` when it is (and ``flag``)."""
    text = f"{row['ws']:.2f}x [{row['ws_q1']:.2f}-{row['ws_q3']:.2f}]"
    return text + (" unstable" if flag and row["unstable"] else "")


@dataclass(frozen=True)
class PairedRun(Generic[X, Y]):
    """One pass of ``time_pairs``: the times, their speedup and every call's result."""

    times: PairTimes
    speedup: Speedup
    plain: list[list[X]]  # [units][repeat] results of beam search
    spec: list[list[Y]]  # [units][repeat] results of speculation


def time_pairs(plain: Callable[[int], X], spec: Callable[[int], Y], units: int, repeat: int,
               clock: Clock = time.perf_counter, beside: Sequence[Callable[[int], object]] = (),
               ) -> tuple[PairTimes, list[list[X]], list[list[Y]]]:
    """``plain(u)`` and ``spec(u)`` for every unit u, back to back, ``repeat`` times per unit; the
    order alternates between repeats and between units (``interleaved``); after each pair, each
    call of ``beside`` on the same unit. Returns the times and the results ([units][repeat])."""
    times: list[list[list[float]]] = [[[] for _ in range(units)] for _ in range(2 + len(beside))]
    plain_out: list[list[X]] = [[] for _ in range(units)]
    spec_out: list[list[Y]] = [[] for _ in range(units)]
    for u in range(units):
        for r in range(repeat):
            (ps, ss), (po, so) = interleaved([lambda: plain(u), lambda: spec(u)], 1, clock, start=u + r)
            (ts, _) = interleaved([lambda f=f: f(u) for f in beside], 1, clock) if beside else ([], [])
            for side, t in zip(times, [ps, ss, *ts]):
                side[u].append(t[0])
            plain_out[u].append(po[0])
            spec_out[u].append(so[0])
    plain_s, spec_s, *rest = [tuple(tuple(ts) for ts in side) for side in times]
    return PairTimes(plain_s, spec_s, tuple(rest)), plain_out, spec_out


def paired_speedup(plain: Callable[[int], X], spec: Callable[[int], Y], units: int, prompts: int,
                   repeat: int, clock: Clock = time.perf_counter,
                   extra_passes: int = EXTRA_PASSES,
                   beside: Sequence[Callable[[int], object]] = ()) -> PairedRun[X, Y]:
    """``time_pairs``, then again while the result is unstable (``Speedup.unstable``), at most
    ``extra_passes`` more times; returns the most stable pass (its ``passes``: how many ran)."""
    runs: list[PairedRun[X, Y]] = []
    while not runs or (runs[-1].speedup.unstable and len(runs) <= extra_passes):
        times, plain_out, spec_out = time_pairs(plain, spec, units, repeat, clock, beside)
        runs.append(PairedRun(times, Speedup.of(times, prompts), plain_out, spec_out))
    best = min(runs, key=lambda run: run.speedup.instability)
    return PairedRun(best.times, Speedup.of(best.times, prompts, len(runs)), best.plain, best.spec)


def oracle_pass(target: torch.nn.Module, width: int, gamma: int) -> Callable[[Batch], None]:
    """ONE target forward over a batch's prompts + width*gamma tree tokens (width K: the oracle
    pass; width N: a verification pass over a full N-beam draft tree)."""
    return tree_pass(target, (width,) * gamma)


def tree_pass(target: torch.nn.Module, levels: tuple[int, ...]) -> Callable[[Batch], None]:
    """ONE target forward over a batch's prompts + a draft tree of ``levels`` (N_l nodes at
    its level l, each a child of a node of the level above): sum(levels) tree tokens per
    prompt, the verification pass of a round drafted with per-level widths."""
    import torch

    from atspeed_ray.decoding.beam import prefill
    from atspeed_ray.decoding.tree import Nodes

    def one(batch: Batch) -> None:
        B, T = len(batch), sum(levels)
        dev = next(target.parameters()).device
        tok = torch.ones(B, T, dtype=torch.long, device=dev)
        depth, parent, start = [], [], 0  # per tree token: its level, its parent (-1: the prefix)
        for d, n in enumerate(levels):
            above = levels[d - 1] if d else 0
            depth += [d] * n
            parent += [start - above + i % above for i in range(n)] if d else [-1] * n
            start += n
        depth_t = torch.tensor(depth, device=dev).expand(B, T)
        parent_t = torch.tensor(parent, device=dev).expand(B, T)
        nodes = Nodes(tok, depth_t, parent_t, torch.full((B, T, 1), -1, device=dev),
                      torch.ones(B, T, dtype=torch.bool, device=dev))
        prefill(target, batch, nodes)

    return one


def code_cover(target: torch.nn.Module, draft: torch.nn.Module, index: ItemIndex,
               prompt_batches: list[Batch], k: int) -> list[list[int]]:
    """Per prompt, per code position (L values): the draft width that position needs when a round
    starts there from the target's own top-k beams. The target runs its beam search; at every
    step the draft scores the same candidates (the target's prefix score + the draft's log-prob,
    as drafting's first step ranks them), and the value is the smallest N whose top N hold the
    target's top k (``cover_width``). Strict acceptance of that step needs N >= it; a step drafted
    deeper in a round, from the draft's own beams, needs at least as much. Position 1 is the
    first code, drafted from the root."""
    import torch

    from atspeed_ray.decoding.beam import beam_search
    from atspeed_ray.metrics import cover_width

    need: list[list[int]] = []
    for batch in prompt_batches:
        widths: list[torch.Tensor] = []  # per code position: [B]

        def observe(d: int, cands: dict) -> None:
            widths.append(cover_width(cands["target"].scores, cands["draft"].scores.float(), k))

        beam_search(target, batch, index, k, followers={"draft": draft}, observe=observe)
        need += torch.stack(widths, dim=1).tolist()  # [B, L]
    return need


def feature_cover(target: torch.nn.Module, draft: FeatureDraft, index: ItemIndex,
                  prompt_batches: list[Batch], k: int) -> list[list[int | None]]:
    """``code_cover`` of a feature draft: per prompt, per code position, the width a round's first
    drafted step there needs, from the target's own feature of the parent along the target's
    beams (``training.feature.width_needed``, its ``first`` widths). Position 1 is None: the
    first code is the target's prefill, never drafted."""
    from atspeed_ray.training.feature import target_tree, width_needed

    need: list[list[int | None]] = []
    for batch in prompt_batches:
        widths = width_needed(draft, target_tree(target, batch, index, k), index, k)
        by_position = [widths[f"code{d}_first"] for d in range(2, index.L + 1)]  # [L - 1][B]
        need += [[None, *row] for row in zip(*by_position)] if by_position else [[None]] * len(batch)
    return need


def draft_cover(target: torch.nn.Module, drafter: Drafter, index: ItemIndex,
                prompt_batches: list[Batch], k: int) -> list[list[int | None]]:
    """Per prompt, per code position: the draft width strict acceptance there needs
    (``code_cover`` for a causal-LM draft, ``feature_cover`` for a feature draft; None where the
    drafter never drafts that position). Another kind has no measure here yet: None everywhere
    (the columns read "-")."""
    from atspeed_ray.decoding.drafting import LMDrafter
    from atspeed_ray.drafts.feature import FeatureDrafter

    if isinstance(drafter, LMDrafter):
        return code_cover(target, drafter.model, index, prompt_batches, k)  # type: ignore[return-value]
    if isinstance(drafter, FeatureDrafter):
        return feature_cover(target, drafter.model, index, prompt_batches, k)
    return [[None] * index.L for b in prompt_batches for _ in b]


def first_proposal(target: torch.nn.Module | None, drafter: Drafter, index: ItemIndex,
                   params: SearchParams, batch: Batch) -> ProposeCall | None:
    """The speculative loop's first drafting call for ``batch`` (top-N drafting, unseeded): at
    the root for a drafter that reads tokens only (no target call comes before it; ``target``
    may be None); after the target's prefill (the loop's first round, answered here) for one
    that reads the target's features. None when the loop never drafts (too few codes)."""
    import torch

    from atspeed_ray.decoding.beam import root_beams, score_dtype
    from atspeed_ray.decoding.drafting import ProposeCall
    from atspeed_ray.decoding.speculative import LocalModels, speculative_loop

    top_n = params.strict()
    if not drafter.wants_features:
        B, G, dev = len(batch), min(params.gamma, index.L - 1), index.device
        if G < 1:
            return None
        dtype = torch.float32 if target is None else score_dtype(target)
        beams = root_beams(B, params.k, index.L, ["target", "draft"], dev, dtype)
        t = torch.zeros(B, dtype=torch.long, device=dev)
        return ProposeCall(beams, t, torch.full_like(t, G), batch, top_n)
    if target is None:
        raise ValueError("a feature draft's round starts from the target's prefill: give a target")
    loop = speculative_loop(batch, index, top_n, dtype=score_dtype(target), features=True)
    answer = LocalModels(target, drafter, index)
    try:
        call = next(loop)
        while not isinstance(call, ProposeCall):
            call = loop.send(answer(call))
    except StopIteration:
        return None
    loop.close()
    return call


def draft_round_time(target: torch.nn.Module | None, draft: Drafter | torch.nn.Module,
                     index: ItemIndex, prompt_batches: list[Batch], params: SearchParams,
                     repeat: int = 1) -> float:
    """Time of the draft's first round for each batch (``draft_round``), each the best of
    ``repeat``."""
    return time_per_batch(draft_round(target, draft, index, params, prompt_batches),
                          prompt_batches, repeat)


def draft_round(target: torch.nn.Module | None, draft: Drafter | torch.nn.Module, index: ItemIndex,
                params: SearchParams, prompt_batches: list[Batch]) -> Callable[[Batch], None]:
    """The draft's first round for a batch of ``prompt_batches``: the first drafting call of the
    speculative loop (``first_proposal``, made here for every batch, untimed), answered by the
    draft alone with no cache. A causal LM: its prefill and min(gamma, L - 1) width-N steps from
    the root, as ``draft_phase`` runs them (``target`` may be None); a feature draft: its
    min(gamma, L - 2) steps after the target's prefill."""
    from atspeed_ray.decoding.drafting import as_drafter

    drafter = as_drafter(draft)
    calls = {tuple(map(tuple, b)): first_proposal(target, drafter, index, params, b)
             for b in prompt_batches}

    def one(batch: Batch) -> None:
        call = calls[tuple(map(tuple, batch))]
        if call is not None:
            drafter.propose(call, index, None)

    return one


def summed_timings(parts: Sequence[Timings], device: torch.device) -> Timings:
    """One ``Timings`` holding the sum of ``parts`` (phase by phase, and their totals)."""
    from atspeed_ray.decoding.timing import PHASES, Timings

    out = Timings(device)
    for t in parts:
        out.total += t.total
        for name in PHASES:
            out.seconds[name] += t.seconds[name]
    return out


def measure_speculative(target: torch.nn.Module, draft: Drafter | torch.nn.Module, index: ItemIndex,
                        prompts: list[list[int]], params: SearchParams, batch_size: int,
                        repeat: int = 1, clock: Clock | None = None) -> tuple[dict, list, list]:
    """Time the target's beam search and speculative beam search on the same prompts (same
    process, warm-up first) in pairs: per batch of ``batch_size`` prompts the two run back to
    back, ``repeat`` times, the order alternating (``paired_speedup``: WS is the median of the
    per-batch ratios, with their interquartile range; an unstable row is measured again), and
    the bounds' passes right after each pair (each bound paired like WS). The speculative time
    is split by phase (``Timings``). ``draft``: any ``Drafter`` (``drafts.load_drafter``) or a
    causal LM.
    Relaxed sampling draws from ``params.seed`` (every batch's rows from their own streams).
    Returns (row of measurements, plain items, speculative items)."""
    import torch

    from atspeed_ray.decoding import beam_search, speculative_search
    from atspeed_ray.decoding.drafting import as_drafter
    from atspeed_ray.decoding.speculative import POSITION_STAT_NAMES, STAT_NAMES
    from atspeed_ray.decoding.timing import Timings

    draft = as_drafter(draft)
    prompt_batches = batches(prompts, batch_size)
    k, n = params.k, params.N
    # on the CPU every timed speculative call carries its own phase timer (a few clock reads per
    # round); on CUDA the timer synchronises at every phase, so it runs once more, untimed
    on_cpu = index.device.type == "cpu"

    def plain(u: int) -> Any:
        return beam_search(target, prompt_batches[u], index, k)

    def spec(u: int) -> tuple[Any, Timings | None]:
        timings = Timings(index.device) if on_cpu else None
        return speculative_search(target, draft, prompt_batches[u], index, params,
                                  timings=timings), timings

    # the bounds' calls, timed right after each pair: one target pass over K*gamma tree tokens,
    # one over N*gamma, the draft's first round
    bounds = [oracle_pass(target, k, params.gamma), oracle_pass(target, n, params.gamma),
              draft_round(target, draft, index, params, prompt_batches)]
    beside = [lambda u, f=f: f(prompt_batches[u]) for f in bounds]
    with torch.no_grad(), timing_threads(index.device) as threads:
        beam_search(target, prompt_batches[0], index, k)  # warm-up
        speculative_search(target, draft, prompt_batches[0], index, params)
        for f in beside:
            f(0)
        run = paired_speedup(plain, spec, len(prompt_batches), len(prompts), repeat,
                             clock or device_clock(index.device), beside=beside)
        # per batch, the call at the median time of its side (``PairTimes.typical``)
        ref = [run.plain[u][r] for u, r in enumerate(run.times.typical("plain"))]
        outs = [run.spec[u][r] for u, r in enumerate(run.times.typical("spec"))]
        out = [o for o, _ in outs]
        if on_cpu:
            timings = summed_timings([t for _, t in outs], index.device)
        else:
            timings = Timings(index.device)
            for b in prompt_batches:
                speculative_search(target, draft, b, index, params, timings=timings)
        cover = draft_cover(target, draft, index, prompt_batches, k)  # [P][L]
    times = run.times
    t_plain, t_pass, t_tree, t_draft = (times.total(side) for side in ("plain", 0, 1, 2))
    ref_items = [i for r in ref for i in r.items]
    out_items = [i for r in out for i in r.items]
    row = speed_row(params, batch_size, run.speedup, times, t_plain, times.total("spec"),
                    {key: [v for r in out for v in r.stats[key]]
                     for key in (*STAT_NAMES, *POSITION_STAT_NAMES)})
    row.update(breakdown_ms(timings, len(prompts), t_plain, t_pass, t_tree, t_draft))
    row.update(width_columns(cover))
    row["threads"] = threads
    if params.mode == "strict":
        row["identical_rate"] = sum(a == b for a, b in zip(out_items, ref_items)) / len(prompts)
    return row, ref_items, out_items


def width_columns(cover: list[list[int | None]]) -> dict[str, int | str | None]:
    """``code{d}_width_median`` / ``_max`` over the prompts, for every code position d (1-based)
    of ``draft_cover`` (the draft width each position needs; None where the draft never drafts
    it), and all of them in one string, ``code_width_by_position``: "median/max" per position
    ("-" where not drafted), comma-separated."""
    out: dict[str, int | str | None] = {}
    parts = []
    for d, widths in enumerate(zip(*cover), start=1):
        if any(x is None for x in widths):
            out[f"code{d}_width_median"] = out[f"code{d}_width_max"] = None
            parts.append("-")
            continue
        w = sorted(widths)  # type: ignore[type-var]
        median, most = w[len(w) // 2], w[-1]
        out[f"code{d}_width_median"], out[f"code{d}_width_max"] = median, most
        parts.append(f"{median}/{most}")
    out["code_width_by_position"] = ", ".join(parts)
    return out


BREAKDOWN_COLUMNS = ("draft_ms", "verify_ms", "accept_ms", "bookkeeping_ms", "rest_ms",
                     "total_ms", "beam_search_ms", "oracle_pass_ms", "tree_pass_ms",
                     "draft_round_ms")


def breakdown_ms(timings: Timings, n_requests: int, t_plain: float, t_pass: float,
                 t_tree: float, t_draft: float) -> dict[str, float]:
    """Milliseconds per request (``BREAKDOWN_COLUMNS``): the speculative search by phase (their
    sum is ``total_ms``), beside the target's beam search and the bounds' parts (one oracle
    pass over K*gamma tree tokens, one over N*gamma, the draft's first round)."""
    row = timings.per_request(n_requests)
    for name, seconds in (("beam_search_ms", t_plain), ("oracle_pass_ms", t_pass),
                          ("tree_pass_ms", t_tree), ("draft_round_ms", t_draft)):
        row[name] = 1e3 * seconds / n_requests
    return row


def speed_row(params: SearchParams, batch_size: int, speedup: Speedup, times: PairTimes,
              t_plain: float, t_spec: float, stats: dict[str, list[int]]) -> dict[str, Any]:
    """One row of the speed table from the paired speedup, the paired times (their ``beside``
    sides: the K*gamma pass, the N*gamma pass, the draft round; each bound paired like WS), the
    two sides' times (s, summed over the batches at their median calls) and the per-request
    counters."""
    n_requests = len(stats["rounds"])
    oracle = times.bound([0])
    return {
        "k": params.k, "draft_beams": params.N, "gamma": params.gamma, "mode": params.mode,
        "level_widths": list(params.widths),  # per code position, the last holding for later codes
        "expand_last": params.expand_last,
        "relaxed_keep": params.relaxed_keep,
        "batch_size": batch_size, "beam_search_s": t_plain, "speculative_s": t_spec,
        **speedup.fields(),
        "walltime_speedup": speedup.ws,  # = ws, the name the tables and scripts read
        "oracle_speedup": oracle,
        "fraction_of_oracle": speedup.ws / oracle,
        # WS if every round were fully accepted and drafting were free, at this N: the verify
        # pass carries N*gamma drafted tokens, not K*gamma, so fraction_of_oracle is at most
        # about T(K pass) / T(N pass) whatever the draft
        "tree_bound_speedup": times.bound([1]),
        # ... and with the draft's cost counted: every request done in ONE fully accepted round
        # (one draft round + one verify pass), no bookkeeping
        "one_round_bound_speedup": times.bound([1, 2]),
        "target_calls_per_request": sum(stats["target_calls"]) / n_requests,
        "draft_calls_per_request": sum(stats["draft_calls"]) / n_requests,
        "accepted_steps_per_round": sum(stats["accepted_steps"]) / sum(stats["rounds"]),
        "accepted_steps_per_request": stats["accepted_steps"],
        "rounds_per_request": stats["rounds"],
        **position_acceptance(stats),
    }


def position_acceptance(stats: dict[str, list]) -> dict[str, Any]:
    """Summed over the requests, per code position: rounds whose drafted token there was
    verified, and those where it was accepted (strict: where the target's top-K was lost);
    ``accepted_by_position`` says it in one string ("1: 30/30, 2: 5/30, ...", 1-based)."""
    from atspeed_ray.decoding.speculative import POSITION_STAT_NAMES

    out: dict[str, Any] = {name: [sum(col) for col in zip(*stats[name])] for name in POSITION_STAT_NAMES}
    pairs = zip(out["accepted_at_position"], out["drafted_at_position"])
    out["accepted_by_position"] = ", ".join(f"{d + 1}: {a}/{n}" for d, (a, n) in enumerate(pairs) if n)
    return out


def search_params(k: int, width: WidthPolicy, gamma: int, mode: str, seed: int,
                  device: torch.device, expand_last: int = EXPAND_LAST,
                  relaxed_keep: RelaxedKeep = DEFAULT_RELAXED_KEEP) -> SearchParams:
    """The search of one table row: width ``width.resolve(k)``; relaxed sampling seeded with
    ``seed`` (``device`` is unused: the numbers are made where sampling happens); children steps
    (``expand_last``) in strict rows only, ``relaxed_keep`` in relaxed rows only."""
    from atspeed_ray.decoding.search import SearchParams

    strict = mode == "strict"
    return SearchParams(k, width.resolve(k), gamma, mode, seed,  # type: ignore[arg-type]
                        expand_last=expand_last if strict else 0,
                        relaxed_keep=DEFAULT_RELAXED_KEEP if strict else relaxed_keep)
