"""Feature drafts through ``bench`` and ``evaluate`` (loaded by kind, ``drafts.load_drafter``):
every speed column a causal-LM draft gets (WS with its spread, identical top-K, target calls,
the phase breakdown, the bounds, the width each code position needs), and a feature draft
beside an LM draft on the same prompts in one ``evaluate`` run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atspeed_ray.benchmarking import BREAKDOWN_COLUMNS, draft_cover, draft_round, first_proposal
from atspeed_ray.cli import main
from atspeed_ray.data.errors import DataError
from atspeed_ray.data.prepare import load_prepared
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.drafts import check_draft, load_drafter
from atspeed_ray.drafts.feature import FeatureConfig, FeatureDraft, FeatureDrafter
from atspeed_ray.models import DeviceConfig, load_decoder
from tests.helpers import prepared_random_pair

CPU = DeviceConfig(device="cpu", dtype="float32")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def feature_draft(target: torch.nn.Module, index, out: Path, noise: float = 0.05) -> Path:
    """A feature draft over ``target`` with its blocks slightly perturbed (not the identity:
    it disagrees with the target now and then), saved to ``out``."""
    draft = FeatureDraft.from_target(target, index, FeatureConfig(
        hidden=target.config.hidden_size, heads=target.config.num_attention_heads))
    torch.manual_seed(7)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * torch.randn_like(p))
    return draft.eval().save(out)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, one_torch_thread):
    """A prepared synthetic folder, its random tiny target and LM draft, and a feature draft."""
    tmp = tmp_path_factory.mktemp("feature-eval")
    data, target, lm = prepared_random_pair(tmp, users=50, items=80, seed=4)
    prepared = load_prepared(data)
    feature = feature_draft(load_decoder(target, CPU), prepared.index, tmp / "feature")
    return data, target, lm, feature


def speed_columns_hold(row: dict, L: int) -> None:
    """The columns ``bench`` and ``evaluate`` report for every draft, filled for a strict row."""
    assert row["identical_rate"] == 1.0
    assert row["ws"] > 0 and row["ws_q1"] <= row["ws"] <= row["ws_q3"]
    assert isinstance(row["unstable"], bool)
    assert row["oracle_speedup"] > 0 and row["tree_bound_speedup"] > 0
    assert row["one_round_bound_speedup"] > 0
    assert row["fraction_of_oracle"] == pytest.approx(row["ws"] / row["oracle_speedup"])
    # the first round is the target's prefill (no draft), at least one more drafts the rest
    assert 2.0 <= row["target_calls_per_request"] <= L
    for col in BREAKDOWN_COLUMNS:
        assert row[col] >= 0, col
    assert row["draft_ms"] > 0 and row["verify_ms"] > 0 and row["draft_round_ms"] > 0
    parts = row["code_width_by_position"].split(", ")
    assert len(parts) == L and parts[0] == "-"  # the first code is never drafted
    assert row["code1_width_median"] is None
    for d in range(2, L + 1):
        assert row["k"] <= row[f"code{d}_width_median"] <= row[f"code{d}_width_max"]


def test_bench_loads_a_feature_draft_by_its_kind(pair, tmp_path, capsys):
    data, target, _, feature = pair
    out = tmp_path / "bench.json"
    assert main(["bench", "--data", str(data), "--target", str(target), "--draft", str(feature),
                 "--k", "3", "--draft-beams", "2k", "--num-prompts", "3", "--repeat", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["draft_kind"] == "feature" and [r["k"] for r in result["rows"]] == [3]
    L = load_prepared(data).index.L
    for row in result["rows"]:
        speed_columns_hold(row, L)
    printed = capsys.readouterr().out
    assert "(feature)" in printed and "ms/request: draft" in printed


def test_evaluate_compares_a_feature_and_an_lm_draft_in_one_run(pair, tmp_path):
    data, target, lm, feature = pair
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(data), "--target", str(target), "--draft", str(lm),
                 "--draft", str(feature), "--k", "3", "--num-prompts", "4",
                 "--timing-prompts", "2", "--repeat", "1", "--draft-beams", "2k",
                 "--references", "none",
                 "--out", str(out)]) == 0
    speed = json.loads((out / "speed.json").read_text())
    assert {(r["method"], r["mode"], r["k"]) for r in speed} == {
        (m, mode, 3) for m in ("draft", "feature") for mode in ("strict", "relaxed")}
    L = load_prepared(data).index.L
    for row in speed:
        if row["mode"] == "strict" and row["method"] == "feature":
            speed_columns_hold(row, L)
        elif row["mode"] == "strict":
            assert row["identical_rate"] == 1.0 and row["code1_width_median"] >= row["k"]
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert {("feature", "relaxed"), ("draft", "relaxed")} <= {(r["method"], r["mode"]) for r in accuracy}
    md = (out / "speed.md").read_text()
    assert "None" not in md  # a width never measured reads "-"


def test_a_feature_draft_round_starts_after_the_target_prefill(pair):
    data, target_path, _, feature = pair
    index = load_prepared(data).index
    target = load_decoder(target_path, CPU)
    drafter = load_drafter(feature, CPU)
    assert isinstance(drafter, FeatureDrafter)
    prompts = load_prepared(data).prompts("test", limit=3)
    params = SearchParams(3, 6, 3)
    call = first_proposal(target, drafter, index, params, prompts)
    assert call is not None and call.beams.features is not None and call.context is not None
    assert call.t.tolist() == [1] * 3 and call.g.tolist() == [min(3, index.L - 2)] * 3
    draft_round(target, drafter, index, params, [prompts])(prompts)  # drafts, untimed prefill
    with pytest.raises(ValueError, match="give a target"):
        first_proposal(None, drafter, index, params, prompts)
    # the widths: None at the first code; the target's own top-k need k at least
    cover = draft_cover(target, drafter, index, [prompts[:2], prompts[2:]], 3)
    assert len(cover) == 3 and all(row[0] is None and len(row) == index.L for row in cover)
    assert all(3 <= w for row in cover for w in row[1:])


def test_a_feature_draft_of_other_data_is_refused(pair, tmp_path):
    data, target, _, _ = pair
    other, other_target, _ = prepared_random_pair(tmp_path, users=30, items=40, seed=9)
    wrong = feature_draft(load_decoder(other_target, CPU), load_prepared(other).index,
                          tmp_path / "wrong")
    check_draft(load_prepared(other), wrong)  # fits its own data
    with pytest.raises(DataError, match="code tokens are not"):
        check_draft(load_prepared(data), wrong)


def test_serving_auto_measures_widths_for_a_feature_draft(pair):
    """``draft_beams_factor: auto`` loads the draft by its kind, as the replicas do: a feature
    draft gets a measured width table, not the N = k fallback (and, with adaptive routing, the
    calibrated start of each k, ``start_arms``)."""
    from atspeed_ray.serving.app import with_measured_widths
    from atspeed_ray.serving.config import AppArgs
    from atspeed_ray.width_policy import measured_widths_at

    data, target, _, feature = pair
    args = AppArgs(target=str(target), draft=str(feature), data=str(data), device="cpu",
                   draft_beams_factor="auto", max_k=5, routing="adaptive")
    measured = with_measured_widths(args)
    assert sorted(measured.draft_widths) == [1, 5]
    # adaptive routing: the k whose timed calibration had a clear winner start on it
    assert set(measured.route_start) <= {"alone", "batched"}
    assert all(set(ks) <= {1, 5} and set(ks.values()) <= {"speculative", "target_only"}
               for ks in measured.route_start.values())
    assert all(k <= min(w) and max(w) <= 20 * k  # an N, or per drafted level (10/200/20)
               for k, v in measured.draft_widths.items() for w in [measured_widths_at(v, k)])


def test_auto_widths_of_a_feature_draft_start_at_code_2(pair):
    """A feature draft never drafts code 1 (the target's prefill gives it): ``auto``'s
    per-level candidates widen code 2 and later only, each costed for the tree its first round
    drafts (codes 2 to L - 1), and the chosen widths' strict search is the target's beam search."""
    from atspeed_ray.decoding.beam import beam_search
    from atspeed_ray.decoding.speculative import speculative_search
    from atspeed_ray.width import RoundCost, choose_width

    data, target_path, _, feature = pair
    target, drafter = load_decoder(target_path, CPU), load_drafter(feature, CPU)
    prepared = load_prepared(data)
    index, prompts = prepared.index, prepared.prompts("valid", limit=4)
    choice = choose_width(target, drafter, index, prompts, 2, (3,),
                          cost=lambda grid: [RoundCost(10.0, 1.0) for _ in grid])  # flat
    levels = [c for c in choice.candidates if len(c.widths) > 1]
    assert levels and len({c.widths[0] for c in levels}) == 1  # code 1 is never widened
    for c in choice.candidates:  # the first round drafts codes 2 .. L - 1
        assert c.tree_tokens == sum(c.widths[min(d, len(c.widths) - 1)] for d in range(1, index.L - 1))
    params = choice.params(SearchParams(2, 2, 3))
    assert speculative_search(target, drafter, prompts, index, params).items == \
        beam_search(target, prompts, index, 2).items


def test_evaluate_refuses_two_drafts_of_one_name(tmp_path):
    """The tables name each draft by its folder: two folders of one name (``a/draft`` and
    ``b/draft``, as `align --out` makes them) would share a row, one draft silently dropped.
    A symlink keeps its own name."""
    from atspeed_ray.evaluate import draft_names

    for d in ("a/draft", "b/draft", "c"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "named").symlink_to(tmp_path / "a/draft")
    with pytest.raises(SystemExit, match="2 drafts are named 'draft'"):
        draft_names([str(tmp_path / "a/draft"), str(tmp_path / "b/draft/")])
    assert draft_names([str(tmp_path / "named"), str(tmp_path / "b/draft"), str(tmp_path / "c")]) == [
        "named", "draft", "c"]
