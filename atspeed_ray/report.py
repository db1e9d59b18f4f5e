"""The commands' closing summaries as lines a person reads (the full record is the JSON file each
command writes into its output folder)."""

from __future__ import annotations

from collections.abc import Mapping


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
