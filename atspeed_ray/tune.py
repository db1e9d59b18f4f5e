"""``atspeed-ray tune``: Ray Tune search of the alignment weights.

Each trial runs the Ray Train alignment (``atspeed_ray.training.trainer.build_trainer``:
TorchTrainer + DeepSpeed) with one sampled configuration, inside a function trainable, and
forwards the per-epoch metrics to Tune with ``TuneReportCallback`` (Ray Train V2 refuses a
``TorchTrainer`` passed to ``Tuner`` directly: "Improper 'run'"). ASHA stops weak trials early
on the objective.

The objective is validation acceptance, not training loss:

* strict spaces: ``val_accept``, mean accepted drafted steps per round of strict speculative beam
  search on a validation subset (higher is better; it is what cuts target calls per request);
* relaxed spaces: the same measure under relaxed verification, with a recall guard: a trial whose
  relaxed-SD validation recall falls below ``recall_guard`` x the target's own recall is scored
  ``val_accept - 10 * shortfall`` so that speed never buys a worse recommender.

A search space is a YAML file (``tuning/*.yaml``)::

    name: atspeed-s            # run name
    mode: strict               # strict | relaxed: which objective
    recall_guard: 0.95         # relaxed only
    fixed: {loss: atspeed-s, epochs: 3}          # TrainConfig fields for every trial
    search:                    # TrainConfig fields to sample
      alpha: {uniform: [0.3, 0.95]}
      temperature: {loguniform: [0.001, 2.0]}
      lr: {loguniform: [0.0003, 0.003]}
      weight_decay: {choice: [0.0, 0.01, 0.1]}
    baseline: {alpha: 0.7, temperature: 1.0, lr: 0.001, weight_decay: 0.1}  # optional: trial 1

A feature draft's space (``tuning/feature.yaml``) fixes ``draft_kind: feature`` and searches its
own fields (``feature_weight``: the align term against the hidden-state regression,
``feature_layers``); it needs no ``--teacher`` (the target's own beam search is its teacher).

Outputs in ``--out``: ``best_config.json`` (with the baseline trial's objective and the gain over
it when the space has a baseline), ``trials.csv`` and ``trials.md`` (every trial), and
``best_draft/`` (the best trial's draft, HF format, ready for ``serve``/``bench``).
``--time-budget`` ends the search after that many seconds (Tune's ``time_budget_s``); trials it
cut short keep their last reported epoch, trials with no report (never started, or cut before their first epoch) are listed as ``no report``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from atspeed_ray.training.ray_utils import add_no_auth_flag

OBJECTIVE = "objective"
PG_FILE = "train_placement_group.hex"
SAMPLERS = ("uniform", "loguniform", "choice", "grid", "randint", "quniform")


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    mode: str = Field("strict", pattern="^(strict|relaxed)$")
    recall_guard: float = Field(0.95, gt=0.0, le=1.0)
    fixed: dict[str, Any] = {}
    search: dict[str, dict[str, Any]]
    # values of the searched fields run as the first trial, so the gain over them is measured in
    # the same search (for example the `align` command's defaults)
    baseline: dict[str, Any] | None = None


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--space {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    space = SearchSpace.model_validate(raw)
    for field, spec in space.search.items():
        if len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            raise ValueError(f"{path}: search.{field}: give exactly one of {', '.join(SAMPLERS)}")
    if space.baseline is not None and set(space.baseline) != set(space.search):
        raise ValueError(f"{path}: baseline: give a value for exactly the searched fields "
                         f"({', '.join(sorted(space.search))})")
    return space


def to_tune(space: SearchSpace) -> dict[str, Any]:
    """The YAML samplers as Ray Tune search-space objects."""
    from ray import tune

    out: dict[str, Any] = {}
    for field, spec in space.search.items():
        kind, arg = next(iter(spec.items()))
        out[field] = {
            "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
            "choice": tune.choice, "grid": tune.grid_search, "randint": lambda a: tune.randint(*a),
            "quniform": lambda a: tune.quniform(*a),
        }[kind](arg)
    return out


def objective(metrics: dict[str, Any], mode: str, guard: float) -> float:
    """Higher is better. Strict: val_accept. Relaxed: val_accept minus a recall shortfall penalty."""
    accept = float(metrics.get("val_accept", 0.0))
    if mode == "strict":
        return accept
    recall, base = metrics.get("val_recall"), metrics.get("val_target_recall")
    if recall is None or base is None or base <= 0:
        return accept
    shortfall = max(0.0, guard * base - recall) / base
    return accept - 10.0 * shortfall


def trial(config: dict[str, Any]) -> None:
    """One Tune trial: a Ray Train alignment run with this trial's sampled settings."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from atspeed_ray.training.config import TrainConfig
    from atspeed_ray.training.trainer import build_trainer

    base, mode, guard = config["_base"], config["_mode"], config["_guard"]
    sampled = {k: v for k, v in config.items() if not k.startswith("_")}
    trial_dir = Path(ray.tune.get_context().get_trial_dir())
    cfg = TrainConfig(**{**base, **sampled, "out": str(trial_dir / "draft"),
                         "storage_path": str(trial_dir / "train"), "name": "align",
                         "val_mode": mode, "placement_group_file": str(trial_dir / PG_FILE)})

    class Objective(TuneReportCallback):
        """Adds the objective to every report Tune sees."""

        def after_report(self, run_context, metrics, checkpoint):
            metrics = [dict(m, **{OBJECTIVE: objective(m, mode, guard)}) for m in metrics]
            super().after_report(run_context, metrics, checkpoint)

    trainer = build_trainer(cfg, callbacks=[Objective()])
    trainer.fit()


