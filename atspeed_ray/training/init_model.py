"""Start a model from an existing causal LM: vocabulary resizing and new-row initialisation.

``train-target --init MODEL_DIR`` fine-tunes MODEL_DIR on a folder prepared with that model's
tokenizer plus the code tokens (``prepare --base-model MODEL_DIR``). The prepared tokenizer is
the model's vocabulary followed by the added tokens, so the embedding matrix (and an untied LM
head) grows to ``len(tokenizer)``; the model's own rows keep their ids and values.

New rows start from (``TrainConfig.new_token_init``):

* ``mean``: the mean of the existing rows (of the embedding matrix and, untied, of the head);
  every new token starts as the "average token", so its logit starts near the typical one;
* ``noise``: that mean plus Gaussian noise of 0.1 x the rows' per-dimension standard deviation,
  which makes the new tokens distinguishable from the first step;
* ``pieces`` (default): the mean of the rows of the pieces the *base* tokenizer cuts the
  token's text into (``<a_12>`` -> ``<``, ``a``, ``_``, ``12``, ``>``), so codes of one level
  start close to each other and apart from the other levels (needs the base tokenizer in
  MODEL_DIR).

Measured (SmolLM2-135M-Instruct cut to its first 4 layers, tied embeddings, Beauty prepared
with its tokenizer, full fine-tuning, 8 steps of 8 whole-sequence windows, lr 5e-4): first-step
loss 32.9 / 32.9 / 19.3, epoch mean 30.9 / 26.2 / 10.3, validation loss 18.2 / 17.2 / 7.0
for mean / noise / pieces: under a tied head the mean init gives every code the same, low
logit; the pieces init starts the codes where related text tokens are.

The new rows are the ids past the base tokenizer's vocabulary (a model whose matrix already has
spare rows, as Qwen2 pads its vocabulary, gets those rows initialised too; the matrix only
grows where the tokenizer needs it). MODEL_DIR must fit the prepared folder (its base model, or a
model trained on it: ``data.prepare.check_base_model``, which ``train-target`` runs before it
starts), else the run stops with an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

NOISE_SCALE = 0.1  # ``noise``: std of the added noise, relative to the rows' per-dimension std


@dataclass
class Resized:
    """What :func:`resize_to_tokenizer` did: ids of the rows it added (empty: none)."""

    old_vocab: int
    new_ids: list[int]


def _new_rows(weight: torch.Tensor, old: int, new_ids: list[int], rule: str,
              pieces: list[list[int]] | None, gen: torch.Generator) -> torch.Tensor:
    """[len(new_ids), d] initial values of the new rows of ``weight`` [V, d] (rows < old exist)."""
    rows = weight[:old].float()
    mean = rows.mean(0)
    if rule == "mean":
        return mean.expand(len(new_ids), -1).clone()
    if rule == "noise":
        std = rows.std(0) * NOISE_SCALE
        return mean + std * torch.randn(len(new_ids), rows.shape[1], generator=gen)
    assert pieces is not None
    return torch.stack([rows[p].mean(0) if p else mean for p in pieces])


def resize_to_tokenizer(model: torch.nn.Module, tokenizer, rule: str = "mean", base=None,
                        seed: int = 0) -> Resized:
    """Give ``model`` a row for every id of ``tokenizer`` and initialise the rows of the ids past
    ``base`` (the model's own tokenizer; None: past the model's rows) by ``rule``."""
    rows, V = model.get_input_embeddings().weight.shape[0], len(tokenizer)
    old = min(len(base), rows) if base is not None else rows
    if V <= old:
        return Resized(old, [])
    new_ids = list(range(old, V))
    pieces = None
    if rule == "pieces":
        if base is None:
            raise ValueError("new_token_init 'pieces' needs the base model's tokenizer in --init")
        texts = tokenizer.convert_ids_to_tokens(new_ids)
        pieces = [[i for i in base(t, add_special_tokens=False)["input_ids"] if i < old]
                  for t in texts]
    if V > rows:
        model.resize_token_embeddings(V, mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    tied = getattr(model.config, "tie_word_embeddings", False)
    with torch.no_grad():
        targets = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings()
        if head is not None and not tied and head.weight is not targets[0]:
            targets.append(head.weight)
        for w in targets:
            w[old:V] = _new_rows(w, old, new_ids, rule, pieces, gen).to(w.dtype)
    return Resized(old, new_ids)


def trainable_token_ids(prepared, resized: Resized) -> list[int]:
    """The rows LoRA trains in the embeddings: every added row, every code token, the separator."""
    codes = torch.unique(prepared.index.codes).tolist()
    return sorted(set(resized.new_ids) | set(codes) | {prepared.prompt_format.sep_id})


def adapt_model(model: torch.nn.Module, cfg, prepared) -> torch.nn.Module:
    """A loaded model made ready for ``cfg``: grown to the prepared tokenizer (``--init``), then
    wrapped with LoRA adapters when ``cfg.lora_r`` is set (training/lora.py)."""
    from atspeed_ray.data.llm import has_tokenizer, load_base_tokenizer
    from atspeed_ray.training.lora import apply_lora

    resized = Resized(model.get_input_embeddings().weight.shape[0], [])
    if cfg.init:
        base = load_base_tokenizer(cfg.init) if has_tokenizer(Path(cfg.init)) else None
        resized = resize_to_tokenizer(model, prepared.tokenizer, cfg.new_token_init, base, cfg.seed)
    if cfg.lora_r is None:
        return model
    return apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout,
                      trainable_token_ids(prepared, resized))
