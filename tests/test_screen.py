"""One screen of results: evaluate's short tables (and the demo's closing note) fit 100 columns,
say where the full tables are, and the stage logs hold no terminal escape codes."""

from __future__ import annotations

import json
from pathlib import Path

from atspeed_ray.pipeline import PipelineConfig, StageOutput, accuracy_note, strip_ansi
from atspeed_ray.report import SCREEN_WIDTH, below_references, results_screen

DRAFTS = ["sft", "atspeed-s", "a-very-long-draft-folder-name"]
KS = [1, 5, 10, 20]


def speed_row(method: str, mode: str, k: int, unstable: bool = False) -> dict:
    return {"method": method, "mode": mode, "batch_size": 1, "k": k, "draft_beams": 2 * k,
            "walltime_speedup": 1.234, "ws": 1.234, "ws_q1": 1.1, "ws_q3": 11.35,
            "ws_prompts": 30, "unstable": unstable, "fraction_of_oracle": 0.456,
            "target_calls_per_request": 2.25, "identical_rate": 1.0}


def write_eval(folder, target_recall: float) -> None:
    folder.mkdir()
    acc = [{"method": m, "mode": mode, "k": k, "recall": r, "ndcg": r / 2}
           for m, mode, r in [("popularity", "-", 0.1), ("transition", "-", 0.49),
                              ("sasrec", "-", 0.51), ("target", "beam", target_recall),
                              *[(d, "relaxed", 0.4) for d in DRAFTS]] for k in KS]
    speed = [speed_row(d, mode, k, unstable=(d == "sft" and k == 5))
             for mode in ("strict", "relaxed") for d in DRAFTS for k in KS]
    (folder / "accuracy.json").write_text(json.dumps(acc))
    (folder / "speed.json").write_text(json.dumps(speed))


def test_the_short_tables_fit_100_columns_and_say_where_the_full_ones_are(tmp_path):
    write_eval(tmp_path / "eval", target_recall=0.42)
    text = results_screen(tmp_path / "eval")
    lines = text.splitlines()
    assert max(map(len, lines)) <= SCREEN_WIDTH == 100
    assert len(lines) < 50  # one screen, where evaluate's tables had 32 columns
    assert "R@20" in lines[1] and "0.4900" in text
    strict = lines.index(next(x for x in lines if x.startswith("strict SD")))
    assert "identical" in lines[strict + 1] and "WS [q1-q3]" in lines[strict + 1]
    row = lines[strict + 2]
    assert row.split()[:3] == ["sft", "1", "2"] and "1.23x [1.10-11.35]" in row
    assert "46%" in row and "2.25" in row and row.endswith("100.0%")
    assert "unstable" in lines[strict + 3] and "unstable" not in row  # K=5 flagged, K=1 not
    assert "a-very-long~" in text  # names are cut, not the table
    relaxed = lines.index(next(x for x in lines if x.startswith("relaxed SD")))
    assert lines[relaxed + 2].endswith("0.4000 / 0.4200")  # speculation's Recall@K / the target's
    assert "2 row(s) unstable" in text and "WS on 30 prompts" in text
    assert f"full tables: {tmp_path / 'eval'}/speed.{{md,csv,json}}" in text


def test_the_demo_says_why_the_target_is_below_the_references_only_when_it_is(tmp_path):
    from atspeed_ray.data.synthetic import SyntheticConfig

    write_eval(tmp_path / "below", target_recall=0.42)
    write_eval(tmp_path / "above", target_recall=0.60)
    read = lambda name: json.loads((tmp_path / name / "accuracy.json").read_text())  # noqa: E731
    assert below_references(read("below"), ["transition", "sasrec"]) == (
        "Recall@20 0.42 against transition 0.49, sasrec 0.51")
    summary = {"L": 4, "synthetic": {"config": SyntheticConfig(stay_prob=0.7).model_dump()}}
    cfg = PipelineConfig()  # the tiny demo's
    note = accuracy_note(cfg.model_copy(update={"target": cfg.target.model_copy(
        update={"epochs": 4})}), read("below"), summary)
    assert "Recall@20 0.42 against transition 0.49, sasrec 0.51" in note
    assert "cluster 70%" in note and "successor 35%" in note and "4 epochs" in note
    assert "4-token item IDs" in note
    assert accuracy_note(cfg, read("above"), summary) is None
    plain = accuracy_note(cfg, read("below"), {"L": 4})  # a real data set: no synthetic reason
    assert plain.endswith("not the product.") and "first-order" not in plain


def test_stage_logs_hold_no_escape_codes(tmp_path):
    output = StageOutput(tmp_path / "logs")
    with output.stderr(["teacher", "--k", "3"]) as f:
        f.write("\x1b[36m(RayTrainWorker pid=12)\x1b[0m step 1 \x1b[2K\x1b]0;title\x07done\n")
    log = (tmp_path / "logs" / "teacher.log").read_text()
    assert "\x1b" not in log and "(RayTrainWorker pid=12) step 1 done" in log
    assert strip_ansi("\x1b[1;31mred\x1b[0m") == "red"