def release_placement_group(trial_dir: Path) -> bool:
    """Remove the Ray Train worker group's placement group of a finished or stopped trial.

    When Tune stops a trial (ASHA, or its last epoch) it ends the trial actor, and a Train V2 run
    inside it leaves its worker placement group reserved for the rest of the search (Ray issue
    54305): on a small machine the next trial then waits forever for a CPU. The trial's rank-0
    worker recorded the group's id; removing an already removed group is harmless.
    """
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    path = trial_dir / PG_FILE
    if not path.is_file():
        return False
    try:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(path.read_text().strip()))))
    except Exception:  # noqa: BLE001 - already gone
        return False
    return True


def _release_callback():
    from ray import tune

    class ReleasePlacementGroups(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            release_placement_group(Path(trial.local_path))

        def on_trial_error(self, iteration, trials, trial, **info):
            release_placement_group(Path(trial.local_path))

    return ReleasePlacementGroups()


def export_best(best_checkpoint_path: str, out: Path) -> None:
    """Copy the HF export of the best trial's last checkpoint into ``out``."""
    from atspeed_ray.training.sessions import HF_DIR

    src = Path(best_checkpoint_path) / HF_DIR
    if not src.is_dir():
        raise RuntimeError(f"the best trial's checkpoint {best_checkpoint_path} has no HF export")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)


