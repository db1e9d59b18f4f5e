"""Where the time goes: the optional phase timer of speculative search and bench's breakdown."""

from __future__ import annotations

import time

import pytest
import torch

from atspeed_ray.benchmarking import BREAKDOWN_COLUMNS, measure_speculative, timing_threads
from atspeed_ray.settings import TIMING_THREADS
from atspeed_ray.decoding import SearchParams, speculative_search
from atspeed_ray.decoding.timing import PHASES, Timings
from tests.helpers import random_catalog, random_model, random_prompts, vocab_size

CODEBOOK = [16, 16, 16]


@pytest.fixture(scope="module")
def setup():
    index = random_catalog(600, CODEBOOK, seed=0)
    V = vocab_size(CODEBOOK)
    target = random_model(V, seed=1)
    draft = random_model(V, seed=2, hidden=16, layers=1)
    return index, target, draft, random_prompts(4, V, seed=3)


@pytest.mark.parametrize("mode", ["strict", "relaxed"])
def test_timed_search_gives_the_same_result_and_phases_sum_to_its_time(setup, mode):
    index, target, draft, prompts = setup
    params = SearchParams(5, 10, 2, mode, 0)
    plain = speculative_search(target, draft, prompts, index, params)
    timings = Timings()
    params = SearchParams(5, 10, 2, mode, 0)
    t0 = time.perf_counter()
    out = speculative_search(target, draft, prompts, index, params, timings=timings)
    outside = time.perf_counter() - t0
    assert out.items == plain.items and torch.equal(out.scores, plain.scores)
    assert set(timings.seconds) == set(PHASES)
    assert all(s > 0 for s in timings.seconds.values())  # every phase ran at least once
    phases = sum(timings.seconds.values())
    assert phases <= timings.total <= outside
    assert timings.rest == pytest.approx(timings.total - phases)
    assert timings.total > 0.9 * outside  # the timer brackets (almost) the whole call
    ms = timings.per_request(len(prompts))
    assert sum(ms[f"{p}_ms"] for p in PHASES) + ms["rest_ms"] == pytest.approx(ms["total_ms"])


def test_timings_add_up_over_calls(setup):
    index, target, draft, prompts = setup
    params = SearchParams(3, 3, 1, "strict", None)
    timings = Timings()
    speculative_search(target, draft, prompts[:2], index, params, timings=timings)
    first = dict(timings.seconds), timings.total
    speculative_search(target, draft, prompts[2:], index, params, timings=timings)
    assert all(timings.seconds[p] > first[0][p] for p in PHASES) and timings.total > first[1]


def test_bench_row_carries_the_breakdown_and_it_sums_to_the_measured_time(setup):
    index, target, draft, prompts = setup
    params = SearchParams(5, 10, 2, "strict", None)
    row, ref, out = measure_speculative(target, draft, index, prompts, params, batch_size=2,
                                        repeat=2)
    assert row["identical_rate"] == 1.0 and ref == out
    for col in BREAKDOWN_COLUMNS:
        assert row[col] >= 0, col
    parts = sum(row[c] for c in ("draft_ms", "verify_ms", "accept_ms", "bookkeeping_ms", "rest_ms"))
    assert parts == pytest.approx(row["total_ms"])
    # the phases were timed in the reported calls themselves (each batch's median call): their
    # total sits inside those calls' time
    measured_ms = 1e3 * row["speculative_s"] / len(prompts)
    assert 0.8 * measured_ms <= row["total_ms"] <= measured_ms * 1.0001
    assert row["beam_search_ms"] == pytest.approx(1e3 * row["beam_search_s"] / len(prompts))
    assert row["verify_ms"] > 0 and row["draft_ms"] > 0 and row["oracle_pass_ms"] > 0
    # WS: the median of the per-batch paired ratios, inside their interquartile range
    assert row["walltime_speedup"] == row["ws"] and row["ws_q1"] <= row["ws"] <= row["ws_q3"]
    assert row["ws_prompts"] == 4 and row["ws_units"] == 2 and len(row["ws_repeats"]) == 2
    assert 1 <= row["ws_passes"] <= 3 and isinstance(row["unstable"], bool)
    assert row["fraction_of_oracle"] == pytest.approx(row["ws"] / row["oracle_speedup"])
    assert 0 < row["fraction_of_oracle"]
    assert row["threads"] == TIMING_THREADS


