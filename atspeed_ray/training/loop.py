"""The per-worker training loop, shared by the Ray Train + DeepSpeed runner and the local one.

``train_loop_per_worker(config)`` is what ``TorchTrainer`` runs on every worker: it builds the
model, calls ``deepspeed.initialize`` with a ``torch.optim.AdamW`` and a torch LR schedule,
restores the latest checkpoint from Ray Train (after a worker failure or with ``--resume``), and
per epoch: trains on this rank's shard, validates, saves a DeepSpeed checkpoint and reports it
with the epoch's metrics (``ray.train.report``). The last epoch's checkpoint also holds the HF
export (``hf/``) that the driver copies to ``--out``.

``run_local(cfg)`` runs the same loop in-process (plain torch, no Ray, no DeepSpeed,
no checkpoints) for quick runs and tests.

Metrics reported each epoch (rank 0's view; losses are averaged over ranks):

* ``loss`` (mean train loss of the epoch), ``sft`` / ``align`` parts, ``val_loss``
* ``samples_per_s`` (all workers together), ``epoch_seconds``, ``lr``, ``step`` (micro-steps per
  rank so far), ``optimizer_steps``
* align: ``val_accept`` = mean accepted drafted steps per round of strict speculative beam search
  (``speculative_beam_search(target, draft, mode="strict")``, K = ``val_k``, N =
  ``val_draft_beams``, gamma = ``val_gamma``) over the first ``val_samples`` validation prompts:
  sum of accepted steps / sum of rounds. 0 = the draft never helps; gamma = every round accepts
  all drafted steps. Higher is faster. ``val_target_calls`` = mean target forwards per request
  (plain beam search needs L).
* target: ``val_recall@K`` and ``val_ndcg@K`` of the target's beam search on the same prompts.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atspeed_ray.training.config import TrainConfig, deepspeed_config
from atspeed_ray.training.core import (
    Batch, DeepSpeedStepper, Examples, Objective, TorchStepper, collate, eval_loss,
    forward_branches, lr_lambda, steps_per_epoch, epoch_batches, train_step,
)

STATE = "state.json"
HF_DIR = "hf"
DS_TAG = "ds"
PROBE = "probe.safetensors"


# ---------------------------------------------------------------------------- setup
@dataclass
class Setup:
    cfg: TrainConfig
    prepared: Any
    train: Examples
    val: Examples
    objective: Objective
    teacher_k: int
    with_p: bool
    model: torch.nn.Module
    target: torch.nn.Module | None  # for val_accept / online distributions
    device: torch.device
    log_prefix: str
    val_target_recall: float | None = None  # cached: the target's recall on ``val``

    def batch(self, ex: Examples, idx) -> Batch:
        return collate(ex, idx, self.prepared.index, self.prepared.prompt_format.pad_id,
                       self.teacher_k, self.with_p).to(self.device)


def build_setup(cfg: TrainConfig, device: torch.device) -> Setup:
    from atspeed_ray.data.prepare import load_prepared
    from atspeed_ray.models import (
        DeviceConfig, build_llama, first_layers, get_preset, load_decoder, load_weights,
    )
    from atspeed_ray.training.teacher import load_examples, load_teacher, subsample

    prepared = load_prepared(cfg.data)
    spec = Objective(cfg.loss).spec if cfg.task == "align" else Objective("sft").spec
    teacher = load_teacher(cfg.teacher) if (cfg.task == "align" and cfg.teacher) else None
    # with teacher data, every loss (sft included) trains on the teacher's rows: same samples
    train = load_examples(prepared, "train", teacher)
    if cfg.max_samples:
        train = train.select(subsample(len(train), cfg.max_samples, cfg.seed))
    val = load_examples(prepared, "valid", teacher)
    val = val.select(np.arange(min(cfg.val_samples, len(val))))

    teacher_k = 0
    if teacher is not None and spec.on == "teacher":
        teacher_k = cfg.teacher_k or teacher.k
        if teacher_k > teacher.k:
            raise ValueError(f"--teacher-k {teacher_k} > K = {teacher.k} stored in {teacher.root}")
    mode = cfg.teacher_logits
    if mode == "auto":
        mode = "stored" if (teacher is not None and teacher.has_dist) else "online"
    with_p = spec.needs_target and mode == "stored"
    if with_p and not (teacher is not None and teacher.has_dist):
        raise ValueError(f"--teacher-logits stored: {cfg.teacher} holds no target distributions")

    V = len(prepared.tokenizer)
    pad = prepared.prompt_format.pad_id
    dev_cfg = DeviceConfig(device=str(device), dtype="float32")
    if cfg.init:
        model = load_weights(cfg.init, dev_cfg)
    elif cfg.init_layers:
        model = first_layers(load_weights(cfg.target, dev_cfg), cfg.init_layers)
    else:
        preset = get_preset(cfg.preset)
        size = preset.target if cfg.task == "target" else preset.draft
        model = build_llama(size, V, pad_token_id=pad, seed=cfg.seed).to(device)
    if model.get_input_embeddings().weight.shape[0] < V:
        raise ValueError(f"model vocabulary {model.get_input_embeddings().weight.shape[0]} < "
                         f"tokenizer size {V} of {cfg.data}")
    model.train()
    target = None
    if cfg.task == "align":
        target = load_decoder(cfg.target, dev_cfg)  # frozen: FastLlama where it applies
        target.requires_grad_(False)
    objective = Objective(
        name=spec.name, alpha=cfg.alpha, temperature=cfg.temperature, topk=cfg.topk,
        teacher_k=teacher_k, target=target if (spec.needs_target and not with_p) else None,
        index=prepared.index.to(device))
    prefix = f"[{cfg.task}{' ' + spec.name if cfg.task == 'align' else ''}]"
    return Setup(cfg, prepared, train, val, objective, teacher_k, with_p, model, target, device,
                 prefix)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms), nanoGPT style."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def validate_model(s: Setup, model: torch.nn.Module) -> dict[str, float]:
    """Cheap per-epoch decoding metrics on ``s.val`` with a full (unsharded) copy of the model."""
    cfg, prepared = s.cfg, s.prepared
    if len(s.val) == 0:
        return {}
    model.eval()
    prompts, index = s.val.prompts, prepared.index
    if cfg.task == "align":
        from atspeed_ray.decoding import speculative_beam_search

        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
        res = speculative_beam_search(s.target, model, prompts, index, cfg.val_k,
                                      draft_beams=cfg.val_draft_beams, gamma=cfg.val_gamma,
                                      mode=cfg.val_mode, generator=gen)
        acc, rounds = sum(res.stats["accepted_steps"]), sum(res.stats["rounds"])
        out = {"val_accept": acc / max(rounds, 1),
               "val_target_calls": float(np.mean(res.stats["target_calls"]))}
        if cfg.val_mode == "relaxed":
            out["val_recall"] = val_recall(s, res.items)
            if s.val_target_recall is None:
                s.val_target_recall = val_recall(s, beam_search_items(s.target, s, cfg.val_k))
            out["val_target_recall"] = s.val_target_recall
        return out
    from atspeed_ray.metrics import evaluate_rankings

    items = beam_search_items(model, s, cfg.val_k)
    m = evaluate_rankings(items, val_targets(s), ks=(cfg.val_k,))
    return {f"val_{k}": v for k, v in m.items()}


def val_targets(s: Setup) -> list[list[int]]:
    index = s.prepared.index
    targets = [index.canonical(t).tolist() for t in s.prepared.targets("valid")]
    return [targets[r] for r in s.val.rows.tolist()]


def beam_search_items(model: torch.nn.Module, s: Setup, k: int) -> list[list[int]]:
    from atspeed_ray.decoding import beam_search

    prompts, items = s.val.prompts, []
    for i in range(0, len(prompts), 64):
        items += beam_search(model, prompts[i:i + 64], s.prepared.index, k).items
    return items


def val_recall(s: Setup, items: list[list[int]]) -> float:
    from atspeed_ray.metrics import recall_at_k

    return recall_at_k(items, val_targets(s), s.cfg.val_k)


def load_full_state(eval_model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    missing, unexpected = eval_model.load_state_dict(state_dict, strict=False)
    tied = {"lm_head.weight"} if getattr(eval_model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")


def export_hf(model: torch.nn.Module, tokenizer, out: Path) -> None:
    from atspeed_ray.models import save_model

    save_model(model, tokenizer, out)


def save_probe(model: torch.nn.Module, batch: Batch, path: Path) -> None:
    """The probe batch and the trained module's logits on it (checks the export)."""
    from safetensors.torch import save_file

    with torch.no_grad():
        logits = forward_branches(model, batch).float().cpu()
    tensors = {k: getattr(batch, k).cpu().contiguous() for k in
               ("input_ids", "position_ids", "query", "qmap", "codes", "branch_valid", "nodes")}
    tensors["visible"] = batch.visible.to(torch.uint8).cpu().contiguous()
    tensors["logits"] = logits.contiguous()
    save_file(tensors, str(path))