def write_trials(rows: list[dict[str, Any]], out: Path) -> None:
    cols = sorted({k for r in rows for k in r}, key=lambda c: (c != "trial_id", c != OBJECTIVE, c))
    with open(out / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    (out / "trials.md").write_text("\n".join(lines) + "\n")


def run_tune(data: str, target: str, teacher: str | None, space_file: str, num_samples: int,
             out: str, resume: bool = False, max_concurrent: int | None = None,
             cpus_per_trial: float = 1.0, grace_period: int = 1, base_overrides: dict | None = None,
             time_budget_s: float | None = None, log=print) -> dict[str, Any]:
    from atspeed_ray.data.prepare import check_models
    from atspeed_ray.data.prepare import load_prepared
    from atspeed_ray.training.config import TrainConfig
    from atspeed_ray.training.ray_utils import init_ray

    space = load_space(space_file)
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    base = {"task": "align", "data": str(Path(data).resolve()), "target": str(Path(target).resolve()),
            "teacher": str(Path(teacher).resolve()) if teacher else None, "out": str(out_dir / "unused"),
            "workers": 1, **space.fixed, **(base_overrides or {})}
    if base.get("tree_cache"):  # shared by the trials: absolute (a trial runs in its own folder)
        base["tree_cache"] = str(Path(base["tree_cache"]).resolve())
    checked = TrainConfig(**base)  # fail early, naming the field, on a bad fixed section
    check_models(load_prepared(checked.data), checked.target, checked.init)
    init_ray()
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    per_trial = cpus_per_trial * checked.workers + 0.01
    concurrent = max_concurrent or max(1, int(cpus // per_trial))
    tuner = make_tuner(space, base, out_dir / "ray_results", resume, num_samples, concurrent,
                       time_budget_s, grace_period, checked.epochs)
    log(f"tune {space.name}: {num_samples} trials, {concurrent} at a time, objective "
        f"{'val_accept' if space.mode == 'strict' else 'val_accept with recall guard'}")
    results = tuner.fit()
    rows = trial_rows(results, space)
    write_trials(rows, out_dir)
    failed = [r["trial_id"] for r in rows if r["status"] == "error"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(rows)} trials did not finish ({', '.join(failed)}); "
                           f"continue the search with --resume")
    best = results.get_best_result(metric=OBJECTIVE, mode="max", scope="last")
    summary = best_summary(best, rows, space)
    (out_dir / "best_config.json").write_text(json.dumps(summary, indent=2))
    export_best(best.metrics["checkpoint_path"] if "checkpoint_path" in best.metrics
                else best.checkpoint.path, out_dir / "best_draft")
    log(f"best trial {summary['trial']}: objective {summary['objective']:.3f} with "
        f"{summary['config']}; draft exported to {out_dir / 'best_draft'}")
    return summary


def make_tuner(space: SearchSpace, base: dict[str, Any], storage: Path, resume: bool,
               num_samples: int, concurrent: int, time_budget_s: float | None, grace_period: int,
               epochs: int):
    """The Tuner of the search (restored from ``storage`` with ``resume``); ``epochs`` per trial
    is ASHA's longest run."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    trainable = tune.with_resources(trial, {"cpu": 0.01})
    if resume:
        if not tune.Tuner.can_restore(str(storage / space.name)):
            raise FileNotFoundError(f"--resume: no interrupted search at {storage / space.name}")
        return tune.Tuner.restore(str(storage / space.name), trainable=trainable,
                                  resume_unfinished=True, resume_errored=True)
    param_space = {**to_tune(space), "_base": base, "_mode": space.mode, "_guard": space.recall_guard}
    points = [dict(space.baseline)] if space.baseline else None
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE, mode="max", num_samples=num_samples,
            max_concurrent_trials=concurrent, time_budget_s=time_budget_s,
            # the searcher must carry the limit itself: Tune does not apply max_concurrent_trials
            # to a BasicVariantGenerator passed in (trials hold only 0.01 CPU, so without it
            # every trial starts and queues its Ray Train worker)
            search_alg=BasicVariantGenerator(points_to_evaluate=points, max_concurrent=concurrent),
            scheduler=ASHAScheduler(grace_period=grace_period, reduction_factor=2, max_t=epochs,
                                    time_attr="training_iteration")),
        run_config=tune.RunConfig(name=space.name, storage_path=str(storage),
                                  callbacks=[_release_callback()]))


def trial_rows(results, space: SearchSpace) -> list[dict[str, Any]]:
    """One row per trial (status, sampled config, last metrics), best objective first."""
    rows = []
    for r in results:
        status = "error" if r.error else "ok" if r.metrics and OBJECTIVE in r.metrics else "no report"
        row = {"trial_id": Path(r.path).name, "status": status}
        row.update({k: v for k, v in (r.config or {}).items() if not k.startswith("_")})
        for key in (OBJECTIVE, "val_accept", "val_target_calls", "val_recall", "loss",
                    "training_iteration"):
            if r.metrics and key in r.metrics:
                row[key] = r.metrics[key]
        row["baseline"] = bool(space.baseline) and all(
            row.get(k) == v for k, v in space.baseline.items())
        rows.append(row)
    rows.sort(key=lambda r: -r.get(OBJECTIVE, -math.inf))
    return rows


def best_summary(best, rows: list[dict[str, Any]], space: SearchSpace) -> dict[str, Any]:
    """``best_config.json``: the best trial, and its gain over the baseline trial if any."""
    best_cfg = {k: v for k, v in best.config.items() if not k.startswith("_")}
    summary = {"space": space.name, "mode": space.mode, "objective": best.metrics[OBJECTIVE],
               "val_accept": best.metrics.get("val_accept"), "config": best_cfg,
               "trial": Path(best.path).name, "trials": len(rows),
               "trials_run": sum(r["status"] == "ok" for r in rows)}
    baseline = next((r for r in rows if r["baseline"] and OBJECTIVE in r), None)
    if baseline is not None:
        summary["baseline"] = {"config": space.baseline, "objective": baseline[OBJECTIVE],
                               "epochs": baseline.get("training_iteration")}
        summary["gain_over_baseline"] = summary["objective"] - baseline[OBJECTIVE]
    return summary


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="Ray Tune search of the alignment weights")
    p.add_argument("--data", required=True, help="prepared data folder")
    p.add_argument("--target", required=True, help="trained target model folder")
    p.add_argument("--teacher", default=None,
                   help="teacher data folder (the LM drafts' spaces; a feature draft's space "
                        "(draft_kind: feature) needs none: the target is its teacher)")
    p.add_argument("--space", required=True, help="search space YAML (tuning/*.yaml)")
    p.add_argument("--num-samples", type=int, required=True, help="number of trials")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue an interrupted search")
    p.add_argument("--max-concurrent", type=int, default=None, help="default: what the CPUs fit")
    p.add_argument("--epochs", type=int, default=None, help="override the space's epochs")
    p.add_argument("--max-samples", type=int, default=None, help="training rows per trial")
    p.add_argument("--preset", default=None, help="override the space's preset")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before stopping")
    p.add_argument("--time-budget", type=float, default=None,
                   help="end the search after this many seconds (unstarted trials are skipped)")
    add_no_auth_flag(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in {"epochs": args.epochs, "max_samples": args.max_samples,
                                   "preset": args.preset}.items() if v is not None}
    try:
        run_tune(args.data, args.target, args.teacher, args.space, args.num_samples, args.out,
                 resume=args.resume, max_concurrent=args.max_concurrent,
                 grace_period=args.grace_period, base_overrides=overrides,
                 time_budget_s=args.time_budget)
    except ValueError as e:  # a space or flags that make no valid run (e.g. no --teacher for it)
        print(f"atspeed-ray tune: error: {e}", file=sys.stderr)
        return 2
    return 0
