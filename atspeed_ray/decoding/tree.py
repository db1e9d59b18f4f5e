"""Tree attention over a KV cache that holds a token tree, one cache row per request.

A request's cache row holds its (left-padded) prompt, then tree nodes: beams and drafted tokens
fed in earlier forwards. A node never moves; what a new token may see is said by a 4-D attention
mask: the prompt, its cached ancestors, its ancestors inside the current chunk, and itself. Its
position id is prompt length + its depth, exactly as in a plain forward over its path, so its
logits (and its KV entries) equal those of that plain forward.

The model is a ``Decoder`` (``decoder``): ``FastLlama``, or any HF causal LM through
``HFDecoder``. The caches live in ``cache``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from atspeed_ray.decoding.cache import TreeCache
from atspeed_ray.decoding.decoder import Chunk, Decoder, DecoderOutput, as_decoder


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
    model: Decoder | torch.nn.Module,
    cache: TreeCache | None,
    nodes: Nodes,
    prompt: tuple[Tensor, Tensor] | None = None,
    max_chain: int = 8,
    prompt_logits: bool = False,
) -> tuple[Tensor, TreeCache, Tensor]:
    """``tree_decode`` returning the logits alone (the decoder's output without hidden states)."""
    out, tree_cache, slots = tree_decode(model, cache, nodes, prompt, max_chain, prompt_logits)
    return out.logits, tree_cache, slots


def tree_decode(
    model: Decoder | torch.nn.Module,
    cache: TreeCache | None,
    nodes: Nodes,
    prompt: tuple[Tensor, Tensor] | None = None,
    max_chain: int = 8,
    prompt_logits: bool = False,
    hidden: bool = False,
    context: bool = False,
) -> tuple[DecoderOutput, TreeCache, Tensor]:
    """One forward over [prompt block] + tree nodes, appended to ``cache``.

    Returns (the decoder's output, the cache, slot of each node [B, T]). With ``prompt`` =
    (tokens [B, P], valid [B, P]) the chunk starts with a causal prompt block; ``cache`` must
    then be None (a prompt is only ever fed once). Outputs are [B, T, ...] for the nodes alone,
    or with a prompt block [B, 1 + T, ...]: the prompt's last position (prompts are left-padded,
    so it is column P - 1 of every row), then the nodes; ``prompt_logits=True`` returns every
    position [B, P + T, ...] (the LM head then runs over the whole prompt, which decoding never
    reads). ``hidden`` adds the last-layer hidden states at the same positions, ``context`` at
    every position of the chunk ([B, P + T, E]: the prompt block's too).
    """
    decoder = as_decoder(model)
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
    dtype = next(decoder.parameters()).dtype
    kv = cache.kv if cache is not None else decoder.new_cache()
    keep = 0 if prompt_logits or prompt is None else T + 1
    prompt_cols = P if cache is None else cache.prompt_cols
    chunk = Chunk(torch.cat([p_tok, nodes.tokens], 1), additive_mask(vis, dtype),
                  torch.cat([p_pos, n_pos], 1), prompt_cols, keep)
    out = decoder.decode(chunk, kv, hidden, context)  # the cache is updated in place
    new_is_prompt = torch.cat(
        [is_prompt_old, p_valid, torch.zeros(B, T, dtype=torch.bool, device=dev)], 1
    )
    tree_cache = TreeCache(kv, new_is_prompt, prompt_len, prompt_cols)
    slots = S + P + torch.arange(T, device=dev).expand(B, T)
    return out, tree_cache, slots
