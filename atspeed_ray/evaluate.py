"""``atspeed-ray evaluate``: the paper's tables for a target and one or more drafts, in one run.

* accuracy: Recall@K / NDCG@K on the test split for a popularity baseline (the most frequent
  training items), two reference recommenders fitted on the same train sequences (``transition``
  and ``sasrec``, see ``atspeed_ray.reference``; yardsticks, not the product), the target's beam
  search, strict SD (equal to it by construction; the identical rate is measured) and relaxed SD
  with every draft;
* speed: walltime speedup (WS), accepted steps per round and target calls per request for every
  draft under strict and relaxed verification, timed on a prompt subset at each
  ``--timing-batch`` size (default 1); ``--draft-beams auto`` picks N per draft, K and batch
  size by measured cost (``atspeed_ray.width``) and records the choice with the row;
* written as JSON, CSV and Markdown, with PNG plots (WS against K per method; histogram of
  accepted steps per round); the terminal gets the short form (``report.results_screen``).

A draft's method name is its folder name (``drafts/atspeed-s`` -> ``atspeed-s``); a draft is
any registered kind (``atspeed_ray.drafts``: a causal LM, or a feature draft on the target's
hidden states), so several kinds compare on the same prompts in one run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from atspeed_ray.benchmarking import (
    BREAKDOWN_COLUMNS, SWITCHES, SpeedFlags, batches, measure_speculative, search_params, ws_text,
)
from atspeed_ray.flags import options, validated
from atspeed_ray.report import results_screen, write_table
from atspeed_ray.settings import MODES
from atspeed_ray.reference.config import add_reference_args, reference_config

if TYPE_CHECKING:
    from atspeed_ray.decoding.drafting import Drafter


class EvaluateFlags(SpeedFlags):
    """``evaluate``'s own flags (the others: ``SpeedFlags``)."""

    draft: list[str] = Field(description="a draft folder of any kind (repeatable)")
    out: str = Field(description="output folder for tables and plots")  # type: ignore[assignment]
    num_prompts: int | None = Field(None, ge=1, description="accuracy prompts (default: all)")
    timing_prompts: int = Field(50, ge=1, description="prompts timed per row")
    timing_batch: list[int] = Field(default_factory=lambda: [1], description=(
        "requests per call in the timed rows; several (1,8,32) each get rows"))
    batch_size: int = Field(32, ge=1, description="batch size for accuracy runs")
    modes: str = Field(",".join(MODES), description="verification modes, comma-separated")


EVALUATE_FIELDS = ("data", "target", "draft", "k", "out", "draft_beams", "calibration_prompts",
                   "gamma", "num_prompts", "timing_prompts", "timing_batch", "repeat",
                   "batch_size", "modes", "seed", "device", "forward", "compile", "pack",
                   "precision", "expand_last", "relaxed_keep")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="paper-style tables: accuracy and speed for each draft")
    options(p, EvaluateFlags, EVALUATE_FIELDS, draft={"action": "append"}, **SWITCHES)
    add_reference_args(p)
    p.set_defaults(func=run_evaluate)


def method_name(path: str) -> str:
    """A draft's name in the tables: its folder's name as given (a link keeps its own name)."""
    p = Path(path)
    return p.name if p.name not in ("", ".", "..") else p.resolve().name


def draft_names(paths: list[str]) -> list[str]:
    """The tables' name of each ``--draft``; two with one name would share a row: refused."""
    names = [method_name(d) for d in paths]
    for n in names:
        same = [d for d, m in zip(paths, names) if m == n]
        if len(same) > 1:
            raise SystemExit(f"--draft: {len(same)} drafts are named {n!r} ({', '.join(same)}): the "
                             "tables name each draft by its folder; give them distinct folder names "
                             "(a symlink with a distinct name will do)")
    return names


