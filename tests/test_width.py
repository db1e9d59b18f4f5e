"""``--draft-beams auto``: the draft width chosen per K and batch size by measured cost
(``atspeed_ray.width``), in ``bench`` (beside a sweep, at several batch sizes) and ``evaluate``."""

from __future__ import annotations

import json

import pytest

from atspeed_ray.bench import BenchFlags
from atspeed_ray.width_policy import WidthPolicy
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.settings import AUTO_LEVEL_CANDIDATES
from atspeed_ray.width import (
    RoundCost, WidthCandidate, WidthChoice, better, calibration_batch, candidate_widths,
    level_tries, round_levels,
)
from atspeed_ray.width_policy import measured_widths_at, one_or_levels


def test_candidates_and_the_cheapest_wins():
    assert candidate_widths(1) == [1, 2, 3, 4]
    assert candidate_widths(10) == [10, 15, 20, 30, 40]
    assert candidate_widths(3, (1.0, 1.1)) == [3, 4]
    # N=20 takes fewer rounds but each costs more; expected ms = rounds x (pass + draft)
    n10, n20, n40 = (WidthCandidate((10,), 3, 3.0, 30, 100.0, 10.0),
                     WidthCandidate((20,), 3, 1.5, 60, 120.0, 15.0),
                     WidthCandidate((40,), 3, 1.2, 120, 200.0, 25.0))
    assert better(n10, [n20, n40]) is n20 and n20.expected_ms == pytest.approx(202.5)
    assert better(n20, [n40]) is n20  # fewer rounds, but slower
    noise = WidthCandidate((40,), 3, 1.5, 120, 100.0, 10.0)  # no fewer rounds: its time is noise
    assert better(n20, [noise]) is n20
    assert better(n10, [n20, noise]) is n20  # equal rounds: the smaller tree competes
    choice = WidthChoice(10, 1, 8, [n10, n20, n40], 1)
    assert choice.best is n20
    params = choice.params(SearchParams(10, 10, 3, "strict"))
    assert (params.k, params.N, params.gamma) == (10, 20, 3)
    rec = choice.record()
    assert rec["chosen_n"] == 20 and [c["n"] for c in rec["candidates"]] == [10, 20, 40]
    assert "N=20" in choice.summary()
    # a per-level candidate: code 2 wide, the others narrow
    level = WidthCandidate((10, 200, 20), 3, 1.0, 230, 170.0, 20.0)
    assert better(n20, [level, WidthCandidate((10, 200, 40), 3, 1.0, 250, 175.0, 20.0)]) is level
    choice = WidthChoice(10, 1, 8, [n10, n20, n40, level], 3)
    assert choice.best is level and choice.best.expected_ms == pytest.approx(190.0)
    params = choice.params(SearchParams(10, 10, 3, "strict"))
    assert params.widths == (10, 200, 20) and params.N == 200
    assert choice.params(SearchParams(5, 5, 3, "strict")).widths == (5, 100, 10)  # N_l / k scaled
    rec = choice.record()
    assert (rec["chosen_n"], rec["chosen_widths"], rec["chosen"]) == (200, [10, 200, 20], "10/200/20")
    assert "N=10/200/20 (1k/20k/2k) gamma=3" in choice.summary()


def test_the_first_round_tree_and_the_level_tries():
    """The tree a round from the root carries (sum of its levels' widths: the pass cost is
    measured for it) and the per-level candidates tried from the best width so far."""
    p = SearchParams(2, (2, 8, 4), 3)
    assert round_levels(p, 4, 0) == (2, 8, 4)  # a token draft drafts codes 1-3 of L = 4
    assert round_levels(p, 4, 1) == (8, 4)  # a feature draft: code 1 from the target's prefill
    assert round_levels(SearchParams(2, (2, 8), 1), 4, 0) == (2,)
    assert round_levels(SearchParams(2, 4, 5), 4, 0) == (4, 4, 4)  # at most L - 1 levels
    assert level_tries((4,), 1, 2, 4, (2.0, 4.0, 8.0)) == [(4, 8, 4), (4, 16, 4)]  # 2k = 4 is not wider
    assert level_tries((4, 16), 0, 2, 4, (4.0, 8.0)) == [(8, 16, 16), (16, 16, 16)]
    assert level_tries((40,), 2, 2, 4, (2.0, 20.0)) == []
    # narrower: widest first, never below K
    assert level_tries((8,), 1, 2, 4, (1.0, 2.0, 4.0), narrower=True) == [(8, 4, 8), (8, 2, 8)]
    assert level_tries((8, 8, 4), 2, 2, 4, (1.0, 2.0, 4.0), narrower=True) == [(8, 8, 2)]
    assert level_tries((2,), 1, 2, 4, (1.0, 2.0), narrower=True) == []


