"""The driver side of a training run: :func:`fit` (what ``train-target`` and ``align`` call),
the ``TorchTrainer`` it runs (:func:`build_trainer`, shared with ``tune``) and the run's name
under the storage path (:func:`run_name`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from atspeed_ray.training.config import TrainConfig
from atspeed_ray.training.loop import Log
from atspeed_ray.training.probe import PROBE
from atspeed_ray.training.sessions import HF_DIR, STATE, run_local, train_loop_per_worker


def run_name(storage: Path, base: str, resume: bool) -> str:
    """The Ray Train run to use under ``storage``.

    A fresh run takes ``base``, or ``base-YYYYmmdd-HHMMSS`` when an earlier run holds that name
    (earlier runs are never overwritten). ``resume`` picks the most recent of those runs.
    """
    pattern = re.compile(re.escape(base) + r"(-\d{8}-\d{6})?")
    runs = sorted((p for p in storage.glob(base + "*") if p.is_dir() and pattern.fullmatch(p.name)),
                  key=lambda p: p.stat().st_mtime) if storage.is_dir() else []
    if resume:
        if not runs:
            raise FileNotFoundError(f"--resume: no earlier run named {base!r} under {storage}")
        return runs[-1].name
    if not (storage / base).exists():
        return base
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_trainer(cfg: TrainConfig, callbacks: list | None = None):
    """The ``TorchTrainer`` of one training run (``fit`` runs it; ``tune`` runs one per trial,
    with ``TuneReportCallback`` in ``callbacks``). Ray must be initialised."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = cfg.resolved_storage()
    name = cfg.resolved_name()
    env = {"DS_ACCELERATOR": "cuda" if cfg.use_gpu else "cpu", "PYTHONUNBUFFERED": "1",
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # else every progress line shows twice
    for var in ("TORCH_EXTENSIONS_DIR",):
        if os.environ.get(var):
            env[var] = os.environ[var]
    # absolute paths: workers may start elsewhere
    config = cfg.model_copy(update={
        k: str(Path(v).resolve()) for k, v in
        {"data": cfg.data, "out": cfg.out, "target": cfg.target, "teacher": cfg.teacher,
         "init": cfg.init, "tree_cache": cfg.tree_cache, "storage_path": str(storage)}.items()
        if v is not None} | {"name": name})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config.model_dump(),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": env}, callbacks=callbacks or []),
    )


def check_inputs(cfg: TrainConfig) -> None:
    """A clear error for an input folder that does not exist or a model that does not fit the
    prepared folder (before Ray starts)."""
    for path, what in ((cfg.data, "--data"), (cfg.target, "--target"), (cfg.teacher, "--teacher"),
                       (cfg.init, "--init")):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{what} {path}: no such folder")
    from atspeed_ray.data.prepare import check_models
    from atspeed_ray.data.prepare import load_prepared

    # the models must fit the prepared folder's tokenizer (its base model, or trained on it)
    check_models(load_prepared(cfg.data), cfg.init, cfg.target if cfg.task == "align" else None)


def fit(cfg: TrainConfig, log: Log = print) -> dict[str, Any]:
    """Train with ``cfg.runner`` and write the HF export (+ training.json) into ``cfg.out``."""
    check_inputs(cfg)
    if cfg.runner == "local":
        return run_local(cfg, log)

    from atspeed_ray.training.ray_utils import init_ray

    storage = cfg.resolved_storage()
    name = run_name(storage, cfg.resolved_name(), cfg.resume)
    run_dir = storage / name
    init_ray()
    trainer = build_trainer(cfg.model_copy(update={"name": name}))
    t0 = time.time()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (see {run_dir})")
    out = Path(cfg.out).resolve()
    with result.checkpoint.as_directory() as d:
        hist = copy_export(Path(d), out)
    (out / "training.json").write_text(json.dumps(hist))
    log(f"exported {out} ({time.time() - t0:.0f} s; checkpoints under {run_dir})")
    return {"out": str(out), "run_dir": str(run_dir), "checkpoint": result.checkpoint.path, **hist}


def copy_export(ckpt: Path, out: Path) -> dict[str, Any]:
    """Copy the HF export (and the probe, if any) of the last checkpoint ``ckpt`` into ``out``;
    return the run's history stored with it."""
    if not (ckpt / HF_DIR).is_dir():
        raise RuntimeError(f"the last checkpoint {ckpt} holds no HF export")
    out.mkdir(parents=True, exist_ok=True)
    for f in (ckpt / HF_DIR).iterdir():
        shutil.copy2(f, out / f.name)
    if (ckpt / PROBE).is_file():
        shutil.copy2(ckpt / PROBE, out / PROBE)
    return json.loads((ckpt / STATE).read_text())
