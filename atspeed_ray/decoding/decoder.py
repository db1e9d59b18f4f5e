"""The model contract of decoding: what the tree layer (``tree.tree_forward``) asks of a model.

A ``Decoder`` makes an empty KV store for a request batch (``new_cache``) and runs one forward
over a ``Chunk`` of tree nodes (tokens, a 4-D additive mask over cache + chunk, position ids,
the prompt block's width) appended to that store, returning the logits at the positions decoding
reads and, when asked, the last-layer hidden states there (after the final norm: what the LM head
reads; a feature draft's input). ``head_columns`` is a code-head model's token id -> logit
column map [V] (None when its logits cover the whole vocabulary).

``FastLlama`` implements it directly. Any other causal LM (an HF ``PreTrainedModel``: Llama,
Mistral, Qwen2, ...) runs through ``HFDecoder``, the one place that adapts to its forward's
signature (the cache argument's name, ``logits_to_keep``). ``as_decoder`` gives the decoder of
either. Pure torch (and transformers' cache class).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from atspeed_ray.decoding.cache import GatherCache, KVStore


@dataclass(frozen=True)
class Chunk:
    """One forward's input: Q positions appended to a cache of S slots."""

    tokens: Tensor  # [B, Q] token ids
    mask: Tensor  # [B, 1, Q, S + Q] additive (0 = attend, dtype min = blocked)
    positions: Tensor  # [B, Q] position ids
    prompt_cols: int  # the first key columns are the prompt block, laid out alike in every call
    keep: int = 0  # outputs of the last ``keep`` positions only (0 = every position)


@dataclass(frozen=True)
class DecoderOutput:
    logits: Tensor  # [B, Q', V] (a code head's: [B, Q', H]); Q' = keep or Q
    hidden: Tensor | None = None  # [B, Q', E] last-layer hidden states (after the final norm)
    context: Tensor | None = None  # [B, Q, E] the same at every position of the chunk


@runtime_checkable
class Decoder(Protocol):
    """What decoding needs of a model (module docstring)."""

    config: Any  # the HF config (pad id, vocabulary size)

    @property
    def head_columns(self) -> Tensor | None:
        """[V] token id -> logit column of a code head (-1: none); None for a full head."""

    def new_cache(self) -> KVStore:
        """An empty KV store for one request batch."""

    def decode(self, chunk: Chunk, cache: KVStore, hidden: bool = False, context: bool = False
               ) -> DecoderOutput:
        """One forward over ``chunk``, appended to ``cache`` in place; ``hidden``: the hidden
        states at the kept positions too, ``context``: at every position."""

    def parameters(self, recurse: bool = True) -> Any:
        """The weights (their dtype and device are the decoding's)."""


@functools.cache
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


class HFDecoder:
    """A Hugging Face causal LM as a ``Decoder``: its own forward, HF's ``DynamicCache`` (with
    the plain compaction, ``GatherCache``). Works for any model that accepts a 4-D additive
    ``attention_mask``, ``position_ids`` and a ``DynamicCache``."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.config = model.config

    @property
    def head_columns(self) -> Tensor | None:
        # a compact-vocabulary draft (``models.attach_compact_vocab``) registers its map
        return getattr(self.model, "head_columns", None)

    def parameters(self, recurse: bool = True) -> Any:
        return self.model.parameters(recurse)

    def new_cache(self) -> GatherCache:
        return GatherCache(config=self.config)

    def decode(self, chunk: Chunk, cache: KVStore, hidden: bool = False, context: bool = False
               ) -> DecoderOutput:
        keep = chunk.keep
        if hidden or context:  # the base model's last hidden state, then the head (as the LM does)
            base = self.model.base_model
            out = base(input_ids=chunk.tokens, attention_mask=chunk.mask,
                       position_ids=chunk.positions, use_cache=True, **_cache_kwargs(base, cache))
            every = out.last_hidden_state
            h = every[:, -keep:] if keep else every
            return DecoderOutput(self.model.get_output_embeddings()(h), h if hidden else None,
                                 every if context else None)
        m = self.model
        out = m(input_ids=chunk.tokens, attention_mask=chunk.mask, position_ids=chunk.positions,
                use_cache=True, **_cache_kwargs(m, cache),
                **({"logits_to_keep": keep} if keep and "logits_to_keep" in _forward_params(type(m))
                   else {}))
        return DecoderOutput(out.logits[:, -keep:] if keep else out.logits)


def _cache_kwargs(model: torch.nn.Module, cache: KVStore) -> dict[str, KVStore]:
    """The KV-cache argument: ``cache`` in transformers >= 5.2x, else ``past_key_values``."""
    name = "cache" if "cache" in _forward_params(type(model)) else "past_key_values"
    return {name: cache}  # updated in place


def as_decoder(model: Decoder | torch.nn.Module) -> Decoder:
    """``model`` itself if it implements ``Decoder`` (``FastLlama``), else its ``HFDecoder``."""
    return model if isinstance(model, Decoder) else HFDecoder(model)  # type: ignore[return-value]


def head_columns(model: Decoder | torch.nn.Module) -> Tensor | None:
    """A code-head model's token id -> logit column map [V]; None for a full-vocabulary head."""
    return as_decoder(model).head_columns