def test_tree_pass_carries_the_per_level_tree(monkeypatch):
    """``tree_pass`` feeds sum(levels) tree tokens, each below a node of the level above; a
    uniform tree is the oracle pass's."""
    import torch

    from atspeed_ray import benchmarking
    from atspeed_ray.decoding import beam

    seen = []
    monkeypatch.setattr(beam, "prefill", lambda target, batch, nodes: seen.append(nodes))
    model = torch.nn.Linear(1, 1)
    benchmarking.tree_pass(model, (2, 3, 1))([[1], [2]])
    benchmarking.oracle_pass(model, 2, 2)([[1]])
    tree, uniform = seen
    assert tree.tokens.shape == (2, 6)
    assert tree.depth[0].tolist() == [0, 0, 1, 1, 1, 2]
    assert tree.parent[0].tolist() == [-1, -1, 0, 1, 0, 2]
    assert uniform.depth[0].tolist() == [0, 0, 1, 1] and uniform.parent[0].tolist() == [-1, -1, 0, 1]


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
    per_level = WidthPolicy().with_measured({1: 2, 10: (10, 200, 20)})  # each level's N/k
    assert per_level.resolve(10) == (10, 200, 20) and per_level.resolve(8) == (8, 160, 16)
    assert per_level.resolve(2) == 4 and str(per_level) == "auto"
    assert measured_widths_at("10/200/20", 10) == measured_widths_at("1k/20k/2k", 10) == (10, 200, 20)
    assert measured_widths_at(20, 10) == (20,)
    with pytest.raises(ValueError, match="draft_widths"):
        measured_widths_at("auto", 10)
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
        singles = len(candidate_widths(3))  # one width for every level, then per level
        assert [c["widths"] for c in cands[:singles]] == [[n] for n in candidate_widths(3)]
        assert all(len(c["widths"]) > 1 for c in cands[singles:])
        assert len(cands) - singles <= AUTO_LEVEL_CANDIDATES
        best = next(c for c in cands if c["widths"] == choice["chosen_widths"])
        assert best["rounds"] <= cands[0]["rounds"]  # wider only where it saves rounds
        assert r["draft_beams"] == choice["chosen_n"] == best["n"]
        assert r["level_widths"] == choice["chosen_widths"]
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
    assert all(k <= min(w) and max(w) <= 20 * k  # an N, or per level as text (10/200/20)
               for k, v in measured.draft_widths.items() for w in [measured_widths_at(v, k)])
    assert measured.draft_width(5) == one_or_levels(measured_widths_at(measured.draft_widths[5], 5))
    assert with_measured_widths(measured) is measured  # given widths are kept
    fixed = AppArgs(target="t", draft="d", draft_widths={1: 2, 10: 20})
    assert (fixed.draft_width(1), fixed.draft_width(3), fixed.draft_width(8), fixed.draft_width(20)) == (2, 6, 16, 40)
    levels = AppArgs.model_validate({"target": "t", "draft": "d",
                                     "draft_widths": {"1": 2, "10": "10/200/20"}})
    assert levels.draft_width(10) == (10, 200, 20) and levels.draft_width(8) == (8, 160, 16)
    assert levels.draft_width(1) == 2 and levels.draft_width(5) == 10  # nearer k=1: N = 2k
    with pytest.raises(ValueError, match="draft_widths"):
        AppArgs(target="t", draft="d", draft_widths={10: "10/x"})
    broken = AppArgs(target=str(tmp_path), draft=str(draft), draft_beams_factor="auto")
    assert with_measured_widths(broken).draft_widths == {}  # the replicas report the cause
    with pytest.raises(ValueError):
        AppArgs(target="t", draft="d", draft_beams_factor="wide")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """A random tiny pair (fp64) on synthetic data with 4 first codes of 16 second codes each, its
    index and 8 validation prompts: at K=1 the draft holds the target's top item at code 2 in
    every first round only with 4 beams there (its best single width, 2, takes 2 rounds)."""
    from atspeed_ray.data.prepare import load_prepared, prepare
    from atspeed_ray.data.synthetic import SyntheticConfig
    from atspeed_ray.models import DeviceConfig, load_model
    from atspeed_ray.serving.testing import build_random_pair

    tmp = tmp_path_factory.mktemp("auto")
    prepare("synthetic", tmp / "data", synthetic=SyntheticConfig(
        num_users=40, num_items=60, codebook_sizes=[4, 16, 16, 16], items_per_cluster=2.0))
    tpath, dpath = build_random_pair(tmp / "data", tmp / "models", "tiny", seed=2)
    f64 = DeviceConfig(device="cpu", dtype="float64")
    prepared = load_prepared(tmp / "data")
    return (load_model(tpath, f64)[0], load_model(dpath, f64)[0], prepared.index,
            prepared.prompts("valid", limit=8))


def model_cost(index, per_token_ms, power: float = 1.0):
    """A machine's cost model: the pass costs 10 ms + per_token_ms x (tree tokens)^power, the
    draft round 1 ms, whatever the widths (no GPU or timing needed)."""

    def cost(grid):
        return [RoundCost(10.0 + per_token_ms * sum(round_levels(p, index.L, 0)) ** power, 1.0)
                for p in grid]

    return cost