def load_probe(path: Path) -> tuple[Batch, torch.Tensor]:
    from safetensors.torch import load_file

    t = load_file(str(path))
    batch = Batch(t["input_ids"], t["position_ids"], t["visible"].bool(), t["query"], t["qmap"],
                  t["codes"], t["branch_valid"], t["nodes"])
    return batch, t["logits"]


# ---------------------------------------------------------------------------- runners
@dataclass
class History:
    epoch: int = 0  # epochs completed
    step: int = 0  # micro-steps per rank completed
    epochs: list[dict[str, Any]] = field(default_factory=list)
    steps: list[list[float]] = field(default_factory=list)  # [step, loss] on rank 0

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "epochs": self.epochs, "steps": self.steps}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "History":
        return cls(int(d["epoch"]), int(d["step"]), list(d["epochs"]), list(d["steps"]))


class Session:
    """What differs between runners: distribution, stepping, checkpoints, reporting."""

    rank: int = 0
    world: int = 1

    def prepare(self, s: Setup) -> tuple[torch.nn.Module, Any]:
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        raise NotImplementedError

    def mean(self, value: float) -> float:
        return value

    def broadcast(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    def restore(self) -> History | None:
        return None

    def finish_epoch(self, s: Setup, hist: History, metrics: dict[str, Any], final: bool,
                     eval_model: torch.nn.Module, probe: Batch | None) -> None:
        raise NotImplementedError


def run(s: Setup, session: Session, log=print) -> History:
    """The training loop (every rank runs it)."""
    cfg = s.cfg
    rank, world = session.rank, session.world
    eval_model = copy.deepcopy(s.model).eval() if rank == 0 else None  # before any sharding
    fwd, stepper = session.prepare(s)
    hist = session.restore() or History()
    per_epoch = steps_per_epoch(len(s.train), world, cfg.micro_batch, cfg.grad_accum)
    lengths = np.array([len(x) for x in s.train.prompts])
    val_batches = [s.batch(s.val, np.arange(i, min(i + cfg.micro_batch, len(s.val))))
                   for i in range(0, len(s.val), cfg.micro_batch)]
    probe = val_batches[0] if (cfg.save_probe and val_batches) else None
    if rank == 0:
        start = f", resuming after epoch {hist.epoch}" if hist.epoch else ""
        log(f"{s.log_prefix} {len(s.train)} train samples, {len(s.val)} val, {world} worker(s), "
            f"{per_epoch} micro-steps of {cfg.micro_batch} per worker per epoch{start}")
    for epoch in range(hist.epoch, cfg.epochs):
        fwd.train()
        batches = epoch_batches(len(s.train), epoch, cfg.seed, rank, world, cfg.micro_batch,
                                cfg.grad_accum, lengths)
        t0 = last = time.time()
        sums: dict[str, float] = {}
        for i, idx in enumerate(batches):
            parts = train_step(fwd, s.batch(s.train, idx), s.objective, stepper)
            hist.step += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            if rank == 0:
                hist.steps.append([hist.step, round(parts["loss"], 5)])
                now = time.time()
                if (i + 1) % cfg.log_every == 0 or i + 1 == len(batches) or now - last > 30:
                    sps = (i + 1) * cfg.micro_batch * world / max(now - t0, 1e-9)
                    extra = " ".join(f"{k} {v:.4f}" for k, v in parts.items() if k != "loss")
                    log(f"{s.log_prefix} epoch {epoch + 1}/{cfg.epochs} step {i + 1}/{len(batches)}"
                        f" loss {parts['loss']:.4f} ({extra}) lr {stepper.lr():.2e}"
                        f" {sps:.1f} samples/s")
                    last = now
        secs = time.time() - t0
        fwd.eval()
        metrics: dict[str, Any] = {k: session.mean(v / len(batches)) for k, v in sums.items()}
        metrics["val_loss"] = session.mean(eval_loss(fwd, val_batches, s.objective)) if val_batches else float("nan")
        state = session.full_state_dict()  # collective under ZeRO-3: every rank calls it
        if rank == 0:
            load_full_state(eval_model, state)
            metrics.update(validate_model(s, eval_model))
        metrics = session.broadcast(metrics)
        hist.epoch = epoch + 1
        metrics.update(epoch=hist.epoch, step=hist.step,
                       optimizer_steps=hist.step // cfg.grad_accum,
                       samples_per_s=len(batches) * cfg.micro_batch * world / max(secs, 1e-9),
                       epoch_seconds=secs, lr=stepper.lr())
        hist.epochs.append(dict(metrics))
        if rank == 0:
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                             if isinstance(v, float) and k not in ("lr",))
            log(f"{s.log_prefix} epoch {hist.epoch}/{cfg.epochs} done: {shown}")
        session.finish_epoch(s, hist, metrics, hist.epoch == cfg.epochs, eval_model, probe)
    return hist


