import math

import pytest

from atspeed_ray.metrics import evaluate_rankings, ndcg_at_k, recall_at_k


def test_single_target_hit_at_rank_3():
    ranked, targets = [[1, 2, 3, 4, 5]], [[3]]
    assert recall_at_k(ranked, targets, 5) == 1.0
    assert ndcg_at_k(ranked, targets, 5) == pytest.approx(1 / math.log2(4))  # 0.5
    assert recall_at_k(ranked, targets, 2) == 0.0
    assert ndcg_at_k(ranked, targets, 2) == 0.0


def test_target_set_uses_ideal_dcg_with_min_targets_k():
    ranked, targets = [[1, 2, 7]], [[1, 9]]
    assert recall_at_k(ranked, targets, 2) == 0.5
    assert ndcg_at_k(ranked, targets, 2) == pytest.approx(1 / (1 + 1 / math.log2(3)))  # 0.6131
    # k=1: IDCG has only min(2, 1) = 1 term, so a hit at rank 0 is a perfect score
    assert ndcg_at_k(ranked, targets, 1) == pytest.approx(1.0)
    assert recall_at_k(ranked, targets, 1) == 0.5


def test_two_of_three_targets_and_average_over_users():
    ranked = [[5, 1, 6, 2], [9, 8, 7, 6]]
    targets = [[1, 2, 3], [9]]
    # user 0: hits at ranks 1 and 3; user 1: hit at rank 0
    dcg0 = 1 / math.log2(3) + 1 / math.log2(5)
    idcg0 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert recall_at_k(ranked, targets, 4) == pytest.approx((2 / 3 + 1) / 2)
    assert ndcg_at_k(ranked, targets, 4) == pytest.approx((dcg0 / idcg0 + 1.0) / 2)


def test_duplicates_in_ranking_count_once():
    assert recall_at_k([[3, 3, 4]], [[3]], 3) == 1.0
    assert ndcg_at_k([[3, 3, 4]], [[3]], 3) == pytest.approx(1.0)
    assert recall_at_k([[3, 3, 4]], [[3, 4]], 3) == 1.0
    assert ndcg_at_k([[3, 3, 4]], [[3, 4]], 3) == pytest.approx(
        (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    )


def test_evaluate_rankings_keys_and_values():
    out = evaluate_rankings([[1, 2, 3, 4, 5, 6]], [[6]], ks=(5, 10))
    assert set(out) == {"recall@5", "ndcg@5", "recall@10", "ndcg@10"}
    assert out["recall@5"] == 0.0 and out["recall@10"] == 1.0
    assert out["ndcg@10"] == pytest.approx(1 / math.log2(7))


def test_bad_inputs():
    with pytest.raises(ValueError, match="rankings"):
        recall_at_k([[1]], [[1], [2]], 1)
    with pytest.raises(ValueError, match="target"):
        ndcg_at_k([[1]], [[]], 1)
    with pytest.raises(ValueError, match="k must"):
        recall_at_k([[1]], [[1]], 0)


def test_evaluate_command_writes_the_tables_and_plots(tmp_path):
    """`atspeed-ray evaluate` end to end on random tiny models: every table, both plots, and
    strict SD identical to the target's beam search on every timed prompt."""
    import csv
    import json

    from atspeed_ray.cli import main
    from tests.helpers import prepared_random_pair

    data, target, draft = prepared_random_pair(tmp_path, users=60, items=80, seed=3)
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(data), "--target", str(target), "--draft", str(draft),
                 "--k", "1,3", "--num-prompts", "12", "--timing-prompts", "3", "--draft-beams", "6",
                 "--sasrec-epochs", "2", "--out", str(out)]) == 0
    for name in ("accuracy", "speed"):
        assert {p.name for p in out.glob(f"{name}.*")} == {f"{name}.json", f"{name}.csv", f"{name}.md"}
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert {(r["method"], r["mode"]) for r in accuracy} == {
        ("popularity", "-"), ("transition", "-"), ("sasrec", "-"), ("target", "beam"), ("draft", "relaxed")}
    assert [r["k"] for r in accuracy if r["method"] in ("transition", "sasrec")] == [1, 3, 1, 3]
    assert all(0.0 <= r["recall"] <= 1.0 and 0.0 <= r["ndcg"] <= 1.0 for r in accuracy)
    with open(out / "speed.csv") as f:
        speed = list(csv.DictReader(f))
    assert {(r["mode"], r["k"]) for r in speed} == {(m, k) for m in ("strict", "relaxed") for k in ("1", "3")}
    assert all(float(r["identical_rate"]) == 1.0 for r in speed if r["mode"] == "strict")
    assert all(float(r["walltime_speedup"]) > 0 for r in speed)
    for png in ("ws_vs_k.png", "accepted_steps_hist.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("forward", ["fast", "hf"])
def test_bench_commands_on_either_forward(tmp_path, forward, capsys):
    """`atspeed-ray bench` and `bench-beam` on random tiny models: strict SD identical to beam
    search, our beam search identical to HF generate, on the FastLlama and on the HF forward."""
    import json

    from atspeed_ray.cli import main
    from tests.helpers import prepared_random_pair

    data, target, draft = prepared_random_pair(tmp_path, users=40, items=60, seed=5)
    out = tmp_path / "bench.json"
    assert main(["bench", "--data", str(data), "--target", str(target), "--draft", str(draft),
                 "--k", "1,5", "--draft-beams", "2k", "--num-prompts", "4", "--forward", forward,
                 "--repeat", "2",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["forward"] == forward and [r["k"] for r in result["rows"]] == [1, 5]
    assert result["repeat"] == 2
    assert [r["draft_beams"] for r in result["rows"]] == [2, 10]  # --draft-beams 2k
    for row in result["rows"]:
        assert row["identical_rate"] == 1.0
        assert 1.0 <= row["target_calls_per_request"] <= 4.0
        assert row["walltime_speedup"] > 0 and row["oracle_speedup"] > 0
        assert row["tree_bound_speedup"] > 0 and row["one_round_bound_speedup"] > 0
    assert f"{forward} forward" in capsys.readouterr().out
    out = tmp_path / "beam.json"
    assert main(["bench-beam", "--data", str(data), "--model", str(target), "--k", "3",
                 "--num-prompts", "3", "--forward", forward, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["identical"] == r["prompts"] for r in rows)
