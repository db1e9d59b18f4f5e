"""The whole pipeline as one job: prepare -> train target -> teacher data -> align drafts ->
evaluate (-> serve). ``jobs/demo.py`` runs it on the built-in synthetic data, ``jobs/reproduce.py``
on a paper-format data set. Each stage is skipped when its output already exists, so a second run
reuses the first one's work. Every stage is the same CLI command a user would type."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from atspeed_ray.settings import LossName


class StageSettings(BaseModel):
    """Flags of one training stage; None = the command's own default (the flag is not passed)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(None, ge=1)
    micro_batch: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0.0)
    max_samples: int | None = Field(None, ge=1)  # subsample the training rows
    workers: int | None = Field(None, ge=0)  # Ray Train workers (0 = in-process)
    extra: list[str] = []  # more CLI flags, passed as is


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = "synthetic"  # "synthetic" or a release folder
    out: str = "demo_out"
    preset: str = "tiny"
    target: StageSettings = StageSettings()
    align: StageSettings = StageSettings()
    teacher_k: int = 10
    teacher_samples: int | None = None  # subsample train prompts for teacher data
    teacher_workers: int | None = None  # None: the teacher command's default
    losses: list[LossName] = ["sft", "atspeed-s", "atspeed-r"]
    alpha: float | None = None  # None: the align command's default
    eval_k: list[int] = [1, 5, 10]
    eval_prompts: int | None = None
    timing_prompts: int = 30
    draft_beams: int | str | None = None  # N, or a multiple of K such as "2k"
    draft_init_layers: int | None = None  # drafts start from the target's first N layers (align --init-layers)
    gamma: int | None = None  # None: the evaluate command's default
    use_gpu: bool = False


def run_cli(argv: list[str]) -> None:
    """Run one ``atspeed-ray`` command in this process; stop the pipeline if it fails."""
    from atspeed_ray.cli import main

    print(f"\n$ atspeed-ray {shlex.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = main(argv)
    if rc:
        raise SystemExit(f"stage failed (exit {rc}): atspeed-ray {shlex.join(argv)}")
    print(f"[{argv[0]} done in {time.perf_counter() - t0:.1f} s]", flush=True)


def flags(**values: object) -> list[str]:
    """``--name value`` for each value that is set (None: leave the command's default)."""
    out: list[str] = []
    for name, value in values.items():
        if value is not None:
            out += ["--" + name.replace("_", "-"), str(value)]
    return out


def stage_flags(s: StageSettings, use_gpu: bool) -> list[str]:
    out = flags(epochs=s.epochs, micro_batch=s.micro_batch, lr=s.lr, workers=s.workers,
                max_samples=s.max_samples)
    if use_gpu:
        out += ["--use-gpu"]
    return out + list(s.extra)


def done(path: Path, marker: str) -> bool:
    if (path / marker).exists():
        print(f"\n= reusing {path} (found {marker})", flush=True)
        return True
    return False


def run_pipeline(cfg: PipelineConfig) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(cfg.model_dump_json(indent=2))
    data, target, teacher = out / "data", out / "target", out / "teacher"
    t0 = time.perf_counter()
    if not done(data, "summary.json"):
        run_cli(["prepare", "--data", cfg.data, "--out", str(data)])
    if not done(target, "config.json"):
        run_cli(["train-target", "--data", str(data), "--out", str(target), "--preset", cfg.preset]
                + stage_flags(cfg.target, cfg.use_gpu))
    if not done(teacher, "teacher.json"):
        argv = ["teacher", "--data", str(data), "--target", str(target), "--out", str(teacher)]
        argv += flags(k=cfg.teacher_k, workers=cfg.teacher_workers, max_samples=cfg.teacher_samples)
        run_cli(argv + (["--use-gpu"] if cfg.use_gpu else []))
    drafts = []
    for loss in cfg.losses:
        draft = out / "drafts" / loss
        drafts.append(draft)
        if not done(draft, "config.json"):
            run_cli(["align", "--data", str(data), "--target", str(target), "--teacher", str(teacher),
                     "--out", str(draft), "--loss", loss, "--preset", cfg.preset]
                    + flags(alpha=cfg.alpha, init_layers=cfg.draft_init_layers or None)
                    + stage_flags(cfg.align, cfg.use_gpu))
    evaluation = out / "eval"
    if not done(evaluation, "speed.json"):
        argv = ["evaluate", "--data", str(data), "--target", str(target), "--out", str(evaluation),
                "--k", ",".join(map(str, cfg.eval_k))]
        argv += flags(timing_prompts=cfg.timing_prompts, gamma=cfg.gamma,
                      num_prompts=cfg.eval_prompts, draft_beams=cfg.draft_beams)
        for d in drafts:
            argv += ["--draft", str(d)]
        run_cli(argv)
    else:
        print((evaluation / "accuracy.md").read_text())
        print((evaluation / "speed.md").read_text())
    summary = json.loads((data / "summary.json").read_text())
    print(f"\npipeline finished in {time.perf_counter() - t0:.0f} s: {summary['users']} users, "
          f"{summary['items']} items; outputs in {out}/", flush=True)
    return out


def serve_demo(out: Path, draft: str = "atspeed-s", port: int = 8000, wait: bool | None = None) -> None:
    """Start the endpoint on the pipeline's target and draft, send one example request, print it
    as a curl line. With ``wait`` (default: when stdin is a terminal) keep serving until Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    from atspeed_ray.data.prepare import load_prepared

    history = load_prepared(out / "data").histories("test", limit=1)[0]
    body = json.dumps({"history": history, "k": 5, "mode": "strict"})
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "atspeed_ray.cli", "serve", "--target", str(out / "target"),
           "--draft", str(out / "drafts" / draft), "--data", str(out / "data"), "--port", str(port)]
    print(f"\n$ atspeed-ray {shlex.join(cmd[3:])}", flush=True)
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"serve exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit("the endpoint did not come up within 240 s")
            time.sleep(2)
        reply = httpx.post(f"{url}/recommend", content=body,
                           headers={"content-type": "application/json"}, timeout=60)
        print(f"\nexample request:\n  curl -s -X POST {url}/recommend -H 'content-type: application/json' "
              f"-d '{body}'\nreply ({reply.status_code}): {reply.text}\nAPI docs: {url}/docs", flush=True)
        if wait if wait is not None else sys.stdin.isatty():
            print("serving; press Ctrl-C to stop", flush=True)
            proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
