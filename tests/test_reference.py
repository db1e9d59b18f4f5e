"""Reference recommenders: hand-computed transition scores, SASRec on a learnable pattern, the
skip-history rule, and the canonical item ids both rank over."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.metrics import recall_at_k
from atspeed_ray.reference.config import SASRecConfig
from atspeed_ray.reference.data import allowed_items, canonical_lists
from atspeed_ray.reference.sasrec import rank_sasrec, train_sasrec, training_windows
from atspeed_ray.reference.transition import fit_transitions, rank_transitions, transition_scores

# W[1] = {2: 1, 3: 1/2 + 1, 4: 1/3}, W[2] = {3: 1 + 1, 4: 1/2, 5: 1/2}, W[3] = {4: 1, 5: 1}
# popularity: 0: 0, 1: 2, 2: 2, 3: 3, 4: 1, 5: 1 -> back-off order 3, 1, 2, 4, 5, 0
SEQS = [[1, 2, 3, 4], [2, 3, 5], [1, 3]]
ALL6 = np.ones(6, dtype=bool)


def test_transition_scores_by_hand():
    model = fit_transitions(SEQS, ALL6)
    assert model.popularity.tolist() == [0, 2, 2, 3, 1, 1]
    # history [1, 2]: item 2 votes with weight 1, item 1 with 0.6
    # 2: 0.6 * 1; 3: 2 + 0.6 * 1.5; 4: 0.5 + 0.6 / 3; 5: 0.5
    np.testing.assert_allclose(transition_scores(model, [1, 2]), [0, 0, 0.6, 2.9, 0.7, 0.5])
    # skipping the history: 3, 4, 5 by score, then the back-off fills with the only item left
    assert rank_transitions(model, [[1, 2]], 5) == [[3, 4, 5, 0]]
    # keeping it: history item 2 is ranked by its score, 1 comes from the back-off
    assert rank_transitions(model, [[1, 2]], 5, skip_history=False) == [[3, 4, 2, 5, 1]]
    # equal scores (4 and 5 after 3) and equal popularity: smaller id first
    assert rank_transitions(model, [[3]], 2) == [[4, 5]]


def test_transition_votes_come_from_the_last_five_items_only():
    model = fit_transitions(SEQS, ALL6)
    history = [1, 0, 0, 0, 0, 0]  # item 1 is the 6th most recent; item 0 has no followers
    assert not transition_scores(model, history).any()
    assert rank_transitions(model, [history], 4) == [[3, 2, 4, 5]]  # popularity, minus {0, 1}
    assert rank_transitions(model, [history], 3, skip_history=False) == [[3, 1, 2]]


def test_transitions_never_return_items_that_may_not_be_recommended():
    allowed = ALL6.copy()
    allowed[[0, 4]] = False
    model = fit_transitions(SEQS, allowed)
    assert rank_transitions(model, [[1, 2]], 6) == [[3, 5]]


def _successor_sequences(n_users: int, n_items: int, length: int, seed: int) -> list[list[int]]:
    """Item i is always followed by i + 1 (mod n_items); starts are random, so popularity is flat."""
    g = np.random.default_rng(seed)
    return [[(int(s) + t) % n_items for t in range(length)] for s in g.integers(n_items, size=n_users)]


TINY = SASRecConfig(dim=32, blocks=1, heads=2, dropout=0.0, max_len=8, epochs=10, batch_size=32,
                    lr=1e-2, val_rows=0, negatives=16)


def test_sasrec_learns_the_successor_pattern_far_above_popularity():
    n = 40
    train = _successor_sequences(200, n, 8, seed=0)
    test = _successor_sequences(100, n, 6, seed=1)
    histories, targets = [s[:-1] for s in test], [[s[-1]] for s in test]
    allowed = torch.ones(n, dtype=torch.bool)
    model, log = train_sasrec(train, allowed, TINY)
    ranked = rank_sasrec(model, histories, 1, allowed)
    pop = fit_transitions(train, allowed.numpy()).popularity
    popular = [[int(np.argmax(pop))]] * len(targets)
    assert recall_at_k(popular, targets, 1) < 0.1
    assert recall_at_k(ranked, targets, 1) > 0.8, log["epochs"][-1]
    assert log["epochs"][-1]["loss"] < log["epochs"][0]["loss"]


def test_sasrec_is_seeded():
    train = _successor_sequences(40, 12, 5, seed=2)
    allowed = torch.ones(12, dtype=torch.bool)
    cfg = TINY.model_copy(update={"epochs": 2, "dropout": 0.2})
    a, _ = train_sasrec(train, allowed, cfg)
    b, _ = train_sasrec(train, allowed, cfg)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_sasrec_windows_tile_each_sequence_from_its_end():
    x, y = training_windows([[5, 6, 7, 8, 9]], 3)
    # labels 7, 8, 9 after inputs 5 6 7 8 (as item + 1), then label 6 after input 5
    assert x.tolist() == [[7, 8, 9], [0, 0, 6]] and y.tolist() == [[7, 8, 9], [-1, -1, 6]]


@pytest.mark.parametrize("method", ["transition", "sasrec"])
def test_both_references_apply_the_skip_history_rule(method):
    """On a period-3 cycle the true next item is always in the history: with the rule the
    references never return it; without it they do (as the generative target may)."""
    n = 9
    train = [[(s + t) % 3 + 3 * (s // 3) for t in range(9)] for s in range(n)]  # cycles 012, 345, 678
    histories = [[0, 1, 2, 0, 1], [3, 4, 5, 3, 4], [6, 7, 8, 6, 7]]
    allowed = torch.ones(n, dtype=torch.bool)
    if method == "transition":
        model = fit_transitions(train, allowed.numpy())
        rank = lambda skip: rank_transitions(model, histories, 3, skip)  # noqa: E731
    else:
        model, _ = train_sasrec(train, allowed, TINY.model_copy(update={"epochs": 60}))
        rank = lambda skip: rank_sasrec(model, histories, 3, allowed, skip)  # noqa: E731
    for hist, ranked in zip(histories, rank(True)):
        assert len(ranked) == 3 and not set(ranked) & set(hist)
    assert [r[0] for r in rank(False)] == [2, 5, 8]


def test_references_rank_canonical_items_only():
    index = ItemIndex.from_codes({0: [5, 9], 1: [5, 9], 2: [6, 9], 3: [6, 10]})  # 0 and 1 collide
    assert allowed_items(index).tolist() == [True, False, True, True]
    assert canonical_lists(index, [[1, 2], [], [3, 1]]) == [[0, 2], [], [3, 0]]


def test_reference_command_writes_rows_in_the_accuracy_format(tmp_path):
    import json

    from atspeed_ray.data.prepare import prepare
    from atspeed_ray.data.synthetic import SyntheticConfig
    from atspeed_ray.reference.__main__ import main

    data = tmp_path / "data"
    prepare("synthetic", data, synthetic=SyntheticConfig(num_users=60, num_items=80))
    out = tmp_path / "ref"
    assert main(["--data", str(data), "--out", str(out), "--k", "1,5", "--num-prompts", "10",
                 "--sasrec-epochs", "1"]) == 0
    rows = json.loads((out / "accuracy.json").read_text())
    assert [(r["method"], r["mode"], r["k"]) for r in rows] == [
        (m, "-", k) for m in ("popularity", "transition", "sasrec") for k in (1, 5)]
    assert all(0.0 <= r["recall"] <= 1.0 and 0.0 <= r["ndcg"] <= 1.0 for r in rows)
    assert (out / "accuracy.md").read_text().startswith("| method | mode | k | recall | ndcg |")