def _per_mode_figure(modes: list[str], draw, xlabel: str, ylabel: str, path: Path) -> None:
    """One panel per verification mode: ``draw(ax, mode)`` fills a panel; saved to ``path``."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), sharey=True, squeeze=False)
    for ax, mode in zip(axes[0], modes):
        draw(ax, mode)
        ax.set_xlabel(xlabel)
        ax.set_title(f"{mode} verification")
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(speed: list[dict[str, Any]], out: Path) -> None:
    """ws_vs_k.png and accepted_steps_hist.png: one panel per verification mode, one colour per
    draft (the same colour in both files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [r for r in speed if r["batch_size"] == speed[0]["batch_size"]]  # the first timing batch

    methods = list(dict.fromkeys(r["method"] for r in speed))
    modes = list(dict.fromkeys(r["mode"] for r in speed))
    colour = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    ks = sorted({r["k"] for r in speed})

    def rows(m: str, mode: str) -> list[dict[str, Any]]:
        return [r for r in speed if (r["method"], r["mode"]) == (m, mode)]

    def ws(ax, mode: str) -> None:
        for m in methods:
            pts = sorted((r["k"], r["walltime_speedup"]) for r in rows(m, mode))
            ax.plot([k for k, _ in pts], [w for _, w in pts], marker="o", color=colour[m], label=m)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])

    def accepted(ax, mode: str) -> None:
        for m in methods:
            per_round = [a / n for r in rows(m, mode)
                         for a, n in zip(r["accepted_steps_per_request"], r["rounds_per_request"])]
            ax.hist(per_round, bins=12, range=(0, 3), histtype="step", lw=1.5, color=colour[m], label=m)

    _per_mode_figure(modes, ws, "K (beams returned)", "walltime speedup over beam search",
                     out / "ws_vs_k.png")
    _per_mode_figure(modes, accepted, "accepted steps per round (one value per request, all K)",
                     "requests", out / "accepted_steps_hist.png")


SPEED_COLUMNS = [
    "method", "mode", "batch_size", "k", "draft_beams", "gamma", "expand_last", "walltime_speedup",
    "ws_q1", "ws_q3", "ws_prompts", "unstable", "threads", "fraction_of_oracle",
    "accepted_steps_per_round", "accepted_by_position",
    "target_calls_per_request", "draft_calls_per_request", "identical_rate",
    "code1_width_median", "code1_width_max", "code_width_by_position",
    "oracle_speedup", "tree_bound_speedup", "one_round_bound_speedup",
    "beam_search_s", "speculative_s", *BREAKDOWN_COLUMNS]


@dataclass
class Setup:
    """What every table of one ``evaluate`` run reads."""

    args: argparse.Namespace
    modes: list[str]
    out: Path
    data: Any  # the opened data (``open_data``)
    index: Any  # ItemIndex on the models' device
    target: Any  # the target model
    drafts: dict[str, Drafter]  # method name -> draft (any kind, ``drafts.load_drafter``)
    prompts: list[list[int]]  # test prompts
    targets: list[list[int]]  # their target items, in code space
    calibration: list[list[int]]  # validation prompts of --draft-beams auto
    choices: dict[tuple[str, int, int], tuple[Any, Any]]  # (draft, k, batch) -> (params, choice)
    dtype: str = "float32"  # decoding dtype (--precision)

    def params(self, name: str, k: int, mode: str, batch_size: int) -> tuple[Any, Any]:
        """The search of draft ``name`` at (k, mode, batch size) and its width choice (None
        unless ``--draft-beams auto``); the choice is measured once per (draft, k, batch),
        strict, and serves both modes."""
        from atspeed_ray.width import row_params

        a = self.args
        params = search_params(k, a.draft_beams, a.gamma, mode, a.seed, self.index.device,
                               a.expand_last, a.relaxed_keep)
        key = (name, k, batch_size)
        if key not in self.choices:
            self.choices[key] = row_params(params, a.draft_beams, self.target, self.drafts[name],
                                           self.index, self.calibration, batch_size, a.repeat)
        chosen, choice = self.choices[key]
        return replace(params, draft_beams=chosen.draft_beams, gamma=chosen.gamma), choice


def load_setup(args: argparse.Namespace) -> Setup:
    from atspeed_ray.data.prepare import open_data
    from atspeed_ray.drafts import check_draft, load_drafter
    from atspeed_ray.models import DeviceConfig, decoding_dtype, load_decoder

    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: unknown mode {m!r} ({', '.join(MODES)})")
    names = draft_names(args.draft)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = open_data(args.data, models=(args.target,))
    for d in args.draft:
        check_draft(data, d)
    dev = DeviceConfig(device=args.device, forward=args.forward, compile=args.compile,
                       pack=args.pack)
    dtype, why = decoding_dtype(args.precision, dev.torch_device())
    dev = dev.model_copy(update={"dtype": dtype})
    print(f"precision: {why}")
    target = load_decoder(args.target, dev)
    drafts = {name: load_drafter(d, dev) for name, d in zip(names, args.draft)}
    index = data.index.to(dev.torch_device())
    prompts = data.prompts("test", limit=args.num_prompts)
    targets = data.targets("test", limit=args.num_prompts)
    # evaluation compares in code space: colliding items count as their representative
    targets = [index.canonical(t).tolist() for t in targets]
    calibration = data.prompts("valid", limit=args.calibration_prompts)
    return Setup(args, modes, out, data, index, target, drafts, prompts, targets, calibration, {},
                 dtype)


