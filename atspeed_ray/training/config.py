"""The one training configuration, and the one place that turns it into a DeepSpeed config.

``TrainConfig`` is what ``train-target`` and ``align`` parse their flags into; it travels to the
Ray Train workers as a plain dict (``model_dump``). :func:`deepspeed_config` is the only code that
builds a DeepSpeed config dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from atspeed_ray.settings import DEFAULT_MODE, LOSS_NAMES, LossName, Mode, Precision, check_choice


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: Literal["target", "align"]
    data: str  # prepared data folder
    out: str  # final HF export folder
    preset: str = "tiny"
    init: str | None = None  # start from this HF model folder instead of a fresh preset model
    # align: start the draft from the target's first N decoder layers (+ its embeddings, final
    # norm and head) instead of a fresh preset model; exclusive with ``init``
    init_layers: int | None = Field(None, ge=1)
    # alignment
    target: str | None = None  # HF folder of the trained target (align)
    teacher: str | None = None  # teacher data folder (align)
    loss: LossName = "sft"
    alpha: float = Field(0.7, ge=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)
    topk: int = Field(10, ge=1)  # AtSpeed-S: top-K codes per position
    teacher_k: int | None = None  # teacher sequences used per sample (default: all stored)
    teacher_logits: Literal["auto", "stored", "online"] = "auto"
    # optimisation
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    micro_batch: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    seed: int = 0
    max_samples: int | None = Field(None, ge=1)  # random subsample of the training rows
    # distribution
    runner: Literal["ray", "local"] = "ray"
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0.0)
    use_gpu: bool = False
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Precision = "auto"
    threads: int | None = Field(None, ge=1)  # torch threads per worker (default: its CPUs)
    storage_path: str | None = None  # Ray Train results + checkpoints (default: OUT/ray_results)
    name: str | None = None  # Ray Train run name (default: derived from --out)
    resume: bool = False
    max_failures: int = Field(0, ge=-1)
    keep_checkpoints: int = Field(2, ge=1)
    # validation and logging
    val_samples: int = Field(128, ge=0)
    val_k: int = Field(10, ge=1)  # K of val_accept / val_recall
    val_draft_beams: int = Field(20, ge=1)  # N of val_accept
    val_gamma: int = Field(3, ge=0)
    # align: verification mode of val_accept; "relaxed" also reports val_recall (relaxed SD) and
    # val_target_recall (the target's beam search) for the tuner's recall guard
    val_mode: Mode = DEFAULT_MODE
    log_every: int = Field(50, ge=1)
    # testing hooks
    # internal (tune): rank 0 writes the id of the worker group's placement group to this file,
    # so the tuner can release it when Tune stops the trial (Ray issue 54305: a Train V2 run
    # stopped from Tune leaves its placement group reserved)
    placement_group_file: str | None = None
    fail_after_epoch: int | None = None  # raise once after reporting this epoch's checkpoint
    save_probe: bool = False  # save a probe batch and the trained module's logits with the export

    @field_validator("loss", mode="before")
    @classmethod
    def _known_loss(cls, value: Any) -> Any:
        """An unknown name is an error naming the loss and the choices (not a Literal dump)."""
        return check_choice(value, LOSS_NAMES, "loss") if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.task == "align":
            if not self.target:
                raise ValueError("align needs --target (the trained target model folder)")
            if not self.teacher and self.loss != "sft":
                raise ValueError(f"align --loss {self.loss} needs --teacher (teacher data folder)")
        if self.init_layers is not None:
            if self.task != "align":
                raise ValueError("--init-layers starts a draft from the target: align only")
            if self.init:
                raise ValueError("give --init or --init-layers, not both")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("fp16 needs a GPU (--use-gpu)")
        if self.val_draft_beams < self.val_k:
            raise ValueError("val_draft_beams must be >= val_k")
        return self

    # ------------------------------------------------------------------ derived
    def resolved_precision(self) -> str:
        """fp32 on CPU; bf16 on a GPU that supports it (else fp16) unless set explicitly."""
        if self.precision != "auto":
            return self.precision
        if not self.use_gpu:
            return "fp32"
        import torch

        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"

    def resolved_storage(self) -> Path:
        return Path(self.storage_path or Path(self.out) / "ray_results").resolve()

    def resolved_name(self) -> str:
        return self.name or f"{self.task}-{Path(self.out).resolve().name}"


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` data-parallel workers.

    The optimizer is NOT configured here: the worker passes a ``torch.optim.AdamW`` (a config
    optimizer would become FusedAdam / DeepSpeedCPUAdam, compiled on first use; see STACK.md),
    and a torch LR scheduler. ``zero_allow_untested_optimizer`` lets ZeRO wrap it.
    """
    precision = cfg.resolved_precision()
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        # the HF export and the per-epoch evaluation copy need the full weights on rank 0
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
