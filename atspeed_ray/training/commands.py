"""``atspeed-ray teacher``, ``atspeed-ray train-target`` and ``atspeed-ray align``."""

from __future__ import annotations

import argparse
import json
import sys

from atspeed_ray.settings import LOSS_NAMES, PRECISIONS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-target", help="fine-tune the target on next-item SFT (Ray Train + DeepSpeed)")
    p.add_argument("--data", required=True, help="prepared data folder")
    p.add_argument("--out", required=True, help="folder for the final HF export")
    p.add_argument("--preset", default="tiny", help="model preset (tiny, cpu, gpu): its target size")
    _common(p)
    p.set_defaults(func=run_train_target)

    p = sub.add_parser("align", help="train a draft aligned with the target (Ray Train + DeepSpeed)")
    p.add_argument("--data", required=True, help="prepared data folder")
    p.add_argument("--target", required=True, help="trained target model folder")
    p.add_argument("--teacher", default=None, help="teacher data folder (`atspeed-ray teacher`)")
    p.add_argument("--out", required=True, help="folder for the final HF export of the draft")
    p.add_argument("--loss", default="atspeed-s", choices=LOSS_NAMES)
    p.add_argument("--preset", default="tiny", help="model preset (tiny, cpu, gpu): its draft size")
    p.add_argument("--alpha", type=float, default=0.7, help="weight of the align term: (1-a) SFT + a align")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the align losses")
    p.add_argument("--topk", type=int, default=10, help="atspeed-s: top-K codes per position")
    p.add_argument("--teacher-k", type=int, default=None, help="teacher sequences per sample (default all)")
    p.add_argument("--teacher-logits", default="auto", choices=["auto", "stored", "online"],
                   help="target distributions from the teacher files, or a frozen target forward per step")
    p.add_argument("--init-layers", type=int, default=None,
                   help="start the draft from the target's first N layers (with its embeddings, "
                        "final norm and head) instead of a fresh --preset draft")
    _common(p)
    p.set_defaults(func=run_align)

    p = sub.add_parser("teacher", help="target beam search over train/valid prompts -> teacher Parquet")
    p.add_argument("--data", required=True, help="prepared data folder")
    p.add_argument("--target", required=True, help="trained target model folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--k", type=int, default=20, help="beam width = sequences kept per sample")
    p.add_argument("--workers", type=int, default=2, help="Ray actors (0 = in-process)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--chunk-size", type=int, default=512, help="samples per Ray task")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per beam search")
    p.add_argument("--max-samples", type=int, default=None, help="random subset of train rows")
    p.add_argument("--max-valid", type=int, default=None, help="random subset of valid rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dist", action="store_true",
                   help="store sequences and scores only (align then needs --teacher-logits online)")
    p.add_argument("--use-gpu", action="store_true")
    p.set_defaults(func=run_teacher)


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--init", default=None, help="start from this HF model folder instead of a fresh one")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--warmup-ratio", type=float, default=0.05)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--micro-batch", type=int, default=32, help="samples per worker per micro-step")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-samples", type=int, default=None, help="random subset of the training rows")
    g = p.add_argument_group("distribution")
    g.add_argument("--workers", type=int, default=1, help="Ray Train workers (0 = in-process, no Ray/DeepSpeed)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0)
    g.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    g.add_argument("--use-gpu", action="store_true")
    g.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: fp32 on CPU, bf16 on GPU")
    g.add_argument("--storage-path", default=None, help="Ray Train storage (default OUT/ray_results)")
    g.add_argument("--name", default=None, help="run name under the storage path")
    g.add_argument("--resume", action="store_true", help="continue the run of that name from its last checkpoint")
    g.add_argument("--max-failures", type=int, default=0, help="worker-failure retries (FailureConfig)")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g = p.add_argument_group("validation and logging")
    g.add_argument("--val-samples", type=int, default=128)
    g.add_argument("--val-k", type=int, default=10)
    g.add_argument("--val-draft-beams", type=int, default=20)
    g.add_argument("--val-gamma", type=int, default=3)
    g.add_argument("--log-every", type=int, default=50)
    g.add_argument("--fail-after-epoch", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--save-probe", action="store_true", help=argparse.SUPPRESS)


_COMMON_KEYS = ["init", "epochs", "lr", "weight_decay", "warmup_ratio", "grad_clip", "micro_batch",
                "grad_accum", "seed", "max_samples", "cpus_per_worker", "threads", "use_gpu",
                "zero_stage", "precision", "storage_path", "name", "resume", "max_failures",
                "keep_checkpoints", "val_samples", "val_k", "val_draft_beams", "val_gamma",
                "log_every", "fail_after_epoch", "save_probe", "data", "out", "preset"]


def config_from_args(args: argparse.Namespace, task: str):
    from atspeed_ray.training.config import TrainConfig

    kw = {k: getattr(args, k) for k in _COMMON_KEYS}
    if args.workers < 0:
        raise ValueError("--workers must be >= 0")
    kw.update(runner="local" if args.workers == 0 else "ray", workers=max(args.workers, 1))
    if task == "align":
        kw.update({k: getattr(args, k) for k in ("target", "teacher", "loss", "alpha",
                                                 "temperature", "topk", "teacher_k", "teacher_logits",
                                                 "init_layers")})
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

    cfg = config_from_args(args, task)
    res = fit(cfg)
    last = res["epochs"][-1] if res["epochs"] else {}
    print(json.dumps({"out": res["out"], "epochs": res["epoch"], "steps": res["step"], **last},
                     indent=2, default=str))
    return 0


def run_train_target(args: argparse.Namespace) -> int:
    return _guard("train-target", lambda: _train(args, "target"))


def run_align(args: argparse.Namespace) -> int:
    return _guard("align", lambda: _train(args, "align"))


def run_teacher(args: argparse.Namespace) -> int:
    def go() -> int:
        from atspeed_ray.training.teacher import generate_teacher

        summary = generate_teacher(
            args.data, args.target, args.out, k=args.k, workers=args.workers,
            chunk_size=args.chunk_size, batch_size=args.batch_size, max_samples=args.max_samples,
            max_valid=args.max_valid, seed=args.seed, with_dist=not args.no_dist,
            use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker)
        print(json.dumps(summary, indent=2))
        return 0

    return _guard("teacher", go)
