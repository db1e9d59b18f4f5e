"""What one training run works on: data, objective, the model to train, the frozen target.

:func:`build_setup` turns a :class:`TrainConfig` into a :class:`Setup` on one device (every
runner and every Ray Train worker calls it); :func:`build_model` is the one place that
constructs the model being trained; :func:`make_optimizer` its optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from atspeed_ray.training.config import TrainConfig
from atspeed_ray.training.core import Batch, Examples, Loss, Objective, collate
from atspeed_ray.training.sequences import SequenceBatch, Sequences, collate_sequences

if TYPE_CHECKING:
    from atspeed_ray.training.feature import TargetTree, TreeTeacher


@dataclass
class Setup:
    cfg: TrainConfig
    prepared: Any
    train: Examples | Sequences  # per-prefix rows, or whole-sequence windows (train-target)
    val: Examples
    objective: Loss  # an ``Objective``, or a feature draft's ``FeatureObjective``
    teacher_k: int
    with_p: bool
    model: torch.nn.Module
    target: torch.nn.Module | None  # for val_accept / online distributions / a feature draft's trees
    device: torch.device
    log_prefix: str
    val_target_recall: float | None = None  # cached: the target's recall on ``val``
    trees: TreeTeacher | None = None  # a feature draft: its batches are the target's trees

    def batch(self, ex: Examples | Sequences, idx) -> Batch | SequenceBatch | TargetTree:
        if self.trees is not None:
            assert isinstance(ex, Examples)
            return self.trees.batch([ex.prompts[i] for i in idx]).to(self.device)
        if isinstance(ex, Sequences):
            return collate_sequences(ex, idx, self.prepared.prompt_format.pad_id).to(self.device)
        return collate(ex, idx, self.prepared.index, self.prepared.prompt_format.pad_id,
                       self.teacher_k, self.with_p).to(self.device)


def build_model(cfg: TrainConfig, prepared, device: torch.device,
                target: torch.nn.Module | None = None) -> torch.nn.Module:
    """The model to train, in train mode on ``device``: loaded from ``cfg.init``, the target's
    first ``cfg.init_layers`` layers (align), or a fresh ``cfg.preset`` model (its target size
    for ``train-target``, its draft size for ``align``) over the prepared tokenizer; with
    ``cfg.code_head`` the draft's config records its code head (``models.set_code_head``), with
    ``cfg.compact_vocab`` its table is cut to ``models.compact_vocab_ids`` and tied to its head.
    A feature draft (``cfg.draft_kind``) is a fresh head over the frozen ``target``."""
    from atspeed_ray.models import DeviceConfig, first_layers, load_weights, set_code_head
    from atspeed_ray.training.init_model import adapt_model

    if cfg.draft_kind == "feature":
        from atspeed_ray.training.feature import fresh_feature_draft

        if target is None:
            raise ValueError("a feature draft is built over its target: pass the frozen target")
        return fresh_feature_draft(target, prepared.index, cfg.feature_layers).to(device).train()
    vocab = len(prepared.tokenizer)
    if cfg.task == "align":  # the target's vocabulary (an LLM may pad it past the tokenizer)
        vocab = max(vocab, vocab_rows(cfg.target))
    dev_cfg = DeviceConfig(device=str(device), dtype="float32")
    if cfg.init:
        model = adapt_model(load_weights(cfg.init, dev_cfg), cfg, prepared)
    elif cfg.init_layers:
        model = adapt_model(first_layers(load_weights(cfg.target, dev_cfg), cfg.init_layers),
                            cfg, prepared)
    else:
        model = fresh_model(cfg, prepared, vocab).to(device)
    if cfg.compact_vocab:
        if cfg.init_layers:
            from atspeed_ray.models import compact_vocab_ids, shrink_to_compact

            model = shrink_to_compact(model, compact_vocab_ids(prepared), vocab)
        return with_draft_kind(model, cfg).train()
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(prepared.tokenizer):
        raise ValueError(f"model vocabulary {rows} < tokenizer size {len(prepared.tokenizer)} "
                         f"of {cfg.data}")
    if cfg.code_head:  # recorded in the config: it travels with every export of the draft
        set_code_head(model, prepared.index)
    return with_draft_kind(model, cfg).train()


def with_draft_kind(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """An align model with its kind recorded in its config (``drafts.DRAFT_KIND_KEY``: it travels
    with every export, and ``drafts.load_drafter`` loads by it); a target is left as it is."""
    if cfg.task == "align":
        from atspeed_ray.drafts import DRAFT_KIND_KEY
        from atspeed_ray.drafts.lm import CODE_HEAD, COMPACT_VOCAB, LM

        kind = COMPACT_VOCAB if cfg.compact_vocab else CODE_HEAD if cfg.code_head else LM
        setattr(model.config, DRAFT_KIND_KEY, kind.name)
    return model


def fresh_model(cfg: TrainConfig, prepared, vocab: int) -> torch.nn.Module:
    """A fresh ``cfg.preset`` model: its target size (train-target) over ``vocab`` rows, or its
    draft size (align; ``cfg.draft_size`` overrides it) over ``vocab`` rows or, with
    ``cfg.compact_vocab``, over a compact table (``models.build_compact_draft``)."""
    from atspeed_ray.models import (
        build_compact_draft, build_llama, compact_vocab_ids, get_preset, parse_size,
    )

    preset = get_preset(cfg.preset)
    size = preset.target if cfg.task == "target" else preset.draft
    if cfg.draft_size:
        size = parse_size(cfg.draft_size)
    if cfg.compact_vocab:
        return build_compact_draft(size, compact_vocab_ids(prepared), vocab, seed=cfg.seed)
    return build_llama(size, vocab, pad_token_id=prepared.prompt_format.pad_id, seed=cfg.seed)


def vocab_rows(model_dir: str) -> int:
    """The vocabulary size in ``model_dir``'s config.json (0 when it names none)."""
    import json
    from pathlib import Path

    return int(json.loads((Path(model_dir) / "config.json").read_text()).get("vocab_size") or 0)


