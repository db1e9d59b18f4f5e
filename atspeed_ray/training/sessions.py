"""The two runners of :func:`training.loop.run`.

* :class:`LocalSession` / :func:`run_local`: in-process, plain torch (no Ray, no DeepSpeed, no
  checkpoints) for quick runs and tests; writes the HF export into ``--out`` itself.
* :class:`RaySession` / :func:`train_loop_per_worker`: what ``TorchTrainer`` runs on every
  worker. It calls ``deepspeed.initialize`` with a ``torch.optim.AdamW`` and a torch LR
  schedule, restores the latest checkpoint from Ray Train (after a worker failure or with
  ``--resume``), and per epoch saves a DeepSpeed checkpoint and reports it with the epoch's
  metrics (``ray.train.report``). The last epoch's checkpoint also holds the HF export
  (``hf/``) that the driver (``training.trainer.fit``) copies to ``--out``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from atspeed_ray.training.config import TrainConfig, deepspeed_config
from atspeed_ray.training.core import (
    DeepSpeedStepper, TorchStepper, forward_branches, lr_lambda, steps_per_epoch,
)
from atspeed_ray.training.loop import History, Log, Session, export_hf, run
from atspeed_ray.training.probe import PROBE, save_probe
from atspeed_ray.training.setup import Setup, build_setup, make_optimizer

# layout of a Ray Train checkpoint folder
STATE = "state.json"  # the History so far
HF_DIR = "hf"  # the HF export (last epoch only)
DS_TAG = "ds"  # DeepSpeed's checkpoint tag


def lr_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, n_train: int, world: int):
    """Linear warmup then cosine decay over the run's optimizer steps."""
    total = steps_per_epoch(n_train, world, cfg.micro_batch, cfg.grad_accum)
    total = total * cfg.epochs // cfg.grad_accum
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(cfg.warmup_ratio * total)))


# ---------------------------------------------------------------------------- local runner
class LocalSession(Session):
    def prepare(self, s: Setup):
        cfg = s.cfg
        self.model, self.device, self.precision = s.model, s.device, cfg.resolved_precision()
        opt = make_optimizer(s.model, cfg)
        sched = lr_schedule(opt, cfg, len(s.train), 1)
        return s.model, TorchStepper(s.model, opt, sched, cfg.grad_accum, cfg.grad_clip)

    def full_state_dict(self):
        return self.model.state_dict()

    def autocast(self):
        """bf16: torch autocast over fp32 weights (DeepSpeed does its own bf16 on Ray)."""
        if self.precision != "bf16":
            return super().autocast()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def finish_epoch(self, s, hist, metrics, final, eval_model, probe):
        if not final:
            return
        out = Path(s.cfg.out)
        export_hf(eval_model, s.prepared, out)
        (out / "training.json").write_text(json.dumps(hist.to_json()))
        if probe is not None:
            save_probe(self.model, probe, out / PROBE)


def run_local(cfg: TrainConfig, log: Log = print) -> dict[str, Any]:
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

        from atspeed_ray.training.ray_utils import library_output_to_stderr

        cfg = s.cfg
        opt = make_optimizer(s.model, cfg)
        sched = lr_schedule(opt, cfg, len(s.train), self.world)
        with library_output_to_stderr():
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

        d = Path(tempfile.mkdtemp(prefix="atspeed-ckpt-"))
        try:
            self.engine.save_checkpoint(str(d), tag=DS_TAG)
            if final and probe is not None:
                # every rank runs the forward (ZeRO-3 gathers), rank 0 writes
                with torch.no_grad():
                    if self.rank == 0:
                        save_probe(self.engine, probe, d / PROBE)
                    else:
                        forward_branches(self.engine, probe)
            if self.rank == 0:
                (d / STATE).write_text(json.dumps(hist.to_json()))
                if final:
                    export_hf(eval_model, s.prepared, d / HF_DIR)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(d)))
        finally:
            shutil.rmtree(d, ignore_errors=True)
        self.maybe_inject_failure(s.cfg, hist.epoch)

    def maybe_inject_failure(self, cfg: TrainConfig, epoch: int) -> None:
        """Testing hook ``fail_after_epoch``: raise once per rank after that epoch's checkpoint
        (a marker file under the run folder remembers it happened, so the restart goes on)."""
        if cfg.fail_after_epoch is None or epoch != cfg.fail_after_epoch:
            return
        marker = cfg.resolved_storage() / cfg.resolved_name() / f".injected_failure_rank{self.rank}"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("1")
            raise RuntimeError(f"injected failure after epoch {epoch} (testing resume)")


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
