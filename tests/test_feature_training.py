"""Training a feature draft: the teacher is the target's own beam search (with its hidden
states), the losses are pure functions, training lowers them, and ``align --draft-kind feature``
writes a draft that ``load_drafter`` serves exactly."""

from __future__ import annotations

import json

import pytest
import torch

from atspeed_ray.decoding import beam_search
from atspeed_ray.decoding.beam import beam_step, expand_columns
from atspeed_ray.drafts import load_drafter
from atspeed_ray.drafts.feature import FeatureConfig, FeatureDraft, FeatureDrafter
from atspeed_ray.models import DeviceConfig
from atspeed_ray.training.feature import target_tree, tree_loss, width_needed
from atspeed_ray.training.losses import beam_tvd, candidate_kl, feature_regression, tvd
from tests.helpers import (
    assert_same_as_beam_search, prepared_random_pair, random_catalog, random_model,
    random_prompts, strict_runs, vocab_size,
)


@pytest.fixture(scope="module")
def setup():
    codebook = [8, 8, 8, 8]
    index = random_catalog(1500, codebook, seed=0)
    V = vocab_size(codebook)
    return index, random_model(V, seed=1), random_prompts(6, V, seed=2)


def test_the_teacher_tree_is_the_targets_beam_search_with_its_hidden_states(setup):
    index, target, prompts = setup
    k = 5
    tree = target_tree(target, prompts, index, k)
    levels = tree.levels
    assert len(levels) == index.L
    last = levels[-1]
    depth = torch.full((len(prompts),), index.L - 1)
    step = beam_step(expand_columns(last.col_logp, last.scores, last.node, depth, index), k)
    ref = beam_search(target, prompts, index, k)
    assert torch.equal(last.tokens.take_along_dim(step.parent[..., None], 1)[..., :-1],
                       ref.sequences[..., :-1])
    torch.testing.assert_close(step.score, ref.scores, rtol=0, atol=1e-9)
    for d, lv in enumerate(levels):  # the feature after each beam = a plain forward's
        for b, prompt in enumerate(prompts[:2]):
            for m in range(lv.tokens.shape[1]):
                if torch.isfinite(lv.scores[b, m]):
                    ids = torch.tensor([prompt + lv.tokens[b, m, :d].tolist()])
                    want = target.base_model(input_ids=ids).last_hidden_state[0, -1]
                    torch.testing.assert_close(lv.feature[b, m].double(), want.double(),
                                               rtol=1e-5, atol=1e-5)
    for b, prompt in enumerate(prompts):  # the prompts' hidden states, left-padded
        want = target.base_model(input_ids=torch.tensor([prompt])).last_hidden_state[0]
        n = len(prompt)
        assert tree.context.valid[b].tolist() == [False] * (tree.context.valid.shape[1] - n) + [True] * n
        torch.testing.assert_close(tree.context.features[b, -n:].double(), want.double(),
                                   rtol=1e-5, atol=1e-5)


