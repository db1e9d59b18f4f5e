"""Reproduce the paper's pipeline on a paper-format data set (e.g. ../shared/data/beauty):
prepare, train the target, teacher data, align a draft with every loss, evaluate, and write the
tables and plots to --results (default results/<data set name>).

    python jobs/reproduce.py --data ../shared/data/beauty [--gpu] [--out runs/beauty]
    python jobs/reproduce.py --data ../shared/data/beauty --base-model MODEL_DIR  # an LLM target

--base-model fine-tunes that pretrained LLM folder (``atspeed-ray base-model smollm2 --out DIR``
writes one) as the target: prepare tokenizes with its tokenizer, train-target starts from it
(--init); the work and results folders default to runs/<name>-llm and results/<name>-llm.

CPU presets by default (a 2-core machine: the training rows are subsampled, see the flags);
--gpu selects the `gpu` preset, bf16 and all the data for a GPU cluster.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import sys
from pathlib import Path
from typing import get_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, under ray job submit

from atspeed_ray.pipeline import (  # noqa: E402
    SFT_THEN_ALIGN, STAGE_TIMES, TEACHER_RECIPE, DraftRecipe, PipelineConfig, StageSettings, run_pipeline,
)
from atspeed_ray.settings import LOSS_NAMES  # noqa: E402


def machine() -> str:
    """CPU model, cores, memory, GPU and library versions, for RUN.md."""
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        mem = f"{kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        mem = "RAM unknown"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {mem}, {gpu}; {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="release folder, e.g. ../shared/data/beauty")
    p.add_argument("--out", default=None, help="work folder (default runs/<name>)")
    p.add_argument("--results", default=None, help="tables and plots (default results/<name>)")
    p.add_argument("--gpu", action="store_true", help="GPU cluster presets")
    p.add_argument("--base-model", default=None,
                   help="pretrained LLM folder fine-tuned as the target (prepare --base-model, "
                        "train-target --init)")
    p.add_argument("--prompt-template", default=None, help="with --base-model: prepare's template")
    p.add_argument("--target-epochs", type=int, default=None)
    p.add_argument("--target-samples", type=int, default=None, help="training rows for the target")
    p.add_argument("--teacher-samples", type=int, default=None, help="train prompts with teacher data")
    p.add_argument("--align-epochs", type=int, default=None)
    p.add_argument("--workers", type=int, default=None,
                   help="Ray Train workers and teacher actors (0 = in-process; default 2 on CPU, 4 with --gpu)")
    p.add_argument("--eval-prompts", type=int, default=None,
                   help="test prompts for accuracy (default: all with --gpu, 1000 on CPU)")
    p.add_argument("--timing-prompts", type=int, default=30, help="test prompts timed at batch 1")
    p.add_argument("--draft-beams", default="20", help="draft width: N, or a multiple of K like 2k")
    p.add_argument("--draft-init-layers", type=int, default=None,
                   help="drafts start from the target's first N layers instead of the preset draft")
    p.add_argument("--target-lr", type=float, default=None,
                   help="peak learning rate of train-target (default 2e-3 from scratch, 3e-4 for --base-model)")
    p.add_argument("--target-micro-batch", type=int, default=None,
                   help="train-target micro-batch (default 32 from scratch, 8 windows for --base-model)")
    p.add_argument("--teacher-k", type=int, default=20, help="beam width of the teacher data")
    p.add_argument("--losses", default=",".join(LOSS_NAMES), help="comma-separated align losses")
    p.add_argument("--eval-k", default="1,3,5,10,20", help="comma-separated K of evaluate")
    p.add_argument("--draft-recipe", choices=get_args(DraftRecipe), default=None,
                   help="teacher: every draft from the same start on the teacher data; "
                        "sft-then-align: sft on the training data first, the other losses "
                        "aligned from it (default with --base-model)")
    p.add_argument("--sft-samples", type=int, default=20000,
                   help="sft-then-align: training rows of the sft draft")
    for stage in ("target", "sft", "align", "teacher", "eval"):
        p.add_argument(f"--{stage}-flags", default="",
                       help=f"more flags for the {stage} stage's command, as one quoted string")
    return p.parse_args(argv)


def run_name(args: argparse.Namespace) -> str:
    """The data set's name, ``-llm`` appended for an LLM target."""
    return Path(args.data).resolve().name + ("-llm" if args.base_model else "")