def accuracy_table(s: Setup) -> list[dict[str, Any]]:
    """Recall/NDCG@K of popularity, the reference recommenders, the target's beam search and
    relaxed SD with every draft."""
    import torch

    from atspeed_ray.data.prepare import popularity_topk
    from atspeed_ray.decoding import SearchParams, beam_search, speculative_search
    from atspeed_ray.metrics import ndcg_at_k, recall_at_k

    args, index, ks = s.args, s.index, s.args.k
    prompt_batches = batches(s.prompts, args.batch_size)
    accuracy: list[dict[str, Any]] = []

    def ranked(fn) -> list[list[int]]:
        with torch.no_grad():
            return [items for b in prompt_batches for items in fn(b).items]

    def add_accuracy(method: str, mode: str, items_by_k: dict[int, list[list[int]]]) -> None:
        for k in ks:
            accuracy.append({"method": method, "mode": mode, "k": k,
                             "recall": recall_at_k(items_by_k[k], s.targets, k),
                             "ndcg": ndcg_at_k(items_by_k[k], s.targets, k)})
        last = accuracy[-1]
        print(f"  {method:>12} {mode:>8}: recall@{last['k']}={last['recall']:.4f} "
              f"ndcg@{last['k']}={last['ndcg']:.4f}", flush=True)

    popular = index.canonical(popularity_topk(s.data, max(ks))).tolist()
    add_accuracy("popularity", "-", {k: [popular[:k]] * len(s.targets) for k in ks})
    from atspeed_ray.reference.data import reference_rankings

    for name, refs in reference_rankings(s.data, s.data.histories("test", limit=args.num_prompts),
                                         max(ks), reference_config(args)).items():
        add_accuracy(name, "-", {k: [r[:k] for r in refs] for k in ks})
    # beam search of width K gives a different list per K: run each K
    add_accuracy("target", "beam", {k: ranked(lambda b, k=k: beam_search(s.target, b, index, k))
                                    for k in ks})
    if "relaxed" in s.modes:
        for name, draft in s.drafts.items():
            def relaxed(k: int) -> SearchParams:  # auto: the width chosen at the first timing batch
                return s.params(name, k, "relaxed", args.timing_batch[0])[0]

            add_accuracy(name, "relaxed", {k: ranked(lambda b, p=relaxed(k): speculative_search(
                s.target, draft, b, index, p)) for k in ks})
    return accuracy


def speed_table(s: Setup) -> list[dict[str, Any]]:
    """WS, accepted steps and calls of every draft under every mode, timed at each
    ``--timing-batch`` size."""
    args = s.args
    speed: list[dict[str, Any]] = []
    timing = s.prompts[: args.timing_prompts]
    for batch_size in args.timing_batch:
        for name, draft in s.drafts.items():
            for mode in s.modes:
                for k in args.k:
                    params, choice = s.params(name, k, mode, batch_size)
                    row, _, _ = measure_speculative(s.target, draft, s.index, timing, params,
                                                    batch_size, args.repeat)
                    row["method"] = name
                    if choice is not None:
                        row["width_choice"] = choice.record()
                    speed.append(row)
                    print(f"  {name:>10} {mode:>7} B={batch_size} K={k:>2} N={params.N:>2}: "
                          f"WS {ws_text(row)}, {row['accepted_steps_per_round']:.2f} "
                          f"steps/round, {row['target_calls_per_request']:.2f} calls/req",
                          flush=True)  # at most 100 columns
    return speed


def run_evaluate(args: argparse.Namespace) -> int:
    validated(args, EvaluateFlags, EVALUATE_FIELDS)
    s = load_setup(args)
    out = s.out
    print(f"evaluate: {len(s.prompts)} test prompts, K={args.k}, drafts={list(s.drafts)}, "
          f"modes={s.modes}")
    write_table(accuracy_table(s), out, "accuracy", ["method", "mode", "k", "recall", "ndcg"])
    speed = speed_table(s)
    write_table(speed, out, "speed", SPEED_COLUMNS)
    plot(speed, out)
    print("\n" + results_screen(out), flush=True)
    return 0
