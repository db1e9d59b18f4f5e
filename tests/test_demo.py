"""The pipeline pieces an LLM demo needs: a bundled base model written by a first stage, the
draft widths ``evaluate --draft-beams auto`` measured handed to ``serve``."""

from __future__ import annotations

import json
from pathlib import Path

from atspeed_ray.pipeline import (
    PipelineConfig, StageOutput, base_model_stage, measured_widths, prepare_argv, target_argv,
)


def test_a_bundled_base_model_is_written_by_a_first_stage(tmp_path):
    cfg = PipelineConfig(base_model="smollm2", history_len=5)
    # an existing output is reused (no stage runs), and the later stages get that folder
    folder = tmp_path / "out" / "base-model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    resolved = base_model_stage(cfg, tmp_path / "out", StageOutput(tmp_path / "logs"))
    assert resolved.base_model == str(folder)
    assert prepare_argv(resolved, tmp_path / "d")[-4:] == [
        "--base-model", str(folder), "--history-len", "5"]
    assert target_argv(resolved, tmp_path / "d", tmp_path / "t")[5:7] == ["--init", str(folder)]
    plain = PipelineConfig(base_model=str(folder))  # a folder is used as it is
    assert base_model_stage(plain, tmp_path / "out", StageOutput(tmp_path / "logs")) is plain


def test_serve_demo_gets_the_widths_evaluate_measured(tmp_path):
    from atspeed_ray.serving.config import AppArgs

    choice = {"chosen_n": 20}
    rows = [{"method": "atspeed-s", "mode": "strict", "batch_size": 1, "k": 10, "draft_beams": 200,
             "level_widths": [10, 200, 20], "width_choice": choice},
            {"method": "atspeed-s", "mode": "strict", "batch_size": 1, "k": 1, "draft_beams": 2,
             "level_widths": [2], "width_choice": choice},
            {"method": "atspeed-s", "mode": "relaxed", "batch_size": 1, "k": 5, "draft_beams": 5,
             "level_widths": [5], "width_choice": choice},
            {"method": "sft", "mode": "strict", "batch_size": 1, "k": 5, "draft_beams": 15,
             "level_widths": [15], "width_choice": choice},
            {"method": "atspeed-s", "mode": "strict", "batch_size": 8, "k": 5, "draft_beams": 10,
             "level_widths": [10], "width_choice": choice}]
    (tmp_path / "speed.json").write_text(json.dumps(rows))
    measured = measured_widths(tmp_path, "atspeed-s")  # per level: as draft_widths reads it
    assert measured == {10: "10/200/20", 1: 2}
    assert AppArgs(target="t", draft="d", draft_widths=measured).draft_width(10) == (10, 200, 20)
    rows = [{**r, "width_choice": None} for r in rows]
    for r in rows:
        del r["width_choice"]  # a fixed --draft-beams: nothing measured
    (tmp_path / "speed.json").write_text(json.dumps(rows))
    assert measured_widths(tmp_path, "atspeed-s") == {}
    assert measured_widths(tmp_path / "missing", "atspeed-s") == {}


def test_sft_then_align_makes_the_sft_draft_first_and_starts_the_others_from_it(tmp_path):
    from atspeed_ray.pipeline import StageSettings, align_argv, draft_order

    d, t, te, drafts = tmp_path / "d", tmp_path / "t", tmp_path / "te", tmp_path / "drafts"
    cfg = PipelineConfig(losses=["atspeed-s", "sft", "atspeed-r"], draft_init_layers=2,
                         draft_recipe="sft-then-align",
                         sft=StageSettings(epochs=1, max_samples=300, extra=["--code-head"]),
                         align=StageSettings(epochs=3, lr=3e-4, extra=["--code-head"]))
    assert draft_order(cfg) == ["sft", "atspeed-s", "atspeed-r"]
    sft = align_argv(cfg, d, t, te, drafts / "sft")
    assert "--teacher" not in sft  # the training data itself
    assert sft[sft.index("--init-layers") + 1] == "2"
    assert sft[sft.index("--max-samples") + 1] == "300" and sft[-1] == "--code-head"
    aligned = align_argv(cfg, d, t, te, drafts / "atspeed-s")
    assert aligned[aligned.index("--teacher") + 1] == str(te)
    assert aligned[aligned.index("--init") + 1] == str(drafts / "sft")
    assert "--init-layers" not in aligned and "--preset" not in aligned
    assert aligned[aligned.index("--lr") + 1] == "0.0003"
    # the default recipe: every loss from the same start, on the teacher data
    plain = cfg.model_copy(update={"draft_recipe": "teacher"})
    assert draft_order(plain) == ["atspeed-s", "sft", "atspeed-r"]
    for loss in plain.losses:
        argv = align_argv(plain, d, t, te, drafts / loss)
        assert "--teacher" in argv and "--init" not in argv and "--init-layers" in argv


def test_demo_configs_validate_and_the_llm_one_cuts_drafts_from_the_target():
    import importlib.util

    from atspeed_ray.models import get_preset

    path = Path(__file__).resolve().parents[1] / "jobs" / "demo.py"
    spec = importlib.util.spec_from_file_location("demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    deep, llm = demo.deep_config("o", False), demo.llm_config("o", False)
    assert deep.base_model is None and deep.draft_recipe == "teacher"
    assert get_preset(deep.preset).target.num_layers >= 16  # where a pass outweighs a round's bookkeeping
    assert llm.base_model == "smollm2" and llm.draft_recipe == "sft-then-align"
    assert llm.draft_init_layers == 2 and "--code-head" in llm.align.extra
    assert deep.feature is not None and deep.feature.workers == 0  # in process: no Ray start


def test_a_feature_draft_is_trained_in_process_and_evaluated_beside_the_lm_drafts(tmp_path):
    from atspeed_ray.pipeline import FEATURE_DRAFT, StageSettings, evaluate_argv, feature_argv

    d, t, e = tmp_path / "d", tmp_path / "t", tmp_path / "eval"
    cfg = PipelineConfig(teacher_k=5, feature=StageSettings(epochs=2, lr=1e-3, workers=0))
    draft = tmp_path / "drafts" / FEATURE_DRAFT
    argv = feature_argv(cfg, d, t, draft)
    assert argv[argv.index("--draft-kind") + 1] == "feature"
    assert argv[argv.index("--teacher-k") + 1] == "5" and argv[argv.index("--workers") + 1] == "0"
    assert "--teacher" not in argv and "--loss" not in argv  # the target's own beams teach it
    drafts = [tmp_path / "drafts" / "atspeed-s", draft]
    argv = evaluate_argv(cfg, d, t, e, drafts)
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--draft"] == [str(p) for p in drafts]
    assert PipelineConfig().feature is None  # none unless configured
