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
    choice = {"chosen_n": 20}
    rows = [{"method": "atspeed-s", "mode": "strict", "batch_size": 1, "k": 10, "draft_beams": 20,
             "width_choice": choice},
            {"method": "atspeed-s", "mode": "strict", "batch_size": 1, "k": 1, "draft_beams": 2,
             "width_choice": choice},
            {"method": "atspeed-s", "mode": "relaxed", "batch_size": 1, "k": 5, "draft_beams": 5,
             "width_choice": choice},
            {"method": "sft", "mode": "strict", "batch_size": 1, "k": 5, "draft_beams": 15,
             "width_choice": choice},
            {"method": "atspeed-s", "mode": "strict", "batch_size": 8, "k": 5, "draft_beams": 10,
             "width_choice": choice}]
    (tmp_path / "speed.json").write_text(json.dumps(rows))
    assert measured_widths(tmp_path, "atspeed-s") == {10: 20, 1: 2}
    rows = [{**r, "width_choice": None} for r in rows]
    for r in rows:
        del r["width_choice"]  # a fixed --draft-beams: nothing measured
    (tmp_path / "speed.json").write_text(json.dumps(rows))
    assert measured_widths(tmp_path, "atspeed-s") == {}
    assert measured_widths(tmp_path / "missing", "atspeed-s") == {}