def three_beams() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Beam scores [1, 3] (the third beam dead), the target's log-probs over 4 codes per beam
    [1, 3, 4], and which codes are trie children [1, 3, 4] (code 3 of beam 0 is not)."""
    scores = torch.tensor([[0.0, -1.0, float("-inf")]])
    p = torch.log_softmax(torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0)), -1)
    valid = torch.ones(1, 3, 4, dtype=torch.bool)
    valid[0, 0, 3] = False
    return scores, p, valid


def test_candidate_kl_and_feature_regression():
    scores, p, valid = three_beams()
    assert float(candidate_kl(scores, p, p, valid)) == pytest.approx(0.0, abs=1e-6)
    q = p.clone()
    q[0, 0, 3] += 5.0  # an invalid candidate: ignored
    q[0, 2] += 3.0  # a dead beam: ignored
    assert float(candidate_kl(scores, p, q, valid)) == pytest.approx(0.0, abs=1e-6)
    q[0, 1, 0] += 2.0
    assert float(candidate_kl(scores, p, q, valid)) > 0.01
    h = torch.randn(1, 3, 8)
    live = torch.isfinite(scores)
    assert float(feature_regression(h, h, live)) == 0.0
    assert float(feature_regression(h + 1.0, h, live)) == pytest.approx(0.5)
    bad = h.clone()
    bad[0, 2] += 9.0  # the dead beam's feature does not count
    assert float(feature_regression(bad, h, live)) == 0.0


def test_beam_tvd_is_atspeed_r_on_the_targets_beams():
    scores, p, valid = three_beams()
    assert float(beam_tvd(scores, p, p, valid)) == pytest.approx(0.0, abs=1e-7)
    q = p.clone()
    q[0, 0, 3] += 5.0  # an invalid code: ignored
    q[0, 2] += torch.tensor([3.0, 0.0, 0.0, 0.0])  # a dead beam: ignored
    assert float(beam_tvd(scores, p, q, valid)) == pytest.approx(0.0, abs=1e-6)
    q[0, 1, 0] += 2.0
    want = 0.5 * float(tvd(q[0, 1], p[0, 1], valid[0, 1]))  # one of the two live beams
    assert float(beam_tvd(scores, p, q, valid)) == pytest.approx(want, rel=1e-6)
    # per-beam TVD is not the sequence-level KL of atspeed-s: the beams' scores do not enter it
    assert float(beam_tvd(scores - 3.0, p, q, valid)) == pytest.approx(want, rel=1e-6)
    assert float(candidate_kl(scores, p, q, valid)) != pytest.approx(want, rel=1e-3)


def test_relaxed_objective_differs_from_strict_and_training_lowers_it(setup, one_torch_thread):
    index, target, _ = setup
    torch.manual_seed(0)
    draft = FeatureDraft.from_target(target, index, FeatureConfig(hidden=32, layers=1, heads=4)).double()
    trees = [target_tree(target, random_prompts(8, vocab_size([8] * 4), seed=s), index, 5)
             for s in range(2)]
    with torch.no_grad():
        strict, strict_parts = tree_loss(draft, trees[0], index, 0.0, "atspeed-s")
        relaxed, relaxed_parts = tree_loss(draft, trees[0], index, 0.0, "atspeed-r")
    assert float(relaxed) != pytest.approx(float(strict), rel=1e-2)
    assert relaxed_parts["feature"] == pytest.approx(strict_parts["feature"])
    assert 0.0 < float(relaxed) < 1.0  # a total variation
    opt = torch.optim.AdamW(draft.parameters(), lr=3e-3)
    for _ in range(8):
        for tree in trees:
            loss, _ = tree_loss(draft, tree, index, 0.1, "atspeed-r")
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        after, _ = tree_loss(draft, trees[0], index, 0.0, "atspeed-r")
    assert float(after) < 0.8 * float(relaxed)
    with pytest.raises(ValueError, match="atspeed-s or atspeed-r"):
        tree_loss(draft, trees[0], index, 0.1, "wordkd")


def test_training_lowers_the_loss_and_the_width_the_codes_need(setup, one_torch_thread):
    index, target, prompts = setup
    torch.manual_seed(0)
    draft = FeatureDraft.from_target(target, index, FeatureConfig(hidden=32, layers=1, heads=4)).double()
    trees = [target_tree(target, random_prompts(16, vocab_size([8] * 4), seed=s), index, 5)
             for s in range(4)]
    before = float(tree_loss(draft, trees[0], index, 0.1)[0].detach())
    widths_before = width_needed(draft, trees[0], index, 5)
    opt = torch.optim.AdamW(draft.parameters(), lr=3e-3)
    for _ in range(15):
        for tree in trees:
            loss, _ = tree_loss(draft, tree, index, 0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = float(tree_loss(draft, trees[0], index, 0.1)[0].detach())
    widths_after = width_needed(draft, trees[0], index, 5)
    assert after < 0.7 * before
    assert set(widths_after) == {"code2_first", "code3_first", "code3_unrolled", "code4_first",
                                 "code4_unrolled"}
    assert sum(map(sum, widths_after.values())) < sum(map(sum, widths_before.values()))
    ref = beam_search(target, prompts, index, 5)  # trained or not, strict stays exact
    for _, out in strict_runs(target, FeatureDrafter(draft.eval()), prompts, index, 5, 10, 3):
        assert_same_as_beam_search(out, ref)


def test_align_draft_kind_feature_writes_a_loadable_draft(tmp_path, capsys):
    from atspeed_ray.cli import main
    from atspeed_ray.data.prepare import load_prepared

    data, target_dir, _ = prepared_random_pair(tmp_path, 60, 120, seed=3)
    out = tmp_path / "feature"
    assert main(["align", "--data", str(data), "--target", str(target_dir), "--out", str(out),
                 "--draft-kind", "feature", "--workers", "0", "--epochs", "2", "--max-samples", "64",
                 "--val-samples", "16", "--teacher-k", "5", "--micro-batch", "16"]) == 0
    printed = capsys.readouterr().out
    assert "[align feature atspeed-s] epoch 2/2 done" in printed
    history = json.loads((out / "training.json").read_text())
    assert len(history["epochs"]) == 2 and history["step"] == 2 * (64 // 16)
    assert {"val_accept", "val_code2_first_width_median", "align", "feature"} <= set(history["epochs"][-1])
    drafter = load_drafter(out, DeviceConfig(device="cpu"))
    assert isinstance(drafter, FeatureDrafter)
    from atspeed_ray.models import load_decoder

    prepared = load_prepared(data)
    target = load_decoder(target_dir, DeviceConfig(device="cpu"))
    prompts = prepared.prompts("test", limit=4)
    ref = beam_search(target, prompts, prepared.index, 5)
    for _, res in strict_runs(target, drafter, prompts, prepared.index, 5, 10, 3):
        assert_same_as_beam_search(res, ref)
    assert main(["align", "--data", str(data), "--target", str(target_dir), "--out", str(out),
                 "--draft-kind", "feature", "--workers", "2", "--zero-stage", "3"]) == 2
    assert "--zero-stage 2" in capsys.readouterr().err
    assert main(["align", "--data", str(data), "--target", str(target_dir), "--out", str(out),
                 "--draft-kind", "feature", "--workers", "0", "--loss", "wordkd"]) == 2
    assert "atspeed-s or atspeed-r" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A prepared synthetic folder and a random tiny target on it."""
    data, target_dir, _ = prepared_random_pair(tmp_path_factory.mktemp("pair"), 60, 120, seed=3)
    return data, target_dir


