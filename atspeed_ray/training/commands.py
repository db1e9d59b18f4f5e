"""``atspeed-ray teacher``, ``atspeed-ray train-target`` and ``atspeed-ray align``.

Their flags are generated from the fields of ``TrainConfig`` and ``TeacherConfig``
(``atspeed_ray.flags``): name, type, default, choices and help all come from the model.
"""

from __future__ import annotations

import argparse
import sys

from atspeed_ray.flags import options, values
from atspeed_ray.report import print_summary
from atspeed_ray.training.config import TeacherConfig, TrainConfig
from atspeed_ray.training.ray_utils import add_no_auth_flag

# the TrainConfig fields each command exposes, by help group (``workers`` is translated: the
# CLI's 0 means runner "local")
TARGET_FIELDS = ("data", "out", "preset")
ALIGN_FIELDS = ("data", "target", "teacher", "out", "loss", "preset", "draft_size", "alpha",
                "temperature", "topk", "teacher_k", "teacher_logits", "init_layers", "code_head",
                "compact_vocab", "draft_kind", "feature_layers", "feature_weight", "tree_cache")
GROUPS = {
    "training": ("init", "epochs", "lr", "weight_decay", "warmup_ratio", "grad_clip",
                 "micro_batch", "grad_accum", "seed", "max_samples"),
    "distribution": ("workers", "cpus_per_worker", "threads", "use_gpu", "zero_stage",
                     "precision", "storage_path", "name", "resume", "max_failures",
                     "keep_checkpoints"),
    "fine-tuning an LLM": ("new_token_init", "lora_r", "lora_alpha", "lora_dropout",
                           "lora_targets", "samples"),
    "validation and logging": ("val_samples", "val_k", "val_draft_beams", "val_gamma",
                               "log_every", "fail_after_epoch", "save_probe"),
}
HIDDEN = {"fail_after_epoch": {"help": argparse.SUPPRESS}, "save_probe": {"help": argparse.SUPPRESS}}
TEACHER_FIELDS = ("data", "target", "out", "k", "workers", "cpus_per_worker", "chunk_size",
                  "batch_size", "max_samples", "max_valid", "seed", "with_dist", "use_gpu")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-target", help="fine-tune the target on next-item SFT (Ray Train + DeepSpeed)")
    options(p, TrainConfig, TARGET_FIELDS)
    _common(p)
    p.set_defaults(func=run_train_target, fields=TARGET_FIELDS)

    p = sub.add_parser("align", help="train a draft aligned with the target (Ray Train + DeepSpeed)")
    options(p, TrainConfig, ALIGN_FIELDS, target={"required": True})
    _common(p)
    p.set_defaults(func=run_align, fields=ALIGN_FIELDS)

    p = sub.add_parser("teacher", help="target beam search over train/valid prompts -> teacher Parquet")
    options(p, TeacherConfig, TEACHER_FIELDS, with_dist={"flag": "--no-dist"})
    add_no_auth_flag(p)
    p.set_defaults(func=run_teacher)


def _common(p: argparse.ArgumentParser) -> None:
    for title, names in GROUPS.items():
        options(p.add_argument_group(title), TrainConfig, names, **HIDDEN)
    add_no_auth_flag(p)


def config_from_args(args: argparse.Namespace, task: str) -> TrainConfig:
    kw = values(args, args.fields + tuple(n for names in GROUPS.values() for n in names))
    if kw["workers"] < 0:
        raise ValueError("--workers must be >= 0")
    kw.update(runner="local" if kw["workers"] == 0 else "ray", workers=max(kw["workers"], 1))
    return TrainConfig(task=task, **kw)


def _guard(command: str, fn) -> int:
    """Bad input -> one clear line (the CLI's own handler covers DataError/FileNotFoundError)."""
    from atspeed_ray.data.errors import DataError

    try:
        return fn()
    except (DataError, FileNotFoundError):
        raise
    except (ValueError, FileExistsError) as e:
        print(f"atspeed-ray {command}: error: {e}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace, task: str) -> int:
    from atspeed_ray.training.trainer import fit

    res = fit(config_from_args(args, task))
    last = res["epochs"][-1] if res["epochs"] else {}
    keep = {k: v for k, v in last.items() if k not in ("epoch", "step", "optimizer_steps", "epoch_seconds")}
    print_summary(f"trained {res['out']} (history in training.json):",
                  {"epochs": res["epoch"], "steps": res["step"], "last epoch": keep})
    return 0


def run_train_target(args: argparse.Namespace) -> int:
    return _guard("train-target", lambda: _train(args, "target"))


def run_align(args: argparse.Namespace) -> int:
    return _guard("align", lambda: _train(args, "align"))


def run_teacher(args: argparse.Namespace) -> int:
    def go() -> int:
        from atspeed_ray.training.teacher import generate_teacher

        summary = generate_teacher(TeacherConfig(**values(args, TEACHER_FIELDS)))
        print_summary(f"teacher data {args.out} (teacher.json):",
                      {k: summary[k] for k in ("k", "workers", "splits", "dense_bytes_per_sample") if k in summary})
        return 0

    return _guard("teacher", go)
