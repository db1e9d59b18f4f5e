"""The commands' closing summaries as lines a person reads (the full record is the JSON file each
command writes into its output folder), and ``evaluate``'s tables in a short form that fits one
screen of ``SCREEN_WIDTH`` columns (``results_screen``; the full tables stay in the files)."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def value_text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} ({value_text(v)})" if isinstance(v, Mapping) else f"{k} {value_text(v)}"
                         for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(map(value_text, value))
    return str(value)


def summary_lines(summary: Mapping[str, object], indent: str = "  ") -> list[str]:
    """One line per key, nested mappings inline: ``samples: train 19321, valid 926, test 760``,
    ``skipped: train (users_without_train_items 0), valid (...)``."""
    return [f"{indent}{k}: {value_text(v)}" if isinstance(v, Mapping) else f"{indent}{k} {value_text(v)}"
            for k, v in summary.items()]


def print_summary(title: str, summary: Mapping[str, object]) -> None:
    print("\n".join([title, *summary_lines(summary)]), flush=True)


# ----------------------------------------------------------------------------- evaluate's screen
SCREEN_WIDTH = 100  # the short tables and notes fit this many columns
NAME_WIDTH = 12  # a method's name is cut to this many characters in the short tables


def _name(text: str) -> str:
    return text if len(text) <= NAME_WIDTH else text[:NAME_WIDTH - 1] + "~"


def _recall(accuracy: Sequence[Mapping], method: str, mode: str, k: int) -> float | None:
    return next((r["recall"] for r in accuracy
                 if (r["method"], r["mode"], r["k"]) == (method, mode, k)), None)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def accuracy_lines(accuracy: Sequence[Mapping]) -> list[str]:
    """Recall@K of every method (rows) at every K (columns)."""
    ks = sorted({r["k"] for r in accuracy})
    methods = list(dict.fromkeys((r["method"], r["mode"]) for r in accuracy))
    lines = [f"{'method':<{NAME_WIDTH}} {'mode':<8}" + "".join(f"{f'R@{k}':>9}" for k in ks)]
    for method, mode in methods:
        lines.append(f"{_name(method):<{NAME_WIDTH}} {mode:<8}"
                     + "".join(f"{_cell(_recall(accuracy, method, mode, k)):>9}" for k in ks))
    return lines


def speed_lines(speed: Sequence[Mapping], accuracy: Sequence[Mapping], mode: str) -> list[str]:
    """One row per (batch size, draft, K) of ``mode``: WS [interquartile range of the per-prompt
    ratios] (``unstable`` when flagged), the fraction of the oracle bound reached, the
    identical-top-K rate (strict) or Recall@K of speculation beside the target's beam search
    (relaxed), and target calls per request."""
    from atspeed_ray.benchmarking import ws_text

    rows = [r for r in speed if r["mode"] == mode]
    several = len({r["batch_size"] for r in rows}) > 1
    last = "identical" if mode == "strict" else "R@K spec / target"
    head = (f"{'draft':<{NAME_WIDTH}}" + (f" {'B':>3}" if several else "")
            + f" {'K':>3} {'N':>3}  {'WS [q1-q3]':<27}{'%oracle':>7} {'calls/req':>9}  {last}")
    lines = [head]
    for r in rows:
        if mode == "strict":
            tail = f"{100 * r['identical_rate']:.1f}%"
        else:
            tail = (f"{_cell(_recall(accuracy, r['method'], 'relaxed', r['k']))} / "
                    f"{_cell(_recall(accuracy, 'target', 'beam', r['k']))}")
        lines.append(f"{_name(r['method']):<{NAME_WIDTH}}" + (f" {r['batch_size']:>3}" if several else "")
                     + f" {r['k']:>3} {r['draft_beams']:>3}  {ws_text(r):<27}"
                     f"{100 * r['fraction_of_oracle']:>6.0f}% {r['target_calls_per_request']:>9.2f}  "
                     f"{tail}")
    return lines


MODE_TITLES = {"strict": "strict SD (returns the target's own top-K)",
               "relaxed": "relaxed SD (sampling: judged by Recall@K against the target's)"}


def results_screen(folder: Path) -> str:
    """The short form of ``evaluate``'s tables in ``folder`` (``accuracy.json``, ``speed.json``):
    Recall@K per method, then per verification mode WS with its spread, the oracle fraction,
    target calls per request and identical top-K or Recall@K; and where the full tables are."""
    accuracy = json.loads((folder / "accuracy.json").read_text())
    speed = json.loads((folder / "speed.json").read_text())
    prompts = {r.get("ws_prompts") for r in speed} - {None}
    out = ["accuracy (Recall@K on the test split; NDCG@K in accuracy.md):", *accuracy_lines(accuracy)]
    for mode in dict.fromkeys(r["mode"] for r in speed):
        out += ["", f"{MODE_TITLES.get(mode, mode)}; WS on {','.join(map(str, sorted(prompts)))} "
                    f"prompts:", *speed_lines(speed, accuracy, mode)]
    unstable = sum(bool(r.get("unstable")) for r in speed)
    if unstable:
        out.append(f"{unstable} row(s) unstable: their repeats disagreed or their spread stayed wide "
                   f"after measuring again (README: 'What the numbers mean')")
    out += ["", f"full tables: {folder}/speed.{{md,csv,json}} (phase breakdown, bounds, widths by "
                f"code position), {folder}/accuracy.{{md,csv,json}}, ws_vs_k.png, "
                f"accepted_steps_hist.png"]
    return "\n".join(wrap_line(line) for line in out)


def wrap_line(line: str) -> str:
    """``line``, wrapped at ``SCREEN_WIDTH`` columns (continuation lines indented) at its spaces
    only: a path or a word is never cut, so a copied path still works."""
    import textwrap

    return "\n".join(textwrap.wrap(line, SCREEN_WIDTH, subsequent_indent="  ",
                                    break_long_words=False, break_on_hyphens=False)) if line else ""


def command_text(argv: Sequence[str], prompt: str = "$ ") -> str:
    """A shell command (``argv``, quoted) in lines of at most ``SCREEN_WIDTH`` columns, broken
    before a flag (``-d``, ``--data``) with `` \\`` continuations: still one command when pasted
    (a flag with a value longer than a line stays whole on its own line)."""
    import shlex

    words = [shlex.quote(w) for w in argv]
    parts: list[str] = []  # each flag with its values
    for w in words:
        if parts and not w.startswith("-"):
            parts[-1] += " " + w
        else:
            parts.append(w)
    lines, line = [], prompt + parts[0]
    for part in parts[1:]:
        if len(line) + 1 + len(part) + 2 > SCREEN_WIDTH:
            lines.append(line + " \\")
            line = "    " + part
        else:
            line += " " + part
    return "\n".join([*lines, line])


def below_references(accuracy: Sequence[Mapping], references: Sequence[str]) -> str | None:
    """When the target's beam search is below a reference recommender at the largest K: the
    numbers as a phrase ("Recall@10 0.42 against transition 0.49, sasrec 0.51"), else None."""
    k = max(r["k"] for r in accuracy)
    target = _recall(accuracy, "target", "beam", k)
    refs = {m: _recall(accuracy, m, "-", k) for m in references}
    above = {m: v for m, v in refs.items() if v is not None and target is not None and v > target}
    if not above:
        return None
    return f"Recall@{k} {target:.2f} against " + ", ".join(f"{m} {v:.2f}" for m, v in above.items())


def write_table(rows: list[dict[str, Any]], out: Path, name: str, columns: list[str]) -> None:
    """rows -> NAME.json, NAME.csv, NAME.md (None, a value not measured: "-" in the Markdown)."""
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2))
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
