"""Tree attention over a KV cache that holds a token tree, one cache row per request.

A request's cache row holds its (left-padded) prompt, then tree nodes: beams and drafted tokens
fed in earlier forwards. A node never moves; what a new token may see is said by a 4-D attention
mask: the prompt, its cached ancestors, its ancestors inside the current chunk, and itself. Its
position id is prompt length + its depth, exactly as in a plain forward over its path, so its
logits (and its KV entries) equal those of that plain forward.

Works with any HF causal LM that accepts a 4-D additive ``attention_mask`` [B, 1, Q, S + Q],
``position_ids`` and a ``DynamicCache`` (Llama, Mistral, Qwen2, ...).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor
from transformers import DynamicCache

from atspeed_ray.decoding.fast_llama import KVCache


@dataclass
class TreeCache:
    kv: DynamicCache | KVCache  # per-layer .keys/.values [B, H_kv, S, D]
    is_prompt: Tensor  # [B, S] bool: slot holds a real prompt token (seen by every node)
    prompt_len: Tensor  # [B] long: number of real prompt tokens
    prompt_cols: int  # the first prompt_cols slots are the (left-padded) prompt block

    @property
    def size(self) -> int:
        return self.is_prompt.shape[1]

    def select_rows(self, rows: Tensor) -> "TreeCache":
        """Keep requests ``rows`` [B'] (a finished request leaves the batch)."""
        self.kv.batch_select_indices(rows)
        return TreeCache(self.kv, self.is_prompt[rows], self.prompt_len[rows], self.prompt_cols)

    def compact(self, slots: Tensor) -> Tensor:
        """Drop every tree slot not referenced by ``slots`` [B, ...] (-1 = none); keep the prompt.

        Rejected branches leave the cache here. Returns ``slots`` renumbered for the new layout.
        """
        B, S = self.is_prompt.shape
        flat = slots.reshape(B, -1)
        ref = torch.zeros(B, S + 1, dtype=torch.bool, device=flat.device)
        ref.scatter_(1, torch.where(flat >= 0, flat, S), True)
        keep = ref[:, :S]
        keep[:, : self.prompt_cols] = True
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept slots first
        gather = order[:, : int(keep.sum(1).max())]  # [B, S'] (the one host read here)
        if isinstance(self.kv, KVCache):  # static buffers: kept tree slots move down in place
            self.kv.keep_slots(gather, self.prompt_cols)
        else:
            gather_slots(self.kv, gather)
        self.is_prompt = self.is_prompt.gather(1, gather)
        new_pos = torch.cumsum(keep.long(), 1) - 1  # [B, S] new slot of each kept old slot
        renum = torch.where(flat >= 0, new_pos.gather(1, flat.clamp(min=0)), -1)
        return renum.reshape(slots.shape)


def gather_slots(kv: DynamicCache, gather: Tensor) -> None:
    """The plain compaction (HF's DynamicCache, and the reference of ``KVCache.keep_slots``):
    every layer's keys/values become new tensors of the slots ``gather`` [B, S']."""
    for layer in kv.layers:
        idx = gather[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
        layer.keys = layer.keys.gather(2, idx)
        layer.values = layer.values.gather(2, idx)


def new_cache(model: torch.nn.Module):
    """An empty KV cache for ``model``: its own (``FastLlama``) or HF's ``DynamicCache``."""
    make = getattr(model, "new_cache", None)
    return make() if callable(make) else DynamicCache(config=model.config)


@functools.cache
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument: ``cache`` in transformers >= 5.2x, else ``past_key_values``."""
    return "cache" if "cache" in _forward_params(type(model)) else "past_key_values"


def last_logits_kwargs(model: torch.nn.Module, n: int) -> dict:
    """Ask for the logits of the last ``n`` positions only (0 = all), where the model can."""
    return {"logits_to_keep": n} if n and "logits_to_keep" in _forward_params(type(model)) else {}


def additive_mask(visible: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, Q, K] bool -> [B, 1, Q, K] additive float mask (0 = attend, dtype min = blocked)."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[:, None]


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token-id lists -> (tokens [B, P], valid [B, P]) left-padded."""
    P = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            tokens[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[i, P - len(p):] = True
    return tokens.to(device), valid.to(device)


@dataclass
class Nodes:
    """Tree nodes fed in one chunk (after an optional prompt block)."""

    tokens: Tensor  # [B, T]
    depth: Tensor  # [B, T] depth of the generated token (0 = first code token)
    parent: Tensor  # [B, T] index of the parent node in this chunk, -1 = parent is cached/prompt
    cached: Tensor  # [B, T, D] cache slots of the node's cached ancestors (-1 = none)
    valid: Tensor  # [B, T] bool; invalid nodes see only themselves and are seen by no one

    @staticmethod
    def cat(parts: Sequence[Nodes]) -> Nodes:
        """``parts`` one after the other in one chunk (their ``parent`` indices already count
        from the start of the chunk; every part has the same ``cached`` width D)."""
        return Nodes(*(torch.cat([getattr(p, f.name) for p in parts], 1) for f in fields(Nodes)))


def ancestor_matrix(parent: Tensor, valid: Tensor, max_depth: int) -> Tensor:
    """[B, T] parent pointers -> [B, T, T] bool: node q sees node m (m is q or an ancestor)."""
    B, T = parent.shape
    anc = torch.eye(T, dtype=torch.bool, device=parent.device).expand(B, T, T).clone()
    cur = parent
    for _ in range(max_depth):
        ok = (cur >= 0) & valid
        hit = torch.zeros(B, T, T + 1, dtype=torch.bool, device=parent.device)
        hit.scatter_(2, torch.where(ok, cur, T).unsqueeze(-1), True)
        anc |= hit[..., :T]
        cur = torch.where(cur >= 0, parent.gather(1, cur.clamp(min=0)), -1)
    return anc


def chunk_visibility(nodes: Nodes, p_valid: Tensor, is_prompt_old: Tensor, max_chain: int) -> Tensor:
    """What each position of a chunk [prompt block (P) | nodes (T)] may attend to, over the S
    cached slots (``is_prompt_old`` [B, S]) and the chunk itself: [B, P + T, S + P + T] bool."""
    B, T = nodes.tokens.shape
    P, S = p_valid.shape[1], is_prompt_old.shape[1]
    dev = nodes.tokens.device
    Q = P + T
    vis = torch.zeros(B, Q, S + Q, dtype=torch.bool, device=dev)
    # prompt block: causal over real tokens; a pad token sees only itself
    causal = torch.tril(torch.ones(P, P, dtype=torch.bool, device=dev))
    vis[:, :P, S:S + P] = causal & p_valid[:, None, :]
    vis[:, :P, S:S + P] |= torch.eye(P, dtype=torch.bool, device=dev)
    # tree nodes: cached prompt + cached ancestors + prompt block + in-chunk ancestors + self
    valid = nodes.valid
    seen = torch.zeros(B, T, S + 1, dtype=torch.bool, device=dev)
    cached = torch.where(nodes.cached >= 0, nodes.cached, S)
    seen.scatter_(2, cached, True)
    vis[:, P:, :S] = (seen[..., :S] | is_prompt_old[:, None, :]) & valid[..., None]
    vis[:, P:, S:S + P] = p_valid[:, None, :] & valid[..., None]
    vis[:, P:, S + P:] = ancestor_matrix(nodes.parent, valid, max_chain)
    return vis


def tree_forward(
    model: torch.nn.Module,
    cache: TreeCache | None,
    nodes: Nodes,
    prompt: tuple[Tensor, Tensor] | None = None,
    max_chain: int = 8,
    prompt_logits: bool = False,
) -> tuple[Tensor, TreeCache, Tensor]:
    """One forward over [prompt block] + tree nodes, appended to ``cache``.

    Returns (logits, the cache, slot of each node [B, T]). With ``prompt`` = (tokens [B, P],
    valid [B, P]) the chunk starts with a causal prompt block; ``cache`` must then be None (a
    prompt is only ever fed once). Logits are [B, T, V] for the nodes alone, or with a prompt
    block [B, 1 + T, V]: the prompt's last position (prompts are left-padded, so it is column
    P - 1 of every row), then the nodes; ``prompt_logits=True`` returns every position
    [B, P + T, V] (the LM head then runs over the whole prompt, which decoding never reads).
    """
    B, T = nodes.tokens.shape
    dev = nodes.tokens.device
    if prompt is not None:
        assert cache is None, "the prompt block goes into a fresh cache"
        p_tok, p_valid = prompt
        prompt_len = p_valid.sum(1)
        is_prompt_old = torch.zeros(B, 0, dtype=torch.bool, device=dev)
    else:
        assert cache is not None
        p_tok = nodes.tokens.new_zeros(B, 0)
        p_valid = torch.zeros(B, 0, dtype=torch.bool, device=dev)
        prompt_len, is_prompt_old = cache.prompt_len, cache.is_prompt
    P, S = p_tok.shape[1], is_prompt_old.shape[1]
    vis = chunk_visibility(nodes, p_valid, is_prompt_old, max_chain)
    # position ids
    p_pos = (torch.cumsum(p_valid.long(), 1) - 1).clamp(min=0)
    n_pos = prompt_len[:, None] + nodes.depth
    positions = torch.cat([p_pos, n_pos], 1)
    tokens = torch.cat([p_tok, nodes.tokens], 1)
    dtype = next(model.parameters()).dtype
    kv = cache.kv if cache is not None else new_cache(model)
    keep = 0 if prompt_logits or prompt is None else T + 1
    prompt_cols = P if cache is None else cache.prompt_cols
    layout = {"prompt_cols": prompt_cols} if "prompt_cols" in _forward_params(type(model)) else {}
    out = model(
        input_ids=tokens,
        attention_mask=additive_mask(vis, dtype),
        position_ids=positions,
        use_cache=True,
        **{cache_kwarg(model): kv},  # the cache is updated in place
        **last_logits_kwargs(model, keep),
        **layout,
    )
    logits = out.logits[:, -keep:] if keep else out.logits
    new_is_prompt = torch.cat(
        [is_prompt_old, p_valid, torch.zeros(B, T, dtype=torch.bool, device=dev)], 1
    )
    tree_cache = TreeCache(kv, new_is_prompt, prompt_len, prompt_cols)
    slots = S + P + torch.arange(T, device=dev).expand(B, T)
    return logits, tree_cache, slots
