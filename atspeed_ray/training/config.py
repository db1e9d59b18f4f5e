"""The one training configuration, and the one place that turns it into a DeepSpeed config.

``TrainConfig`` is what ``train-target`` and ``align`` parse their flags into; it travels to the
Ray Train workers as a plain dict (``model_dump``). :func:`deepspeed_config` is the only code that
builds a DeepSpeed config dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from atspeed_ray.settings import DEFAULT_GAMMA, DEFAULT_MODE, LOSS_NAMES, LossName, Mode, Precision, check_choice


# the alignment objective when none is given: ``train-target`` trains next-item SFT only,
# ``align`` defaults to AtSpeed-S (strict verification)
DEFAULT_LOSS: dict[str, LossName] = {"target": "sft", "align": "atspeed-s"}
TeacherLogits = Literal["auto", "stored", "online"]
ZeroStage = Literal[0, 1, 2, 3]
NewTokenInit = Literal["mean", "noise", "pieces"]  # training/init_model.py
Samples = Literal["auto", "prefix", "sequence"]  # training/sequences.py
DraftKindName = Literal["lm", "feature"]  # what align trains (drafts/: the registry of kinds)


class TrainConfig(BaseModel):
    """Every setting of one training run, with its default and its meaning.

    The ``train-target`` and ``align`` flags are generated from these fields (name, type,
    default, choices, help = the description), so a default exists only here.
    """

    model_config = ConfigDict(extra="forbid")

    task: Literal["target", "align"] = Field(description="train the target, or align a draft with it")
    data: str = Field(description="prepared data folder")
    out: str = Field(description="folder for the final HF export (of the target or the draft)")
    preset: str = Field("tiny", description="model preset (tiny, deep, cpu, gpu) of a fresh model: "
                                            "its target size for train-target, its draft size for "
                                            "align")
    draft_size: str | None = Field(
        None, description="align: the fresh draft's size as LAYERSxHIDDEN (e.g. 2x128; heads of "
                          "32 dimensions) instead of --preset's draft size")
    init: str | None = Field(None, description="start from this HF model folder instead of a fresh one")
    init_layers: int | None = Field(
        None, ge=1, description="align: start the draft from the target's first N layers (with its "
                                "embeddings, final norm and head) instead of a fresh --preset draft")
    code_head: bool = Field(
        False, description="align: the draft gets a code head (its logits over the code tokens "
                           "only, one small matmul instead of the whole vocabulary's, when "
                           "decoding on the fast forward); recorded in its config.json")
    compact_vocab: bool = Field(
        False, description="align: the draft's embedding table holds only the code tokens, the "
                           "prompt format's tokens and one row for any other id, tied to its LM "
                           "head (a code head, so it implies --code-head; for a fresh --preset "
                           "draft or --init-layers)")
    draft_kind: DraftKindName = Field(
        "lm", description="align: the draft to train: a causal LM (lm; with --code-head or "
                          "--compact-vocab its kind is recorded as code-head / compact-vocab), or "
                          "a feature draft (feature: a head on the target's hidden states, "
                          "trained on the target's own top --teacher-k beam search, default "
                          "--val-k; --loss atspeed-s or atspeed-r; without --max-samples on "
                          "training.feature.FEATURE_MAX_SAMPLES prompts)")
    feature_layers: int = Field(1, ge=1, le=8, description="--draft-kind feature: decoder blocks")
    feature_weight: float = Field(0.1, ge=0.0, description="--draft-kind feature: weight of the "
                                                           "hidden-state regression")
    tree_cache: str | None = Field(
        None, description="--draft-kind feature: folder that keeps the target's teacher trees "
                          "(safetensors, keyed by the target's weights, the item index and the "
                          "teacher K); a later run on the same target and data loads them "
                          "instead of running the target again")
    new_token_init: NewTokenInit = Field(
        "pieces", description="--init: rows of the tokens the prepared tokenizer adds start from the "
                            "existing rows' mean, mean + noise, or the mean of the rows of the "
                            "pieces the base tokenizer cuts the token's text into")
    lora_r: int | None = Field(None, ge=1, description="LoRA rank (PEFT) on --init's model; the "
                                                        "code-token rows train too (default: full "
                                                        "fine-tuning)")
    lora_alpha: float = Field(16.0, gt=0.0, description="LoRA scale numerator (scale alpha / r)")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout")
    lora_targets: str = Field("q_proj,v_proj", description="comma-separated linear layers that "
                                                            "get LoRA adapters")
    samples: Samples = Field(
        "prefix", description="train-target samples: prefix = one per prefix of a user's sequence "
                              "(the prepared rows), sequence = one forward per user window with "
                              "the next-item loss at every item (fewer, larger steps per epoch); "
                              "auto = sequence where the prompt template allows, else prefix")
    # alignment
    target: str | None = Field(None, description="trained target model folder (align)")
    teacher: str | None = Field(None, description="teacher data folder (`atspeed-ray teacher`)")
    loss: LossName | None = Field(
        None, description="alignment objective (default: "
                          + ", ".join(f"{v} for {k}" for k, v in DEFAULT_LOSS.items()) + ")")
    alpha: float = Field(0.7, ge=0.0, le=1.0,
                         description="weight of the align term: (1-a) SFT + a align")
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature of the align losses")
    topk: int = Field(10, ge=1, description="atspeed-s: top-K codes per position")
    teacher_k: int | None = Field(None, ge=1, description="teacher sequences per sample (default all)")
    teacher_logits: TeacherLogits = Field(
        "auto", description="target distributions from the teacher files, or a frozen target "
                            "forward per step (auto: stored when the teacher files hold them)")
    # optimisation
    epochs: int = Field(3, ge=1, description="passes over the training rows")
    lr: float = Field(1e-3, gt=0.0, description="peak learning rate (linear warmup, cosine decay)")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay of the matrices")
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0, description="share of the steps spent warming up")
    grad_clip: float = Field(1.0, ge=0.0, description="gradient norm clipping (0 = off)")
    micro_batch: int = Field(32, ge=1, description="samples per worker per micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    seed: int = Field(0, description="seed of the model, the shuffling and the subsample")
    max_samples: int | None = Field(None, ge=1, description="random subset of the training rows")
    # distribution
    runner: Literal["ray", "local"] = Field(
        "ray", description="Ray Train + DeepSpeed, or in-process plain torch (the CLI's --workers 0)")
    workers: int = Field(1, ge=1, description="Ray Train workers (on the command line, 0 = "
                                              "in-process, no Ray/DeepSpeed)")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs reserved per Ray Train worker")
    use_gpu: bool = Field(False, description="one GPU per worker")
    zero_stage: ZeroStage = Field(2, description="DeepSpeed ZeRO stage")
    precision: Precision = Field("auto", description="auto: fp32 on CPU, bf16 on GPU")
    threads: int | None = Field(None, ge=1, description="torch threads per worker (default: its CPUs)")
    storage_path: str | None = Field(None, description="Ray Train storage (default OUT/ray_results)")
    name: str | None = Field(None, description="run name under the storage path (default: from --out)")
    resume: bool = Field(False, description="continue the run of that name from its last checkpoint")
    max_failures: int = Field(0, ge=-1, description="worker-failure retries (FailureConfig)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept per run")
    # validation and logging
    val_samples: int = Field(128, ge=0, description="validation prompts evaluated after each epoch")
    val_k: int = Field(10, ge=1, description="K of val_accept / val_recall")
    val_draft_beams: int = Field(20, ge=1, description="N (draft beams) of val_accept")
    val_gamma: int = Field(DEFAULT_GAMMA, ge=0, description="drafted steps per round of val_accept")
    val_mode: Mode = Field(
        DEFAULT_MODE, description="align: verification mode of val_accept; relaxed also reports "
                                  "val_recall (relaxed SD) and val_target_recall (the target's beam "
                                  "search) for the tuner's recall guard")
    log_every: int = Field(50, ge=1, description="micro-steps between progress lines")
    # testing and internal hooks: no user-facing flag (--fail-after-epoch and --save-probe exist
    # but are hidden from --help)
    placement_group_file: str | None = Field(
        None, description="internal (tune): rank 0 writes the id of the worker group's placement "
                          "group to this file, so the tuner can release it when Tune stops the "
                          "trial (Ray issue 54305: a Train V2 run stopped from Tune leaves its "
                          "placement group reserved)")
    fail_after_epoch: int | None = Field(
        None, description="testing hook: every worker raises once after reporting this epoch's "
                          "checkpoint (tests FailureConfig restarts and --resume)")
    save_probe: bool = Field(
        False, description="testing hook: save a probe batch and the trained module's logits "
                           "with the export (tests that the export is exact)")

    @field_validator("loss", mode="before")
    @classmethod
    def _known_loss(cls, value: Any) -> Any:
        """An unknown name is an error naming the loss and the choices (not a Literal dump)."""
        return check_choice(value, LOSS_NAMES, "loss") if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.loss is None:
            self.loss = DEFAULT_LOSS[self.task]
        if self.init_layers is not None:  # conflicting flags first: they name the mistake
            if self.task != "align":
                raise ValueError("--init-layers starts a draft from the target: align only")
            if self.init:
                raise ValueError("give --init or --init-layers, not both")
        if self.lora_r is not None and not (self.init or self.init_layers):
            raise ValueError("--lora-r adapts an existing model: give --init MODEL_DIR")
        if self.draft_kind == "feature":
            if self.task != "align":
                raise ValueError("--draft-kind feature is a draft: align only")
            if self.code_head or self.compact_vocab or self.init_layers or self.init:
                raise ValueError("--draft-kind feature reads the target's own rows: no --code-head, "
                                 "--compact-vocab, --init-layers or --init")
            from atspeed_ray.training.feature import FEATURE_LOSSES

            if self.loss not in FEATURE_LOSSES:
                raise ValueError(f"--draft-kind feature trains with --loss "
                                 f"{' or '.join(FEATURE_LOSSES)}, not {self.loss}")
            if self.runner == "ray" and self.zero_stage == 3:
                raise ValueError("--draft-kind feature trains with ZeRO stages 0-2 (its head is "
                                 "small; stage 3 would gather it around every call): give "
                                 "--zero-stage 2")
            if self.save_probe:
                raise ValueError("--save-probe checks a causal LM's export: not with --draft-kind "
                                 "feature")
        if self.tree_cache is not None and self.draft_kind != "feature":
            raise ValueError("--tree-cache keeps a feature draft's teacher trees: with "
                             "--draft-kind feature only")
        if self.code_head and self.task != "align":
            raise ValueError("--code-head is for drafts (align): the target's scores are over the "
                             "whole vocabulary")
        if self.draft_size is not None:
            from atspeed_ray.models import parse_size

            if self.task != "align" or self.init or self.init_layers:
                raise ValueError("--draft-size sizes a fresh draft (align, without --init or "
                                 "--init-layers)")
            parse_size(self.draft_size)
        if self.compact_vocab:
            if self.task != "align":
                raise ValueError("--compact-vocab is for drafts (align)")
            if self.init or self.lora_r is not None:
                raise ValueError("--compact-vocab builds its own table and head: not with --init "
                                 "or --lora-r")
        if self.samples == "sequence" and self.task == "align":
            raise ValueError("--samples sequence is for train-target (align trains on per-prefix "
                             "teacher rows)")
        if self.task == "align":
            if not self.target:
                raise ValueError("align needs --target (the trained target model folder)")
            if not self.teacher and self.loss != "sft" and self.draft_kind != "feature":
                raise ValueError(f"align --loss {self.loss} needs --teacher (teacher data folder)")
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

    def resolved_samples(self) -> str:
        """``auto``: whole sequences for the target, per-prefix rows for alignment."""
        if self.samples != "auto":
            return self.samples
        return "sequence" if self.task == "target" else "prefix"

    def resolved_storage(self) -> Path:
        return Path(self.storage_path or Path(self.out) / "ray_results").resolve()

    def resolved_name(self) -> str:
        return self.name or f"{self.task}-{Path(self.out).resolve().name}"


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` data-parallel workers.

    The optimizer is NOT configured here: the worker passes a ``torch.optim.AdamW`` (a config
    optimizer would become FusedAdam / DeepSpeedCPUAdam, a C++/CUDA extension compiled on first
    use), and a torch LR scheduler. ``zero_allow_untested_optimizer`` lets ZeRO wrap it.
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


class TeacherConfig(BaseModel):
    """Every setting of ``atspeed-ray teacher`` (its flags are generated from these fields)."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="prepared data folder")
    target: str = Field(description="trained target model folder")
    out: str = Field(description="output folder")
    k: int = Field(20, ge=1, description="beam width = sequences kept per sample")
    workers: int = Field(2, ge=0, description="Ray actors (0 = in-process)")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs reserved per Ray actor")
    chunk_size: int = Field(512, ge=1, description="samples per Ray task")
    batch_size: int = Field(64, ge=1, description="prompts per beam search")
    max_samples: int | None = Field(None, description="random subset of train rows")
    max_valid: int | None = Field(None, description="random subset of valid rows")
    seed: int = Field(0, description="seed of the subsets")
    with_dist: bool = Field(True, description="store the target's distributions along the sequences; "
                                              "--no-dist stores sequences and scores only (align "
                                              "then needs --teacher-logits online)")
    use_gpu: bool = Field(False, description="one GPU per Ray actor")
