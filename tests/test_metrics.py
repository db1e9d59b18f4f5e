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