def test_timing_runs_with_the_timing_threads_and_restores_the_count():
    import torch

    before = torch.get_num_threads()
    with timing_threads(torch.device("cpu"), 1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with timing_threads(torch.device("cpu"), 0) as n:  # 0: torch's own count
        assert n == before and torch.get_num_threads() == before


def test_evaluate_speed_table_carries_the_breakdown_columns():
    from atspeed_ray.evaluate import SPEED_COLUMNS

    assert set(BREAKDOWN_COLUMNS) <= set(SPEED_COLUMNS) and "fraction_of_oracle" in SPEED_COLUMNS


def plain_cover(target, draft, index, prompt: list[int], k: int) -> list[int]:
    """Reference for code positions 1 and 2 of ``code_cover``, by plain full-sequence forwards:
    the target's top k first codes, then every trie child of those, scored by the target's prefix
    log-prob plus each model's log-prob of the child."""
    def logp(model, tokens):
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].double(), -1)

    def width(t_scores: dict, d_scores: dict) -> int:
        top = sorted(t_scores, key=t_scores.get, reverse=True)[:k]
        order = sorted(d_scores, key=d_scores.get, reverse=True)
        return max(order.index(c) for c in top) + 1

    codes = index.codes.tolist()
    first = sorted({c[0] for c in codes})
    t1, d1 = logp(target, prompt), logp(draft, prompt)
    need = [width({c: float(t1[c]) for c in first}, {c: float(d1[c]) for c in first})]
    beams = sorted(first, key=lambda c: float(t1[c]), reverse=True)[:k]
    t2, d2 = {}, {}
    for c1 in beams:
        lt, ld = logp(target, prompt + [c1]), logp(draft, prompt + [c1])
        for c2 in sorted({c[1] for c in codes if c[0] == c1}):
            t2[c1, c2] = float(t1[c1] + lt[c2])
            d2[c1, c2] = float(t1[c1] + ld[c2])
    return need + [width(t2, d2)]


def test_code_cover_is_k_for_the_target_itself_and_matches_plain_forwards(setup):
    from atspeed_ray.benchmarking import code_cover

    index, target, draft, prompts = setup
    root = int((index.child_table(torch.tensor(0)) >= 0).sum())
    for k in (1, 3, 5):
        same = code_cover(target, target, index, [prompts[:2], prompts[2:]], k)
        assert same == [[k] * index.L] * 4
        other = code_cover(target, draft, index, [prompts], k)
        assert [row[:2] for row in other] == [plain_cover(target, draft, index, p, k) for p in prompts]
        assert all(k <= n for row in other for n in row)
        assert any(n > k for row in other for n in row)  # an unrelated draft misses somewhere
    # a draft that ranks every token in reverse needs (almost) all first codes
    assert all(row[0] > root - 5 for row in code_cover(target, Negated(target), index, [prompts], 5))


def test_bench_row_carries_the_width_every_code_position_needs(setup):
    index, target, draft, prompts = setup
    row, _, _ = measure_speculative(target, draft, index, prompts, SearchParams(3, 6, 2),
                                    batch_size=4)
    root = int((index.child_table(torch.tensor(0)) >= 0).sum())
    assert 3 <= row["code1_width_median"] <= row["code1_width_max"] <= root
    parts = row["code_width_by_position"].split(", ")
    assert len(parts) == index.L
    for d, part in enumerate(parts, start=1):
        assert part == f"{row[f'code{d}_width_median']}/{row[f'code{d}_width_max']}"
        assert 3 <= row[f"code{d}_width_median"] <= row[f"code{d}_width_max"]


class Negated(torch.nn.Module):
    """A model whose logits are another's, negated: it ranks every token in reverse."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, cache=None, **kw):
        out = self.model(cache=cache, **kw)
        out.logits = -out.logits
        return out


def test_relaxed_keep_reaches_relaxed_rows_only(setup):
    """``--relaxed-keep`` (bench, evaluate): a relaxed row's search keeps what it says, a strict
    row of the same run stays the exact strict search; the row records it."""
    from atspeed_ray.benchmarking import SpeedFlags, search_params
    from atspeed_ray.width_policy import WidthPolicy

    index, target, draft, prompts = setup
    assert SpeedFlags(data="d", target="t").relaxed_keep == "sample"
    with pytest.raises(ValueError, match="relaxed_keep"):
        SpeedFlags(data="d", target="t", relaxed_keep="best")
    w = WidthPolicy.parse("2k")
    strict = search_params(3, w, 2, "strict", 0, index.device, relaxed_keep="top")
    relaxed = search_params(3, w, 2, "relaxed", 0, index.device, relaxed_keep="top")
    assert strict.relaxed_keep == "sample" and relaxed.relaxed_keep == "top"
    row, _, _ = measure_speculative(target, draft, index, prompts[:2], relaxed, batch_size=2, repeat=1)
    assert row["relaxed_keep"] == "top" and row["mode"] == "relaxed"
