"""The per-worker training loop, shared by the Ray Train + DeepSpeed runner and the local one.

:func:`run` is what every rank executes: per epoch it trains on this rank's shard, averages the
losses over ranks, validates on rank 0 with a full copy of the model, and hands the epoch to its
:class:`Session` (``training.sessions``), which owns what differs between runners: distribution,
stepping, checkpoints and reporting.

Metrics of each epoch (rank 0's view; losses are averaged over ranks):

* ``loss`` (mean train loss of the epoch), ``sft`` / ``align`` parts, ``val_loss``
* ``samples_per_s`` (training samples = target items, all workers together), ``epoch_seconds``, ``lr``, ``step`` (micro-steps per
  rank so far), ``optimizer_steps``
* the decoding metrics of ``training.validation`` (``val_accept`` for align, recall and NDCG
  for the target)
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
import torch

from atspeed_ray.training.core import (
    Batch, Stepper, epoch_batches, eval_loss, steps_per_epoch, train_step,
)
from atspeed_ray.training.setup import Setup
from atspeed_ray.training.validation import validate_model

Log = Callable[[str], None]


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

    def prepare(self, s: Setup) -> tuple[torch.nn.Module, Stepper]:
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        raise NotImplementedError

    def mean(self, value: float) -> float:
        return value

    def broadcast(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    def restore(self) -> History | None:
        return None

    def autocast(self) -> ContextManager:
        """The context of a training step's forward and backward (mixed precision, if any)."""
        return contextlib.nullcontext()

    def finish_epoch(self, s: Setup, hist: History, metrics: dict[str, Any], final: bool,
                     eval_model: torch.nn.Module, probe: Batch | None) -> None:
        raise NotImplementedError


def load_full_state(eval_model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    missing, unexpected = eval_model.load_state_dict(state_dict, strict=False)
    tied = getattr(eval_model.config, "tie_word_embeddings", False)
    if [k for k in missing if not (tied and k.endswith("lm_head.weight"))] or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")


def export_hf(model: torch.nn.Module, prepared, out: Path) -> None:
    """A plain HF checkpoint (LoRA adapters merged into a copy) with the tokenizer, or a feature
    draft's own folder (``FeatureDraft.save``), and the item index and prompt format serving
    needs (``index.json``, ``catalog.json``)."""
    from atspeed_ray.models import save_model
    from atspeed_ray.data.catalog import export_catalog
    from atspeed_ray.drafts.feature import FeatureDraft
    from atspeed_ray.training.lora import plain_model

    if isinstance(model, FeatureDraft):
        model.save(out)
    else:
        save_model(plain_model(model), prepared.tokenizer, out)
    export_catalog(prepared, out)


@dataclass
class Epoch:
    """What one rank's pass over its shard of an epoch hands to the epoch's end."""

    sums: dict[str, float]  # summed loss parts over the epoch's micro-steps
    steps: int  # micro-steps of this rank
    items: int  # training samples (target items) of this rank
    seconds: float


def run(s: Setup, session: Session, log: Log = print) -> History:
    """The training loop (every rank runs it)."""
    cfg = s.cfg
    rank, world = session.rank, session.world
    eval_model = copy.deepcopy(s.model).eval() if rank == 0 else None  # before any sharding
    fwd, stepper = session.prepare(s)
    hist = session.restore() or History()
    per_epoch = steps_per_epoch(len(s.train), world, cfg.micro_batch, cfg.grad_accum)
    lengths = s.train.lengths()
    val_batches = [s.batch(s.val, np.arange(i, min(i + cfg.micro_batch, len(s.val))))
                   for i in range(0, len(s.val), cfg.micro_batch)]
    probe = val_batches[0] if (cfg.save_probe and val_batches) else None
    if rank == 0:
        start = f", resuming after epoch {hist.epoch}" if hist.epoch else ""
        log(f"{s.log_prefix} {len(s.train)} train samples, {len(s.val)} val, {world} worker(s), "
            f"{per_epoch} micro-steps of {cfg.micro_batch} per worker per epoch{start}")
    for epoch in range(hist.epoch, cfg.epochs):
        fwd.train()
        ep = train_epoch(s, session, fwd, stepper, hist, epoch, lengths, log)
        fwd.eval()
        metrics = end_epoch(s, session, fwd, stepper, hist, ep, val_batches, eval_model)
        if rank == 0:
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                             if isinstance(v, float) and k not in ("lr",))
            log(f"{s.log_prefix} epoch {hist.epoch}/{cfg.epochs} done: {shown}")
        session.finish_epoch(s, hist, metrics, hist.epoch == cfg.epochs, eval_model, probe)
    return hist


def train_epoch(s: Setup, session: Session, fwd: torch.nn.Module, stepper: Stepper,
                hist: History, epoch: int, lengths: np.ndarray, log: Log) -> Epoch:
    """This rank's micro-steps of ``epoch`` (rank 0 records and logs the step losses)."""
    cfg, rank, world = s.cfg, session.rank, session.world
    batches = epoch_batches(len(s.train), epoch, cfg.seed, rank, world, cfg.micro_batch,
                            cfg.grad_accum, lengths)
    t0 = last = time.time()
    sums: dict[str, float] = {}
    items = 0  # training samples (target items) of this rank: a whole-sequence batch holds many
    for i, idx in enumerate(batches):
        batch = s.batch(s.train, idx)
        with session.autocast():
            parts = train_step(fwd, batch, s.objective, stepper)
        items += batch.size
        hist.step += 1
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        if rank == 0:
            hist.steps.append([hist.step, round(parts["loss"], 5)])
            now = time.time()
            if (i + 1) % cfg.log_every == 0 or i + 1 == len(batches) or now - last > 30:
                sps = items * world / max(now - t0, 1e-9)
                extra = " ".join(f"{k} {v:.4f}" for k, v in parts.items() if k != "loss")
                log(f"{s.log_prefix} epoch {epoch + 1}/{cfg.epochs} step {i + 1}/{len(batches)}"
                    f" loss {parts['loss']:.4f} ({extra}) lr {stepper.lr():.2e}"
                    f" {sps:.1f} samples/s")
                last = now
    return Epoch(sums, len(batches), items, time.time() - t0)


def end_epoch(s: Setup, session: Session, fwd: torch.nn.Module, stepper: Stepper, hist: History,
              ep: Epoch, val_batches: list[Batch], eval_model: torch.nn.Module | None
              ) -> dict[str, Any]:
    """The epoch's metrics on every rank (rank 0 validates); appends them to ``hist``."""
    cfg, world = s.cfg, session.world
    metrics: dict[str, Any] = {k: session.mean(v / ep.steps) for k, v in ep.sums.items()}
    metrics["val_loss"] = (session.mean(eval_loss(fwd, val_batches, s.objective)) if val_batches
                           else float("nan"))
    state = session.full_state_dict()  # collective under ZeRO-3: every rank calls it
    if session.rank == 0:
        load_full_state(eval_model, state)
        metrics.update(validate_model(s, eval_model))
    metrics = session.broadcast(metrics)
    hist.epoch += 1
    metrics.update(epoch=hist.epoch, step=hist.step, optimizer_steps=hist.step // cfg.grad_accum,
                   samples_per_s=session.mean(ep.items) * world / max(ep.seconds, 1e-9),
                   epoch_seconds=ep.seconds, lr=stepper.lr())
    hist.epochs.append(dict(metrics))
    return metrics