def test_the_feature_setup_trains_only_the_head_on_a_frozen_target(pair, tmp_path):
    from atspeed_ray.training.config import TrainConfig
    from atspeed_ray.training.feature import FeatureObjective, TargetTree
    from atspeed_ray.training.setup import build_setup, make_optimizer

    data, target_dir = pair
    cfg = TrainConfig(task="align", runner="local", data=str(data), target=str(target_dir),
                      out=str(tmp_path / "d"), draft_kind="feature", teacher_k=3, max_samples=32,
                      val_samples=4)
    s = build_setup(cfg, torch.device("cpu"))
    assert isinstance(s.model, FeatureDraft) and s.model.training
    assert isinstance(s.objective, FeatureObjective) and s.teacher_k == 3
    assert s.objective.loss == "atspeed-s"  # align's default: strict
    assert not s.target.training and not any(p.requires_grad for p in s.target.parameters())
    trained = {id(p) for g in make_optimizer(s.model, cfg).param_groups for p in g["params"]}
    assert trained == {id(p) for p in s.model.parameters()}
    assert not trained & {id(p) for p in s.target.parameters()}
    # a batch is the target's trees of its prompts, kept per prompt and restacked in any order
    batch = s.batch(s.train, [3, 0, 1])
    assert isinstance(batch, TargetTree) and batch.size == 3
    again = s.batch(s.train, [1, 3])
    ref = target_tree(s.target, [s.train.prompts[i] for i in (1, 3)], s.prepared.index, 3)
    for lv, want in zip(again.levels, ref.levels):
        assert torch.equal(lv.tokens, want.tokens)
        torch.testing.assert_close(lv.feature, want.feature, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again.context.features[again.context.valid],
                               ref.context.features[ref.context.valid], rtol=1e-4, atol=1e-4)
    assert len(s.trees.trees) == 3  # the prompts computed so far, once each


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)  # 41 s on a quiet machine, up to 580 s beside other Ray jobs
def test_ray_zero2_two_workers_train_a_feature_draft(ray_local, pair, tmp_path):
    """``align --draft-kind feature --workers 2`` (ZeRO-2): the shared Ray Train loop trains the
    head on every worker's frozen target; the export loads by its kind and decodes exactly."""
    from atspeed_ray.cli import main
    from atspeed_ray.data.prepare import load_prepared
    from atspeed_ray.models import load_decoder
    from atspeed_ray.training.core import steps_per_epoch

    data, target_dir = pair
    out = tmp_path / "feature"
    assert main(["align", "--data", str(data), "--target", str(target_dir), "--out", str(out),
                 "--draft-kind", "feature", "--workers", "2", "--zero-stage", "2", "--epochs", "2",
                 "--max-samples", "64", "--micro-batch", "8", "--lr", "3e-3", "--val-samples", "8",
                 "--teacher-k", "3", "--val-k", "3", "--val-draft-beams", "6", "--threads", "1",
                 "--storage-path", str(tmp_path / "ray"), "--log-every", "1000",
                 "--tree-cache", str(tmp_path / "trees")]) == 0
    assert len(list((tmp_path / "trees").glob("trees-*.safetensors"))) == 1  # both workers, one file
    hist = json.loads((out / "training.json").read_text())
    assert hist["step"] == 2 * steps_per_epoch(64, 2, 8, 1) and len(hist["epochs"]) == 2
    assert hist["epochs"][1]["align"] < hist["epochs"][0]["align"]
    assert "val_code2_first_width_median" in hist["epochs"][1]
    drafter = load_drafter(out, DeviceConfig(device="cpu"))
    assert isinstance(drafter, FeatureDrafter)
    prepared = load_prepared(data)
    target = load_decoder(target_dir, DeviceConfig(device="cpu"))
    fresh = FeatureDraft.from_target(target, prepared.index)  # the target's rows, untrained
    assert torch.equal(drafter.model.embed, fresh.embed) and torch.equal(drafter.model.head, fresh.head)
    prompts = prepared.prompts("test", limit=4)
    ref = beam_search(target, prompts, prepared.index, 3)
    for _, res in strict_runs(target, drafter, prompts, prepared.index, 3, 6, 3):
        assert_same_as_beam_search(res, ref)