def test_what_a_stage_prints_reaches_the_terminal_without_ray_prefixes_or_colours():
    from atspeed_ray.pipeline import screen_line

    worker = "\x1b[36m(RayTrainWorker pid=21961)\x1b[0m [target] epoch 1/4 step 50/301 loss 2.65\n"
    assert screen_line(worker) == "[target] epoch 1/4 step 50/301 loss 2.65"
    remote = "(TeacherWorker pid=7, ip=10.0.0.2) [teacher] 10/40 batches\n"
    assert screen_line(remote) == "[teacher] 10/40 batches"
    raylet = ("\x1b[33m(raylet)\x1b[0m Task ServeController.graceful_shutdown failed. There are "
              "infinite retries remaining\n")
    assert screen_line(raylet) is None  # Ray's own notices go to the command's log
    assert screen_line("evaluate: 760 test prompts (pid=3)\n") == "evaluate: 760 test prompts (pid=3)"


def test_commands_and_the_serving_example_fit_100_columns_and_stay_one_command():
    import shlex

    from atspeed_ray.pipeline import reply_text
    from atspeed_ray.report import command_text

    argv = ["atspeed-ray", "evaluate", "--data", "/a/rather/long/path/" * 3 + "data",
            "--target", "/some/where/target", "--out", "/some/where/eval", "--k", "1,5,10",
            "--timing-prompts", "30", "--draft-beams", "2k", "--draft", "sft=/x/drafts/sft",
            "--draft", "atspeed-s=/x/drafts/atspeed-s", "--set", 'draft_widths={"1": 2, "10": 20}']
    text = command_text(argv)
    assert all(len(line) <= SCREEN_WIDTH for line in text.splitlines()), text
    assert text.startswith("$ atspeed-ray evaluate") and len(text.splitlines()) > 1
    pasted = text.removeprefix("$ ").replace(" \\\n", " ")  # what a shell reads
    assert shlex.split(pasted) == argv
    body = json.dumps({"history": [215, 201, 380, 455, 9, 378, 363, 328], "k": 5, "mode": "strict"})
    curl = command_text(["curl", "-s", "-X", "POST", "http://127.0.0.1:8000/recommend", "-H",
                         "content-type: application/json", "-d", body], prompt="  ")
    assert all(len(line) <= SCREEN_WIDTH for line in curl.splitlines()), curl
    reply = json.dumps({"items": [107, 580, 454, 554, 211],
                        "scores": [-1.6411241292953491, -2.472123384475708, -2.95, -3.01, -3.14],
                        "stats": {"target_calls": 2, "rounds": 2, "draft_width": 10}})
    line = "reply (200): " + reply_text(reply)
    assert line == ("reply (200): items [107, 580, 454, 554, 211], "
                    "scores [-1.64, -2.47, -2.95, -3.01, -3.14]") and len(line) <= SCREEN_WIDTH
    assert reply_text('{"detail": "k: must be >= 1"}') == '{"detail": "k: must be >= 1"}'


def test_a_stage_line_wider_than_the_screen_is_wrapped_and_a_table_row_is_not(capsys):
    """``relay``: an epoch's metrics (300+ columns in the demo) wrap at the screen's width at
    their spaces, every word kept; a table row that fits passes as it is, its spacing intact."""
    import io

    from atspeed_ray.pipeline import relay

    metrics = "[align feature atspeed-s] epoch 4/4 done: " + " ".join(
        f"val_code{i}_width_median {i * 7}" for i in range(20))
    row = "feature        1   2  0.67x [0.59-0.71]              20%      2.53  100.0%"

    class Child:
        stdout = io.StringIO(metrics + "\n" + row + "\n")

    relay(Child(), None)
    shown = capsys.readouterr().out.splitlines()
    assert max(map(len, shown)) <= SCREEN_WIDTH < len(metrics)
    assert " ".join(x.strip() for x in shown[:-1]).split() == metrics.split()
    assert shown[-1] == row


def test_the_logs_line_fits_the_screen(capsys):
    """The demo's first line (where the libraries' logs go) wraps like the stage lines (with the
    default ``demo_out`` it was 108 columns) at its spaces: the path stays whole on one line."""
    for logs in (Path("demo_out/logs"), Path("/home/someone/runs/atspeed-ray-demo-2026/logs")):
        StageOutput(logs).announce()
        shown = capsys.readouterr().out.splitlines()
        assert len(shown) > 1 and max(map(len, shown)) <= SCREEN_WIDTH
        assert any(f"{logs}/" in line for line in shown)
