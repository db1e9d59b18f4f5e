"""LoRA fine-tuning through PEFT, merged back into a plain model for export.

``TrainConfig.lora_r`` set: the model's ``lora_targets`` linear layers (default ``q_proj,v_proj``
as in LC-Rec) get rank-r adapters scaled by ``lora_alpha / r``; every other base weight is
frozen. The code tokens are new to the model, so their embedding rows must learn too: they are
trained through PEFT's ``trainable_token_indices`` (only those rows of the embedding matrix get
a trainable delta; with tied embeddings the LM head follows the same rows; an untied head gets
its own delta on the same rows). That trains ``n_new x d`` values instead of the whole
``V x d`` matrix (LC-Rec trains the whole embeddings and head via ``modules_to_save``, which on
a tied model also unties them) and keeps tied models tied.

The exported checkpoint is always a plain model: :func:`plain_model` merges the adapters and
the token deltas into the base weights (``merge_and_unload``), so decoding, serving and
``align --init-layers`` load it with ``AutoModelForCausalLM`` and never see PEFT.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch


def is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def parse_targets(targets: str) -> list[str]:
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise ValueError("lora_targets: give at least one module name (e.g. q_proj,v_proj)")
    return names


def apply_lora(model: torch.nn.Module, r: int, alpha: float, targets: str, dropout: float,
               token_ids: Sequence[int]) -> torch.nn.Module:
    """``model`` wrapped with LoRA adapters on ``targets`` and trainable rows ``token_ids``."""
    from peft import LoraConfig, get_peft_model

    names = parse_targets(targets)
    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"lora_targets: {type(model).__name__} has no linear layer named "
                         f"{', '.join(missing)} (it has {', '.join(sorted(present))})")
    tokens: dict[str, list[int]] | None = None
    if token_ids:
        ids = sorted(set(int(i) for i in token_ids))
        tokens = {_module_name(model, model.get_input_embeddings()): ids}
        head = model.get_output_embeddings()
        if head is not None and not getattr(model.config, "tie_word_embeddings", False):
            tokens[_module_name(model, head)] = ids
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=names, lora_dropout=dropout,
                     bias="none", task_type="CAUSAL_LM", trainable_token_indices=tokens)
    return get_peft_model(model, cfg)


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name.rsplit(".", 1)[-1]
    raise ValueError(f"module {type(module).__name__} not found in {type(model).__name__}")


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """A plain HF model with ``model``'s weights: a merged copy of a PEFT model, else ``model``."""
    if not is_peft(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
