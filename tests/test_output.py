"""What a pipeline run prints: each stage's own report on stdout, the libraries' logs (its stderr)
in ``logs/<command>.log``; a failed stage shows the end of its log; verbose prints both."""

from __future__ import annotations

import pytest

from atspeed_ray.pipeline import StageOutput, run_cli
from atspeed_ray.report import summary_lines

SMALL = ["--num-users", "200", "--num-items", "120"]


def test_stage_report_on_stdout_and_its_stderr_in_the_log(tmp_path, capfd):
    output = StageOutput(tmp_path / "logs")
    run_cli(["prepare", "--data", "synthetic", "--out", str(tmp_path / "data"), *SMALL], output)
    out, err = capfd.readouterr()
    assert "$ atspeed-ray prepare" in out and "prepared" in out and "samples: train" in out
    assert "[prepare done in" in out and err == ""
    log = (tmp_path / "logs" / "prepare.log").read_text()
    assert "$ atspeed-ray prepare --data synthetic" in log.splitlines()[1]


def test_finished_stages_are_recorded_with_their_times_and_a_failed_one_is_not(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    times = tmp_path / "stage_times.json"
    output = StageOutput(tmp_path / "logs", times=times)
    run_cli(["prepare", "--data", "synthetic", "--out", str(tmp_path / "data"), *SMALL], output)
    with pytest.raises(SystemExit):
        run_cli(["prepare", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "d")], output)
    output.record(["teacher", "--k", "10"], 12.34)  # a later session appends to the same file
    rows = json.loads(times.read_text())
    assert [r["command"].split()[:2] for r in rows] == [["atspeed-ray", "prepare"], ["atspeed-ray", "teacher"]]
    assert rows[0]["seconds"] > 0 and rows[1]["seconds"] == 12.3
    path = Path(__file__).resolve().parents[1] / "jobs" / "reproduce.py"
    spec = importlib.util.spec_from_file_location("reproduce", path)
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    table = reproduce.stage_table(times).splitlines()
    assert table[2] == "| finished | seconds | command |" and len(table) == 6
    assert table[-1].endswith("| 12 | `atspeed-ray teacher --k 10` |")
    assert reproduce.stage_table(tmp_path / "none.json") == ""


def test_a_failed_stage_shows_the_end_of_its_log(tmp_path, capfd):
    output = StageOutput(tmp_path / "logs")
    argv = ["prepare", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "data")]
    with pytest.raises(SystemExit) as e:
        run_cli(argv, output)
    msg = str(e.value)
    assert msg.startswith("stage failed (exit 2): atspeed-ray prepare")
    assert f"last lines of {tmp_path / 'logs' / 'prepare.log'}" in msg
    assert "atspeed-ray prepare: error:" in msg and "missing" in msg
    assert "error" not in capfd.readouterr().err


def test_verbose_prints_the_logs_and_writes_no_file(tmp_path, capfd):
    output = StageOutput(tmp_path / "logs", verbose=True)
    with pytest.raises(SystemExit, match=r"^stage failed \(exit 2\)"):
        run_cli(["prepare", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "d")], output)
    assert "atspeed-ray prepare: error:" in capfd.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_summary_lines_inline_nested_values():
    lines = summary_lines({"users": 3, "samples": {"train": 5, "test": 1},
                           "skipped": {"valid": {"no_history": 0}}, "loss": 0.123456})
    assert lines == ["  users 3", "  samples: train 5, test 1", "  skipped: valid (no_history 0)",
                     "  loss 0.1235"]
