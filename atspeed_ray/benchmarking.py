"""What ``bench`` and ``evaluate`` share: their command-line values and the speed measurements.

* command line: ``parse_ks`` (``--k 1,5,10``), ``parse_counts`` (``--batch-size 1,8,32``),
  ``DraftWidth`` (``--draft-beams 20``, ``2k`` or ``auto``), ``add_forward_arg``, ``positive``;
* measurements: ``timed`` / ``time_per_batch``, the two bounds (``oracle_pass_time``: one target
  pass over a full tree; ``draft_round_time``: the draft's first round) and
  ``measure_speculative``, which times the target's beam search against speculative beam search
  on the same prompts in the same process, with the speculative time split by phase
  (``breakdown_ms``: draft, verify, accept, bookkeeping, rest per request);
* ``--draft-beams auto``: ``row_params`` picks N per K and batch size by measured cost
  (``atspeed_ray.width``) on a few validation prompts before the row is timed.

Torch is imported inside the functions: the CLI imports this module for ``--help``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from atspeed_ray.settings import (
    AUTO, DEFAULT_COMPILE, DEFAULT_FORWARD, DEFAULT_PACK, EXPAND_LAST, FORWARDS, PRECISIONS,
    draft_width,
)

if TYPE_CHECKING:
    import torch

    from atspeed_ray.data.index import ItemIndex
    from atspeed_ray.decoding.search import SearchParams
    from atspeed_ray.decoding.timing import Timings
    from atspeed_ray.width import WidthChoice

X = TypeVar("X")
Batch = list[list[int]]  # prompts decoded together


# ----------------------------------------------------------------------------- command line
def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def int_list(flag: str) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers, each >= 1 (``flag`` names them in errors)."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be comma-separated integers, got {text!r}")
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{flag} values must be >= 1, got {text!r}")
        return values

    return parse


parse_ks = int_list("--k")  # --k 1,5,10: beam counts
parse_counts = int_list("--batch-size")  # --batch-size 1,8,32: requests decoded together


class DraftWidth:
    """``--draft-beams``: a fixed width N ("20"), a multiple of K ("2k"; never below K), or
    ``auto``: chosen per K by measured cost (``atspeed_ray.width``, see ``row_params``)."""

    def __init__(self, text: str):
        t = text.strip().lower()
        self.auto = t == AUTO
        if self.auto:
            self.factor, self.fixed, self.text = None, None, AUTO
            return
        try:
            self.factor = float(t[:-1]) if t.endswith("k") else None
            self.fixed = None if t.endswith("k") else int(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--draft-beams must be N or a multiple of K like 2k, got {text!r}")
        if (self.factor is not None and self.factor < 1) or (self.fixed is not None and self.fixed < 1):
            raise argparse.ArgumentTypeError(f"--draft-beams must be >= 1 (or >= 1k), got {text!r}")
        self.text = text

    def of(self, k: int) -> int:
        """N for ``k``: the fixed width, or ceil(factor * k) as the serve configs'
        draft_beams_factor; at least k (``auto``: k, until ``row_params`` measures it)."""
        if self.auto:
            return k
        if self.fixed is not None:
            return max(self.fixed, k)
        assert self.factor is not None
        return draft_width(k, self.factor)

    def __repr__(self) -> str:
        return self.text


def parse_widths(text: str) -> list[DraftWidth]:
    """``bench --draft-beams 1k,2k,auto``: several widths, each timed as its own row (a sweep
    beside the automatic choice, in one process)."""
    return [DraftWidth(t) for t in text.split(",") if t.strip()] or [DraftWidth("")]


def add_forward_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--forward", choices=FORWARDS, default=DEFAULT_FORWARD,
                   help="decoding forward: compact FastLlama (Llama checkpoints) or the HF model's")


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=DEFAULT_COMPILE,
                   help="torch.compile FastLlama's per-layer blocks (see the README's "
                        "'Compiled decoding step' for when it pays)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=DEFAULT_PACK,
                   help="lay FastLlama's weights out once for the CPU GEMM library (oneDNN bf16, "
                        "MKL fp32; not with --compile, nothing on a GPU)")


def add_expand_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expand-last", type=int, default=EXPAND_LAST, metavar="M",
                   help="strict: a round's last drafted step holds every trie child of the step "
                        "before it when there are at most M per request (no draft forward for "
                        "it; accepted whenever the step before is); 0 = the draft's top N "
                        "(default: %(default)s)")


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="decoding dtype: auto = bf16 on a GPU, fp32 on a CPU; bf16 on a CPU with "
                        "AMX or AVX512-BF16 (fp32 on other CPUs); the one used is printed")


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


def oracle_pass_time(target: torch.nn.Module, prompt_batches: list[Batch], width: int, gamma: int,
                   repeat: int = 1) -> float:
    """Time of ONE target forward over each batch's prompts + width*gamma tree tokens (width K:
    the oracle pass; width N: a verification pass over a full N-beam draft tree)."""
    import torch

    from atspeed_ray.decoding.beam import prefill
    from atspeed_ray.decoding.tree import Nodes

    def one(batch: Batch) -> None:
        B, T = len(batch), width * gamma
        dev = next(target.parameters()).device
        tok = torch.ones(B, T, dtype=torch.long, device=dev)
        idx = torch.arange(T, device=dev)
        depth = (idx // width).expand(B, T)  # gamma levels of width nodes below each other
        parent = torch.where(idx >= width, idx - width, -1).expand(B, T)
        nodes = Nodes(tok, depth, parent, torch.full((B, T, 1), -1, device=dev),
                      torch.ones(B, T, dtype=torch.bool, device=dev))
        prefill(target, batch, nodes)

    return time_per_batch(one, prompt_batches, repeat)


def cover_width(target_scores: torch.Tensor, draft_scores: torch.Tensor, k: int) -> torch.Tensor:
    """target_scores, draft_scores [B, F] (the same candidates, -inf where the trie forbids one)
    -> [B]: the smallest N whose top N by the draft's score hold all of the target's top k
    (0 for a request without a live candidate)."""
    import torch

    kk = min(k, target_scores.shape[1])
    top = target_scores.topk(kk, dim=1)  # the target's top kk candidates
    order = draft_scores.argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1).gather(1, top.indices) + 1  # [B, kk] the draft's rank (1 = best)
    return torch.where(torch.isfinite(top.values), rank, 0).max(dim=1).values


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

    need: list[list[int]] = []
    for batch in prompt_batches:
        widths: list[torch.Tensor] = []  # per code position: [B]

        def observe(d: int, cands: dict) -> None:
            widths.append(cover_width(cands["target"].scores, cands["draft"].scores.float(), k))

        beam_search(target, batch, index, k, followers={"draft": draft}, observe=observe)
        need += torch.stack(widths, dim=1).tolist()  # [B, L]
    return need


def draft_round_time(draft: torch.nn.Module, index: ItemIndex, prompt_batches: list[Batch],
                     params: SearchParams, repeat: int = 1) -> float:
    """Time of the draft's first round for each batch: its prefill and min(gamma, L - 1)
    width-N drafting steps from the root (top-N drafting), as ``draft_phase`` runs them."""
    import dataclasses

    import torch

    from atspeed_ray.decoding.beam import root_beams, score_dtype
    from atspeed_ray.decoding.drafting import draft_phase

    G = min(params.gamma, index.L - 1)
    top_n = dataclasses.replace(params, mode="strict", seed=None)

    def one(batch: Batch) -> None:
        B, dev = len(batch), index.device
        beams = root_beams(B, params.k, index.L, ["target", "draft"], dev, score_dtype(draft))
        t = torch.zeros(B, dtype=torch.long, device=dev)
        draft_phase(draft, None, beams, t, torch.full_like(t, G), batch, index, top_n)

    return time_per_batch(one, prompt_batches, repeat)


def alternate(plain: Callable[[], X], spec: Callable[[Timings | None], X], repeat: int,
              device: torch.device) -> tuple[float, X, float, X, Timings]:
    """Best of ``repeat`` alternating timings of ``plain()`` and ``spec(timings)``, so that a
    slow spell of the machine hits both. On the CPU the timed speculative runs carry the phase
    timer (a few clock reads per round) and the best run's phases are returned; on CUDA the
    timer synchronises at every phase, so it runs once more, untimed, on its own.
    Returns (plain s, plain result, speculative s, speculative result, phase timings)."""
    from atspeed_ray.decoding.timing import Timings

    t_plain = t_spec = float("inf")
    best: Timings | None = None
    for _ in range(repeat):
        t, ref = timed(plain)
        t_plain = min(t_plain, t)
        timings = Timings(device) if device.type == "cpu" else None
        t, out = timed(lambda: spec(timings))
        if t < t_spec:
            t_spec, best = t, timings
    if best is None:
        best = Timings(device)
        spec(best)
    return t_plain, ref, t_spec, out, best


def measure_speculative(target: torch.nn.Module, draft: torch.nn.Module, index: ItemIndex,
                        prompts: list[list[int]], params: SearchParams, batch_size: int,
                        repeat: int = 1) -> tuple[dict, list, list]:
    """Time the target's beam search and speculative beam search on the same prompts (same
    process, warm-up first; with ``repeat`` > 1 the two alternate and each keeps its best time),
    with the speculative time split by phase (``Timings``) and the bounds measured beside.
    Relaxed sampling draws from ``params.seed`` (every batch's rows from their own streams).
    Returns (row of measurements, plain items, speculative items)."""
    import torch

    from atspeed_ray.decoding import beam_search, speculative_search
    from atspeed_ray.decoding.speculative import POSITION_STAT_NAMES, STAT_NAMES

    prompt_batches = batches(prompts, batch_size)
    k, n = params.k, params.N

    def plain() -> list:
        return [beam_search(target, b, index, k) for b in prompt_batches]

    def spec(timings: Timings | None) -> list:
        return [speculative_search(target, draft, b, index, params, timings=timings)
                for b in prompt_batches]

    with torch.no_grad():
        beam_search(target, prompt_batches[0], index, k)  # warm-up
        speculative_search(target, draft, prompt_batches[0], index, params)
        t_plain, ref, t_spec, out, timings = alternate(plain, spec, repeat, index.device)
        t_pass = oracle_pass_time(target, prompt_batches, k, params.gamma, repeat)
        t_tree = t_pass if n == k else oracle_pass_time(target, prompt_batches, n, params.gamma, repeat)
        t_draft = draft_round_time(draft, index, prompt_batches, params, repeat)
        cover = code_cover(target, draft, index, prompt_batches, k)  # [P][L]
    ref_items = [i for r in ref for i in r.items]
    out_items = [i for r in out for i in r.items]
    row = speed_row(params, batch_size, t_plain, t_spec, t_pass, t_tree, t_draft,
                    {key: [v for r in out for v in r.stats[key]]
                     for key in (*STAT_NAMES, *POSITION_STAT_NAMES)})
    row.update(breakdown_ms(timings, len(prompts), t_plain, t_pass, t_tree, t_draft))
    row.update(width_columns(cover))
    if params.mode == "strict":
        row["identical_rate"] = sum(a == b for a, b in zip(out_items, ref_items)) / len(prompts)
    return row, ref_items, out_items


def width_columns(cover: list[list[int]]) -> dict[str, int | str]:
    """``code{d}_width_median`` / ``_max`` over the prompts, for every code position d (1-based)
    of ``code_cover`` (the draft width each position needs), and all of them in one string,
    ``code_width_by_position``: "median/max" per position, comma-separated."""
    out: dict[str, int | str] = {}
    parts = []
    for d, widths in enumerate(zip(*cover), start=1):
        w = sorted(widths)
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


def speed_row(params: SearchParams, batch_size: int, t_plain: float, t_spec: float, t_pass: float,
              t_tree: float, t_draft: float, stats: dict[str, list[int]]) -> dict[str, Any]:
    """One row of the speed table from the measured times (s) and the per-request counters."""
    n_requests = len(stats["rounds"])
    return {
        "k": params.k, "draft_beams": params.N, "gamma": params.gamma, "mode": params.mode,
        "expand_last": params.expand_last,
        "batch_size": batch_size, "beam_search_s": t_plain,
        "speculative_s": t_spec, "walltime_speedup": t_plain / t_spec,
        "oracle_speedup": t_plain / t_pass,
        "fraction_of_oracle": (t_plain / t_spec) / (t_plain / t_pass),
        # WS if every round were fully accepted and drafting were free, at this N: the verify
        # pass carries N*gamma drafted tokens, not K*gamma, so fraction_of_oracle is at most
        # t_pass / t_tree whatever the draft
        "tree_bound_speedup": t_plain / t_tree,
        # ... and with the draft's cost counted: every request done in ONE fully accepted round
        # (one draft round + one verify pass), no bookkeeping
        "one_round_bound_speedup": t_plain / (t_tree + t_draft),
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


def search_params(k: int, width: DraftWidth, gamma: int, mode: str, seed: int,
                  device: torch.device, expand_last: int = EXPAND_LAST) -> SearchParams:
    """The search of one table row: width ``width.of(k)``; relaxed sampling seeded with
    ``seed`` (``device`` is unused: the numbers are made where sampling happens); children steps
    (``expand_last``) in strict rows only."""
    from atspeed_ray.decoding.search import SearchParams

    return SearchParams(k, width.of(k), gamma, mode, seed,  # type: ignore[arg-type]
                        expand_last=expand_last if mode == "strict" else 0)


def row_params(params: SearchParams, width: DraftWidth, target: torch.nn.Module,
               draft: torch.nn.Module, index: ItemIndex, calibration: list[list[int]],
               batch_size: int, repeat: int = 2) -> tuple[SearchParams, WidthChoice | None]:
    """The search of a row: ``params`` as given, or with ``--draft-beams auto`` the width (and
    gamma) that ``choose_width`` finds cheapest on the ``calibration`` prompts at this batch
    size, each cost the best of ``repeat`` (at least 2) timings (printed); the choice is
    returned to be recorded with the row."""
    if not width.auto:
        return params, None
    from atspeed_ray.width import choose_width

    choice = choose_width(target, draft, index, calibration, params.k, (params.gamma,), batch_size,
                          repeat=max(2, repeat), expand_last=params.expand_last)
    print(f"    {choice.summary()}", flush=True)
    return choice.params(params), choice
