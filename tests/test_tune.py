"""Ray Tune search of the alignment weights on tiny models: a 2-trial search, and resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from atspeed_ray.data.prepare import prepare
from atspeed_ray.data.synthetic import SyntheticConfig
from atspeed_ray.models import load_model
from atspeed_ray.training.config import TeacherConfig, TrainConfig
from atspeed_ray.training.trainer import fit
from atspeed_ray.training.teacher import generate_teacher
from atspeed_ray.tune import load_space, objective, run_tune

QUICK = {"preset": "tiny", "max_samples": 256, "micro_batch": 32, "val_samples": 16, "val_k": 3,
         "val_draft_beams": 6, "log_every": 1000, "threads": 1}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    prep = root / "prep"
    prepare("synthetic", prep, synthetic=SyntheticConfig(num_users=200, num_items=120,
                                                         codebook_sizes=[8, 8, 8, 8], seed=1))
    target = root / "target"
    fit(TrainConfig(task="target", runner="local", data=str(prep), out=str(target), epochs=2,
                    **QUICK), log=lambda m: None)
    teacher = root / "teacher"
    generate_teacher(TeacherConfig(data=str(prep), target=str(target), out=str(teacher), k=5,
                                   workers=0, max_samples=192, max_valid=32, chunk_size=64),
                     log=lambda m: None)
    return prep, target, teacher


def write_space(path: Path, extra_fixed: str = "") -> Path:
    path.write_text(f"""
name: t
mode: strict
fixed: {{loss: atspeed-s, epochs: 2{extra_fixed}}}
search:
  alpha: {{choice: [0.2, 0.9]}}
  lr: {{grid: [0.003, 0.0003]}}
""")
    return path


def test_shipped_spaces_parse():
    for f in sorted(Path(__file__).resolve().parents[1].glob("tuning/*.yaml")):
        space = load_space(f)
        assert space.search, f
    assert objective({"val_accept": 2.0, "val_recall": 0.5, "val_target_recall": 0.5}, "relaxed", 0.9) == 2.0
    assert objective({"val_accept": 2.0, "val_recall": 0.25, "val_target_recall": 0.5}, "relaxed", 1.0) < 0


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)  # two searches of two trials each
def test_two_trial_search_and_resume(ray_local, assets, tmp_path):
    prep, target, teacher = assets
    # trials fail once after their first epoch's checkpoint: the search ends "interrupted"
    space = write_space(tmp_path / "space.yaml", ", fail_after_epoch: 1")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="--resume"):
        run_tune(str(prep), str(target), str(teacher), str(space), 1, str(out),
                 max_concurrent=1, base_overrides=QUICK, log=lambda m: None)
    summary = run_tune(str(prep), str(target), str(teacher), str(space), 1, str(out),
                       resume=True, max_concurrent=1, base_overrides=QUICK, log=lambda m: None)
    assert summary["trials"] == 2
    best = json.loads((out / "best_config.json").read_text())
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and (out / "trials.md").exists()
    assert all(r["status"] == "ok" for r in rows)
    # the best trial is the one with the best reported objective
    assert max(float(r["objective"]) for r in rows) == pytest.approx(best["objective"])
    assert rows[0]["trial_id"] == best["trial"]
    model, _ = load_model(out / "best_draft")
    assert model.config.hidden_size == 32
    # no Ray Train placement group outlives its trial (else the next search waits for CPUs)
    import time

    from ray.util import placement_group_table

    deadline = time.monotonic() + 30
    while (left := [v for v in placement_group_table().values() if v["state"] != "REMOVED"]):
        assert time.monotonic() < deadline, left
        time.sleep(0.5)


def test_the_feature_space_makes_valid_feature_runs_without_teacher_data():
    space = load_space(Path(__file__).resolve().parents[1] / "tuning" / "feature.yaml")
    assert {"feature_weight", "feature_layers"} <= set(space.search)
    assert space.search["feature_layers"] == {"choice": [1, 2]}
    for layers in (1, 2):  # the baseline and the other depth, as a trial builds them
        cfg = TrainConfig(task="align", data="d", target="t", out="o", workers=1, **space.fixed,
                          **{**space.baseline, "feature_layers": layers})
        assert (cfg.draft_kind, cfg.teacher, cfg.feature_layers) == ("feature", None, layers)


def test_an_lm_space_without_teacher_data_is_one_clear_error(tmp_path, capsys):
    from atspeed_ray.cli import main

    space = Path(__file__).resolve().parents[1] / "tuning" / "atspeed_s.yaml"
    assert main(["tune", "--data", str(tmp_path), "--target", str(tmp_path), "--space", str(space),
                 "--num-samples", "1", "--out", str(tmp_path / "out")]) == 2
    assert "needs --teacher" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_two_trial_feature_search(ray_local, assets, tmp_path):
    """A feature draft's search (feature_layers 1 vs 2, no teacher data): both trials train on
    Ray Train, the best draft is exported as a feature draft."""
    from atspeed_ray.drafts import load_drafter
    from atspeed_ray.drafts.feature import FeatureDrafter

    prep, target, _ = assets
    space = tmp_path / "space.yaml"
    space.write_text(f"""
name: f
mode: strict
fixed: {{draft_kind: feature, epochs: 1, tree_cache: {tmp_path / 'trees'}}}
search:
  feature_layers: {{grid: [1, 2]}}
  feature_weight: {{choice: [0.1]}}
""")
    out = tmp_path / "out"
    summary = run_tune(str(prep), str(target), None, str(space), 1, str(out), max_concurrent=1,
                       base_overrides={**QUICK, "max_samples": 64}, log=lambda m: None)
    assert summary["trials"] == summary["trials_run"] == 2
    assert len(list((tmp_path / "trees").glob("trees-*.safetensors"))) == 1  # shared by both
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["feature_layers"] for r in rows) == ["1", "2"]
    drafter = load_drafter(out / "best_draft")
    assert isinstance(drafter, FeatureDrafter)
    assert drafter.model.config.layers == summary["config"]["feature_layers"]


def test_baseline_must_cover_the_searched_fields(tmp_path):
    path = write_space(tmp_path / "space.yaml")
    path.write_text(path.read_text() + "baseline: {alpha: 0.9, lr: 0.003}\n")
    assert load_space(path).baseline == {"alpha": 0.9, "lr": 0.003}
    path.write_text(path.read_text().replace("baseline: {alpha: 0.9, lr: 0.003}", "baseline: {alpha: 0.9}"))
    with pytest.raises(ValueError, match="baseline"):
        load_space(path)