# ---------------------------------------------------------------------------- local runner
class LocalSession(Session):
    def prepare(self, s: Setup):
        cfg = s.cfg
        self.model = s.model
        opt = make_optimizer(s.model, cfg)
        total = steps_per_epoch(len(s.train), 1, cfg.micro_batch, cfg.grad_accum) * cfg.epochs
        total //= cfg.grad_accum
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(cfg.warmup_ratio * total)))
        return s.model, TorchStepper(s.model, opt, sched, cfg.grad_accum, cfg.grad_clip)

    def full_state_dict(self):
        return self.model.state_dict()

    def finish_epoch(self, s, hist, metrics, final, eval_model, probe):
        if not final:
            return
        out = Path(s.cfg.out)
        export_hf(eval_model, s.prepared.tokenizer, out)
        (out / "training.json").write_text(json.dumps(hist.to_json()))
        if probe is not None:
            save_probe(self.model, probe, out / PROBE)


def run_local(cfg: TrainConfig, log=print) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    s = build_setup(cfg, device)
    hist = run(s, LocalSession(), log)
    return {"out": str(Path(cfg.out).resolve()), **hist.to_json()}


# ---------------------------------------------------------------------------- Ray Train worker
def safe_checkpoint_loading(engine) -> None:
    """Make DeepSpeed read its checkpoint files with ``torch.load(weights_only=True)``.

    DeepSpeed writes them with ``torch.save`` and reads them back with ``weights_only=False``
    (arbitrary unpickling). We replace the engine's reader; the few non-tensor types DeepSpeed
    stores are allowed explicitly.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.utils.tensor_fragment import fragment_address

    safe = [LossScaler, DynamicLossScaler, fragment_address]
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        safe.append(ZeroStageEnum)
    except ImportError:  # pragma: no cover
        pass
    ce = engine.checkpoint_engine

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location=map_location, weights_only=True)

    ce.load = load


class RaySession(Session):
    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def prepare(self, s: Setup):
        import deepspeed

        cfg = s.cfg
        opt = make_optimizer(s.model, cfg)
        total = steps_per_epoch(len(s.train), self.world, cfg.micro_batch, cfg.grad_accum)
        total = total * cfg.epochs // cfg.grad_accum
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(cfg.warmup_ratio * total)))
        engine, _, _, _ = deepspeed.initialize(model=s.model, optimizer=opt, lr_scheduler=sched,
                                               config=deepspeed_config(cfg, self.world))
        safe_checkpoint_loading(engine)
        self.engine, self.stage, self.device = engine, cfg.zero_stage, s.device
        return engine, DeepSpeedStepper(engine)

    def full_state_dict(self):
        if self.stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.engine.module.state_dict() if self.rank == 0 else None

    def mean(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)  # nccl: on the GPU
        dist.all_reduce(t)
        return float(t) / self.world

    def broadcast(self, metrics):
        import torch.distributed as dist

        # JSON bytes in a tensor: rank 0 holds the validation metrics
        data = json.dumps(metrics).encode() if self.rank == 0 else b""
        size = torch.tensor([len(data)], dtype=torch.long, device=self.device)
        dist.broadcast(size, src=0)
        buf = torch.zeros(int(size), dtype=torch.uint8, device=self.device)
        if self.rank == 0:
            buf[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        dist.broadcast(buf, src=0)
        return json.loads(bytes(buf.cpu().tolist()).decode())

    def restore(self) -> History | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            path, _ = self.engine.load_checkpoint(d, tag=DS_TAG)
            if path is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint in {d}")
            hist = History.from_json(json.loads((Path(d) / STATE).read_text()))
        return hist

    def finish_epoch(self, s, hist, metrics, final, eval_model, probe):
        import ray.train
        from ray.train import Checkpoint

        cfg = s.cfg
        d = Path(tempfile.mkdtemp(prefix="atspeed-ckpt-"))
        try:
            self.engine.save_checkpoint(str(d), tag=DS_TAG)
            if final and probe is not None:
                logits_path = d / PROBE
                # every rank runs the forward (ZeRO-3 gathers), rank 0 writes
                with torch.no_grad():
                    if self.rank == 0:
                        save_probe(self.engine, probe, logits_path)
                    else:
                        forward_branches(self.engine, probe)
            if self.rank == 0:
                (d / STATE).write_text(json.dumps(hist.to_json()))
                if final:
                    export_hf(eval_model, s.prepared.tokenizer, d / HF_DIR)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(d)))
        finally:
            shutil.rmtree(d, ignore_errors=True)
        if cfg.fail_after_epoch is not None and hist.epoch == cfg.fail_after_epoch:
            marker = cfg.resolved_storage() / cfg.resolved_name() / f".injected_failure_rank{self.rank}"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text("1")
                raise RuntimeError(f"injected failure after epoch {hist.epoch} (testing resume)")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (one call per worker)."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    hf_logging.disable_progress_bar()
    cfg = TrainConfig(**config)
    threads = cfg.threads or max(1, int(cfg.cpus_per_worker))
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    if cfg.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    if cfg.placement_group_file:
        record_placement_group(Path(cfg.placement_group_file))
    s = build_setup(cfg, device)
    run(s, RaySession(), log=lambda m: print(m, flush=True))


def record_placement_group(path: Path) -> None:
    """Rank 0: write the id of the placement group this worker runs in (hex) to ``path``."""
    import ray.train
    from ray.util import get_current_placement_group

    pg = get_current_placement_group()
    if pg is not None and ray.train.get_context().get_world_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pg.id.hex())


# ---------------------------------------------------------------------------- driver
def run_name(storage: Path, base: str, resume: bool) -> str:
    """The Ray Train run to use under ``storage``.

    A fresh run takes ``base``, or ``base-YYYYmmdd-HHMMSS`` when an earlier run holds that name
    (earlier runs are never overwritten). ``resume`` picks the most recent of those runs.
    """
    import re

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
         "init": cfg.init, "storage_path": str(storage)}.items() if v is not None} | {"name": name})
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


def fit(cfg: TrainConfig, log=print) -> dict[str, Any]:
    """Train with ``cfg.runner`` and write the HF export (+ training.json) into ``cfg.out``."""
    out = Path(cfg.out).resolve()
    for path, what in ((cfg.data, "--data"), (cfg.target, "--target"), (cfg.teacher, "--teacher"),
                       (cfg.init, "--init")):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{what} {path}: no such folder")
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
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        if not (d / HF_DIR).is_dir():
            raise RuntimeError(f"the last checkpoint {d} holds no HF export")
        out.mkdir(parents=True, exist_ok=True)
        for f in (d / HF_DIR).iterdir():
            shutil.copy2(f, out / f.name)
        hist = json.loads((d / STATE).read_text())
        if (d / PROBE).is_file():
            shutil.copy2(d / PROBE, out / PROBE)
    (out / "training.json").write_text(json.dumps(hist))
    log(f"exported {out} ({time.time() - t0:.0f} s; checkpoints under {run_dir})")
    return {"out": str(out), "run_dir": str(run_dir), "checkpoint": result.checkpoint.path, **hist}
