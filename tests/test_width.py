"""``--draft-beams auto``: the draft width chosen per K and batch size by measured cost
(``atspeed_ray.width``), in ``bench`` (beside a sweep, at several batch sizes) and ``evaluate``."""

from __future__ import annotations

import json

import pytest

from atspeed_ray.bench import BenchFlags
from atspeed_ray.width_policy import WidthPolicy
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.width import WidthCandidate, WidthChoice, calibration_batch, candidate_widths


def test_candidates_and_the_cheapest_wins():
    assert candidate_widths(1) == [1, 2, 3, 4]
    assert candidate_widths(10) == [10, 15, 20, 30, 40]
    assert candidate_widths(3, (1.0, 1.1)) == [3, 4]
    # N=20 takes fewer rounds but each costs more; expected ms = rounds x (pass + draft)
    choice = WidthChoice(10, 1, 8, [WidthCandidate(10, 3, 3.0, 100.0, 10.0),
                                    WidthCandidate(20, 3, 1.5, 120.0, 15.0),
                                    WidthCandidate(40, 3, 1.2, 200.0, 25.0)])
    assert choice.best.n == 20 and choice.best.expected_ms == pytest.approx(202.5)
    params = choice.params(SearchParams(10, 10, 3, "strict"))
    assert (params.k, params.N, params.gamma) == (10, 20, 3)
    rec = choice.record()
    assert rec["chosen_n"] == 20 and [c["n"] for c in rec["candidates"]] == [10, 20, 40]
    assert "N=20" in choice.summary()


def test_calibration_batch_fills_the_batch():
    assert calibration_batch([[1], [2]], 5) == [[1], [2], [1], [2], [1]]
    assert calibration_batch([[1], [2], [3]], 1) == [[1], [2], [3]]
    with pytest.raises(ValueError, match="no calibration prompts"):
        calibration_batch([], 4)


def test_draft_width_flag():
    """``--draft-beams``: N, a multiple of K, auto, or one per code position; one resolver."""
    assert WidthPolicy.parse("auto").auto and WidthPolicy.parse("auto").resolve(7) == 7
    widths = BenchFlags.model_fields["draft_beams"].metadata[0].func("1k,auto,20,2k/8k/2k")
    assert [str(w) for w in widths] == ["1k", "auto", "20", "2k/8k/2k"]
    assert not WidthPolicy.parse("2k").auto and WidthPolicy.parse("2k").resolve(5) == 10
    assert WidthPolicy.parse("20").resolve(5) == 20 and WidthPolicy.parse("20").resolve(30) == 30
    assert WidthPolicy.parse("1k/4k/2").resolve(1) == (1, 4, 2)
    assert WidthPolicy.parse("1k/4k/2").resolve(3) == (3, 12, 3)
    assert WidthPolicy.parse("2k/2k").resolve(3) == 6  # equal levels: one width
    assert WidthPolicy().with_measured({1: 2, 10: 20}).resolve(3) == 6  # nearest k's N/k
    for bad in ("wide", "0", "0.5k", "2k//3", ""):
        with pytest.raises(ValueError, match="--draft-beams"):
            WidthPolicy.parse(bad)


def test_draft_width_flag_errors_name_the_flag(capsys):
    from atspeed_ray.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--data", "d", "--target", "t", "--draft", "d", "--draft-beams", "2k/x"])
    assert "--draft-beams" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--repeat"):
        main(["bench", "--data", "d", "--target", "t", "--draft", "d", "--repeat", "0"])


def test_bench_auto_beside_a_sweep_at_two_batch_sizes(tmp_path, capsys):
    from atspeed_ray.cli import main
    from tests.helpers import prepared_random_pair

    data, target, draft = prepared_random_pair(tmp_path, users=40, items=60, seed=5)
    out = tmp_path / "bench.json"
    assert main(["bench", "--data", str(data), "--target", str(target), "--draft", str(draft),
                 "--k", "3", "--draft-beams", "1k,auto", "--batch-size", "1,2", "--num-prompts", "4",
                 "--calibration-prompts", "2", "--repeat", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["batch_size"], r["draft_beams_spec"]) for r in rows] == [
        (1, "1k"), (1, "auto"), (2, "1k"), (2, "auto")]
    assert all(r["identical_rate"] == 1.0 for r in rows)  # strict: exact whatever N
    for r in rows[1::2]:
        choice = r["width_choice"]
        assert choice["batch_size"] == r["batch_size"] and choice["prompts"] >= r["batch_size"]
        cands = choice["candidates"]
        assert [c["n"] for c in cands] == candidate_widths(3)
        best = min(cands, key=lambda c: c["expected_ms"])
        assert r["draft_beams"] == choice["chosen_n"] == best["n"]
        assert all(1.0 <= c["rounds"] <= 4.0 and c["pass_ms"] > 0 and c["draft_ms"] > 0 for c in cands)
    printed = capsys.readouterr().out
    assert printed.count("auto width K=3") == 2 and "(auto)" in printed


def test_evaluate_auto_records_the_choice_per_timing_batch(tmp_path):
    from atspeed_ray.cli import main
    from tests.helpers import prepared_random_pair

    data, target, draft = prepared_random_pair(tmp_path, users=40, items=60, seed=4)
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(data), "--target", str(target), "--draft", str(draft),
                 "--k", "2", "--num-prompts", "4", "--timing-prompts", "2", "--timing-batch", "1,2",
                 "--draft-beams", "auto", "--calibration-prompts", "2", "--references", "",
                 "--out", str(out)]) == 0
    speed = json.loads((out / "speed.json").read_text())
    assert {(r["batch_size"], r["mode"]) for r in speed} == {
        (b, m) for b in (1, 2) for m in ("strict", "relaxed")}
    for r in speed:
        assert r["draft_beams"] == r["width_choice"]["chosen_n"]
        assert r["width_choice"]["batch_size"] == r["batch_size"]
    assert all(r["identical_rate"] == 1.0 for r in speed if r["mode"] == "strict")
    assert "batch_size" in (out / "speed.md").read_text()


def test_serving_auto_measures_a_width_table_when_the_app_is_built(tmp_path):
    from atspeed_ray.serving.app import with_measured_widths
    from atspeed_ray.serving.config import AppArgs
    from tests.helpers import prepared_random_pair

    data, target, draft = prepared_random_pair(tmp_path, users=40, items=60, seed=6)
    args = AppArgs(target=str(target), draft=str(draft), data=str(data), device="cpu",
                   draft_beams_factor="auto", max_k=5)
    assert args.draft_width(5) == 5  # nothing measured yet: N = k
    measured = with_measured_widths(args)
    assert sorted(measured.draft_widths) == [1, 5]  # AUTO_WIDTH_KS up to max_k
    assert all(candidate_widths(k)[0] <= n <= candidate_widths(k)[-1]
               for k, n in measured.draft_widths.items())
    assert with_measured_widths(measured) is measured  # given widths are kept
    fixed = AppArgs(target="t", draft="d", draft_widths={1: 2, 10: 20})
    assert (fixed.draft_width(1), fixed.draft_width(3), fixed.draft_width(8), fixed.draft_width(20)) == (2, 6, 16, 40)
    broken = AppArgs(target=str(tmp_path), draft=str(draft), draft_beams_factor="auto")
    assert with_measured_widths(broken).draft_widths == {}  # the replicas report the cause
    with pytest.raises(ValueError):
        AppArgs(target="t", draft="d", draft_beams_factor="wide")