def train_samples(cfg: TrainConfig, prepared) -> Sequences | None:
    """Whole-sequence windows when ``cfg`` trains on them (None: the per-prefix rows).
    ``samples="auto"`` takes them where the prompt template allows (see sequences.py)."""
    from atspeed_ray.training.sequences import TemplateError, build_sequences

    if cfg.resolved_samples() != "sequence":
        return None
    try:
        return build_sequences(prepared)
    except TemplateError:
        if cfg.samples == "auto":
            return None
        raise


def load_frozen_target(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The trained target of an align run, frozen (FastLlama where it applies)."""
    from atspeed_ray.models import DeviceConfig, load_decoder

    target = load_decoder(cfg.target, DeviceConfig(device=str(device), dtype="float32"))
    target.requires_grad_(False)
    return target.eval()


def build_setup(cfg: TrainConfig, device: torch.device) -> Setup:
    from atspeed_ray.data.prepare import load_prepared
    from atspeed_ray.decoding.decoder import head_columns
    from atspeed_ray.training.teacher_data import load_examples, load_teacher, subsample

    prepared = load_prepared(cfg.data)
    if cfg.draft_kind == "feature":
        return feature_setup(cfg, prepared, device)
    spec = Objective(cfg.loss).spec if cfg.task == "align" else Objective("sft").spec
    teacher = load_teacher(cfg.teacher) if (cfg.task == "align" and cfg.teacher) else None
    # with teacher data, every loss (sft included) trains on the teacher's rows: same samples
    train = train_samples(cfg, prepared) if teacher is None else None
    train = load_examples(prepared, "train", teacher) if train is None else train
    if cfg.max_samples:
        train = train.select(subsample(len(train), cfg.max_samples, cfg.seed))
    val = val_examples(cfg, prepared, teacher)

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

    model = build_model(cfg, prepared, device)
    target = load_frozen_target(cfg, device) if cfg.task == "align" else None
    objective = Objective(
        name=spec.name, alpha=cfg.alpha, temperature=cfg.temperature, topk=cfg.topk,
        teacher_k=teacher_k, target=target if (spec.needs_target and not with_p) else None,
        index=prepared.index.to(device), columns=head_columns(model))
    prefix = f"[{cfg.task}{' ' + spec.name if cfg.task == 'align' else ''}]"
    return Setup(cfg, prepared, train, val, objective, teacher_k, with_p, model, target, device,
                 prefix)


def val_examples(cfg: TrainConfig, prepared, teacher=None) -> Examples:
    """The first ``cfg.val_samples`` validation rows (the teacher's, when given)."""
    from atspeed_ray.training.teacher_data import load_examples

    val = load_examples(prepared, "valid", teacher)
    return val.select(np.arange(min(cfg.val_samples, len(val))))


def feature_setup(cfg: TrainConfig, prepared, device: torch.device) -> Setup:
    """A feature draft's run (``align --draft-kind feature``): the samples are prompts, a batch
    is the frozen target's trees of its prompts (``feature.TreeTeacher``: the target, loaded in
    eval mode on every worker, never trained), the objective ``feature.FeatureObjective``."""
    from pathlib import Path

    from atspeed_ray.training.feature import (
        FEATURE_MAX_SAMPLES, FeatureObjective, TreeTeacher, tree_cache_key,
    )
    from atspeed_ray.training.teacher_data import load_examples, subsample

    target = load_frozen_target(cfg, device)
    train = load_examples(prepared, "train")
    train = train.select(subsample(len(train), cfg.max_samples or FEATURE_MAX_SAMPLES, cfg.seed))
    val = val_examples(cfg, prepared)
    k = cfg.teacher_k or cfg.val_k
    index = prepared.index.to(device)
    trees = TreeTeacher(target, index, k)
    prefix = f"[align feature {cfg.loss}]"
    if cfg.tree_cache:
        assert cfg.target is not None
        loaded, computed, path = trees.use_cache(Path(cfg.tree_cache),
                                                 tree_cache_key(cfg.target, prepared.index, k),
                                                 train.prompts + val.prompts, cfg.micro_batch)
        print(f"{prefix} teacher trees: {loaded} from {path}, {computed} computed", flush=True)
    objective = FeatureObjective(index, cfg.loss, cfg.feature_weight, cfg.temperature)
    return Setup(cfg, prepared, train, val, objective, k, False,
                 build_model(cfg, prepared, device, target), target, device, prefix, trees=trees)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms), nanoGPT style."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    # no empty group (LoRA trains matrices only): ZeRO drops it and the LR schedule would not
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