def chosen_exactly(calibration, choice, k):
    """The chosen widths' strict search equals the target's beam search (every children cap)."""
    from atspeed_ray.decoding.beam import beam_search
    from tests.helpers import assert_same_as_beam_search, strict_runs

    target, draft, index, prompts = calibration
    params = choice.params(SearchParams(k, k, 3, "strict"))
    ref = beam_search(target, prompts, index, k)
    for _, out in strict_runs(target, draft, prompts, index, k, params.draft_beams, params.gamma):
        assert_same_as_beam_search(out, ref)
    return params


def test_auto_widens_code_2_where_a_pass_costs_the_same_for_any_tree(calibration):
    """A GPU-like machine (the pass flat in tree size): the per-level search widens code 2,
    where it cuts rounds, beyond every single width, and keeps code 1 as it was."""
    from atspeed_ray.width import choose_width

    target, draft, index, prompts = calibration
    choice = choose_width(target, draft, index, prompts, 1, (3,), cost=model_cost(index, 0.0))
    singles = choice.candidates[:len(candidate_widths(1))]
    assert [c.widths for c in singles] == [(n,) for n in candidate_widths(1)]
    single = min(singles, key=lambda c: (c.expected_ms, c.tree_tokens))
    best = choice.best
    assert best.widths[1] > single.n and best.rounds < single.rounds  # code 2 wider: fewer calls
    assert best.widths[0] == single.n
    assert len(choice.candidates) - len(singles) <= AUTO_LEVEL_CANDIDATES
    assert all(c.expected_ms == pytest.approx(11.0 * c.rounds) for c in choice.candidates)
    params = chosen_exactly(calibration, choice, 1)
    assert params.widths == best.widths and "N=" + best.label(1) in choice.summary()


def test_auto_keeps_narrow_widths_where_the_pass_grows_with_the_tree(calibration):
    """A CPU-like machine (the pass cost growing steeply with the tree): N = K everywhere."""
    from atspeed_ray.width import choose_width

    target, draft, index, prompts = calibration
    choice = choose_width(target, draft, index, prompts, 1, (3,), cost=model_cost(index, 5.0, 2.0))
    assert choice.best.widths == (1,) and choice.record()["chosen"] == 1
    assert any(len(c.widths) > 1 and c.rounds < choice.best.rounds  # fewer calls, but dearer
               for c in choice.candidates)
    assert chosen_exactly(calibration, choice, 1).draft_beams == 1


def test_auto_narrows_the_levels_the_draft_holds_at_k(calibration):
    """A CPU-like machine (the pass grows with the tree): at K = 2 the best single width is N = 4
    (2 rounds where N = 2, 3 take 3), but the draft holds the target's top 2 at the later codes
    with N = 2: the narrowing step keeps code 1 at 4 and narrows the rest, the same rounds for a
    smaller tree. The search before it (widening only) kept N = 4 everywhere."""
    from atspeed_ray.width import choose_width

    target, draft, index, prompts = calibration
    choice = choose_width(target, draft, index, prompts[:4], 2, (3,), level_factors=(),
                          cost=model_cost(index, 0.5))
    singles = choice.candidates[:len(candidate_widths(2))]
    single = min(singles, key=lambda c: (c.expected_ms, c.tree_tokens))
    best = choice.best
    assert single.n == 4 and best.rounds == single.rounds
    assert best.widths[0] == 4 and max(best.widths[1:]) < 4
    assert best.expected_ms < single.expected_ms and best.tree_tokens < single.tree_tokens
    widths = [SearchParams(2, c.widths, 3, "strict").widths for c in choice.candidates]
    assert len(widths) == len(set(widths))  # no candidate measured twice
    chosen_exactly(calibration, choice, 2)


def test_a_width_whose_one_round_costs_more_than_the_best_request_is_never_searched(calibration):
    """Pricing out: each per-level try is priced first; the first one whose single round costs
    more than a whole request of the best so far ends its level without a strict search, so the
    wide trees of a CPU cost one timed pass each at start-up."""
    from atspeed_ray.width import choose_width

    target, draft, index, prompts = calibration
    priced: list[tuple[int, ...]] = []
    steep = model_cost(index, 5.0, 3.0)

    def cost(grid):
        priced.extend(p.widths for p in grid)
        return steep(grid)

    choice = choose_width(target, draft, index, prompts, 1, (3,), cost=cost)
    searched = [c.widths for c in choice.candidates]
    skipped = [w for w in priced if w not in searched]
    assert skipped, "a steep machine prices some wide tree out"
    worst = max(c.expected_ms for c in choice.candidates)
    one_round = [steep([SearchParams(1, w, 3, "strict")])[0] for w in skipped]
    assert all(r.pass_ms + r.draft_ms >= choice.best.expected_ms for r in one_round)
    assert all(c.pass_ms + c.draft_ms < worst for c in choice.candidates if len(c.widths) > 1)
    assert choice.best.widths == (1,)