def default_workers(args: argparse.Namespace) -> int:
    """--workers, where 0 (in-process, no Ray) counts; else 4 on a GPU cluster, 2 on CPU."""
    return args.workers if args.workers is not None else (4 if args.gpu else 2)


def target_settings(args: argparse.Namespace) -> StageSettings:
    """From scratch: the preset's model at a high learning rate. A pretrained LLM (--base-model):
    a lower rate, whole-sequence windows (--samples sequence) in smaller micro-batches."""
    gpu, llm = args.gpu, bool(args.base_model)
    lr = 3e-4 if llm else (1e-3 if gpu else 2e-3)
    micro_batch = (16 if gpu else 8) if llm else (64 if gpu else 32)
    extra = (["--samples", "sequence"] if llm else []) + shlex.split(args.target_flags)
    return StageSettings(epochs=args.target_epochs or (10 if gpu else 2),
                         micro_batch=args.target_micro_batch or micro_batch, lr=args.target_lr or lr,
                         workers=default_workers(args), extra=extra,
                         max_samples=args.target_samples if args.target_samples or gpu else 48000)


def draft_recipe(args: argparse.Namespace) -> str:
    """--draft-recipe, else sft-then-align for an LLM target (a draft cut from it over-fits the
    teacher data when aligned from the cut alone), teacher from scratch."""
    return args.draft_recipe or (SFT_THEN_ALIGN if args.base_model else TEACHER_RECIPE)


def align_settings(args: argparse.Namespace, recipe: str) -> StageSettings:
    """From the sft draft: a few epochs at a low rate; from the start: the paper's long run."""
    gpu = args.gpu
    epochs, lr = (3, 3e-4) if recipe == SFT_THEN_ALIGN else ((20 if gpu else 10), 3e-3)
    return StageSettings(epochs=args.align_epochs or epochs, micro_batch=32, lr=lr,
                         workers=default_workers(args), extra=shlex.split(args.align_flags))


def pipeline_config(args: argparse.Namespace) -> PipelineConfig:
    gpu = args.gpu
    recipe = draft_recipe(args)
    return PipelineConfig(
        data=args.data, out=args.out or f"runs/{run_name(args)}", preset="gpu" if gpu else "cpu",
        base_model=args.base_model, prompt_template=args.prompt_template,
        target=target_settings(args),
        draft_recipe=recipe,
        sft=StageSettings(epochs=1, micro_batch=32, lr=1e-3, max_samples=args.sft_samples,
                          workers=default_workers(args), extra=shlex.split(args.sft_flags)),
        align=align_settings(args, recipe),
        teacher_k=args.teacher_k, teacher_samples=args.teacher_samples if args.teacher_samples or gpu else 3000,
        teacher_workers=args.workers, teacher_extra=shlex.split(args.teacher_flags),
        losses=[x.strip() for x in args.losses.split(",") if x.strip()],
        eval_k=[int(x) for x in args.eval_k.split(",") if x.strip()],
        eval_extra=shlex.split(args.eval_flags),
        eval_prompts=args.eval_prompts if args.eval_prompts or gpu else 1000,
        timing_prompts=args.timing_prompts, draft_beams=args.draft_beams,
        draft_init_layers=args.draft_init_layers,
        use_gpu=gpu,
    )


def stage_table(times: Path) -> str:
    """The stage commands this work folder ran (earlier sessions' too) and their wall times."""
    if not times.exists():
        return ""
    rows = json.loads(times.read_text())
    lines = ["Stages run (wall time; a resumed run lists every session's):", "",
             "| finished | seconds | command |", "|---|---|---|"]
    lines += [f"| {r['finished']} | {r['seconds']:.0f} | `{r['command']}` |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    name = run_name(args)
    cfg = pipeline_config(args)
    out = run_pipeline(cfg)
    results = Path(args.results or f"results/{name}")
    results.mkdir(parents=True, exist_ok=True)
    for f in sorted((out / "eval").iterdir()):
        shutil.copy2(f, results / f.name)
    (results / "RUN.md").write_text(
        f"# {name}\n\nCommand: `python jobs/reproduce.py {shlex.join(sys.argv[1:])}`\n\n"
        f"Machine: {machine()}\n\n"
        f"Pipeline settings:\n\n```json\n{cfg.model_dump_json(indent=2)}\n```\n\n"
        f"{stage_table(out / STAGE_TIMES)}")
    print(f"results in {results}/")


if __name__ == "__main__":
    main()