def test_teacher_trees_are_cached_by_target_data_and_k(pair, tmp_path, monkeypatch):
    """``--tree-cache``: the first setup computes the trees and writes them; a second one on the
    same target, data and K loads them without running the target; another K has its own file."""
    import atspeed_ray.training.feature as feature
    from atspeed_ray.training.config import TrainConfig
    from atspeed_ray.training.setup import build_setup

    data, target_dir = pair
    cache = tmp_path / "trees"
    cfg = TrainConfig(task="align", runner="local", data=str(data), target=str(target_dir),
                      out=str(tmp_path / "d"), draft_kind="feature", teacher_k=3, max_samples=24,
                      val_samples=4, micro_batch=8, tree_cache=str(cache))
    first = build_setup(cfg, torch.device("cpu"))
    files = list(cache.glob("trees-*.safetensors"))
    assert len(files) == 1 and len(first.trees.trees) == len({tuple(p) for p in
                                                             first.train.prompts + first.val.prompts})

    def no_target(*a, **kw):
        raise AssertionError("the target ran although its trees are cached")

    monkeypatch.setattr(feature, "target_tree", no_target)
    second = build_setup(cfg, torch.device("cpu"))
    for idx in ([0, 5, 2], [1]):
        a, b = first.batch(first.train, idx), second.batch(second.train, idx)
        for la, lb in zip(a.levels, b.levels):
            for f in ("tokens", "scores", "node", "parent", "feature", "col_logp"):
                assert torch.equal(getattr(la, f), getattr(lb, f)), f
        assert torch.equal(a.context.features, b.context.features)
        assert torch.equal(a.context.valid, b.context.valid)
    key = feature.tree_cache_key(target_dir, first.prepared.index, 3)
    assert key != feature.tree_cache_key(target_dir, first.prepared.index, 4)
    with pytest.raises(ValueError, match="another target"):
        second.trees.load(files[0], feature.tree_cache_key(target_dir, first.prepared.index, 4))
    with pytest.raises(AssertionError, match="cached"):  # K = 4: not cached yet, the target runs
        build_setup(cfg.model_copy(update={"teacher_k": 4}), torch.device("cpu"))
    with pytest.raises(ValueError, match="--draft-kind feature only"):
        TrainConfig(task="align", data=str(data), target=str(target_dir), out="o",
                    teacher="t", tree_cache=str(cache))
