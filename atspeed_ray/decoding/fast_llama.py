"""A compact Llama forward for decoding (gpt-fast style), beside the HF model it is read from.

On small models the HF forward spends most of its time outside the matrix products (module
dispatch, mask and rope plumbing, cache bookkeeping): on the 2-core CPU the 4-layer ``cpu``
target takes ~6 ms per call of which ~1 ms is arithmetic. ``FastLlama`` runs the same maths with
fused q|k|v and gate|up projections, a precomputed rope table and one SDPA call per layer, and
keeps its KV cache in a plain per-layer list with the layout ``TreeCache`` works on.

It is a drop-in for what the decoding core and the frozen target of training call:
``model(input_ids, attention_mask=[B, 1, Q, S + Q] additive, position_ids, cache=...,
logits_to_keep=...)`` returning ``.logits``, plus ``.config`` and ``.new_cache()``. It is
inference-only (no grads, no dropout) and checked against the HF forward
with ``assert_close`` (tests/test_fast_llama.py). ``fast_forward(model)`` returns it for plain
Llama checkpoints and the HF model unchanged for anything else.

A *code head* (``head_ids``) keeps only the output rows of the code tokens: a draft only ever
proposes code tokens, so its logits over the rest of an LLM's ~50k-token vocabulary are never
read. Its log-softmax is then taken over the head alone; that changes the draft's scores (which
beams are drafted), never a strict result, which the target's full-vocabulary scores define.

A *compact-vocabulary* draft (``models.attach_compact_vocab``) has an embedding table of a few
hundred rows (code tokens, the prompt format's tokens, one unknown row) tied to its head: it
takes global token ids (``input_rows`` maps them to rows, ``table_rows``) and its logits are over
its rows, with ``head_columns`` mapping a code id to its column as for a code head.

Pretrained Llama-family LLMs such as SmolLM2-135M run on it as they are: grouped-query attention
(fewer key/value heads than query heads; K/V are cached per key/value head and repeated for the
query heads at attention time), tied input/output embeddings (one shared matrix), and any rope
base (``rope_theta``) or scaling that only rescales the inverse frequencies, all read from the HF
model's own rotary module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_ROPE = ("default", "linear", "llama3")  # types that only change inv_freq (+ scaling)
ROPE_TABLE_MIN = 4096  # rope table rows at least (positions = prompt length + depth)
MAX_CODE_DEPTH = 64  # positions kept free after a prompt for the tokens decoded below it


@dataclass
class LayerKV:
    keys: Tensor | None = None  # [B, H_kv, S, D]
    values: Tensor | None = None  # [B, H_kv, S, D]


class KVCache:
    """Per-layer keys/values; ``layers[i].keys`` / ``.values`` as in HF's DynamicCache."""

    def __init__(self, num_layers: int):
        self.layers = [LayerKV() for _ in range(num_layers)]

    def batch_select_indices(self, rows: Tensor) -> None:
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys, layer.values = layer.keys[rows], layer.values[rows]

    def append(self, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``k``, ``v`` [B, H_kv, T, D] after layer ``i``'s cached ones; return all of them."""
        layer = self.layers[i]
        if layer.keys is None:
            layer.keys, layer.values = k, v
        else:
            layer.keys = torch.cat([layer.keys, k], dim=2)
            layer.values = torch.cat([layer.values, v], dim=2)
        return layer.keys, layer.values


def table_rows(rows: Tensor, ids: Tensor) -> Tensor:
    """Global token ids [...] -> rows of a compact embedding table (``models.COMPACT_VOCAB_KEY``):
    ``rows`` [V + 1] holds the row of every id below V and, last, the unknown row, which every
    id outside 0..V-1 reads."""
    n = rows.numel() - 1
    return rows[torch.where((ids >= 0) & (ids < n), ids, n)]


@dataclass
class Output:
    logits: Tensor  # [B, T, V]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot run on ``FastLlama`` (None if it can)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama":
        return f"model_type {getattr(cfg, 'model_type', None)!r} is not 'llama'"
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    checks = {
        "attention_bias": not getattr(cfg, "attention_bias", False),
        "mlp_bias": not getattr(cfg, "mlp_bias", False),
        "hidden_act": getattr(cfg, "hidden_act", "silu") == "silu",
        "pretraining_tp": getattr(cfg, "pretraining_tp", 1) == 1,
        f"rope_type {rope!r}": rope in SUPPORTED_ROPE,
    }
    bad = [name for name, ok in checks.items() if not ok]
    return f"unsupported {', '.join(bad)}" if bad else None


class FastLlama(nn.Module):
    """Inference forward of a ``LlamaForCausalLM`` (weights copied from it, q|k|v and gate|up fused)."""

    def __init__(self, hf: nn.Module, head_ids: Tensor | list[int] | None = None):
        super().__init__()
        reason = unsupported_reason(hf)
        if reason is not None:
            raise ValueError(f"FastLlama: {reason}")
        cfg = self.config = hf.config
        base = hf.model
        attn0 = base.layers[0].self_attn
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = attn0.head_dim
        self.scaling = attn0.scaling
        self.eps = cfg.rms_norm_eps

        def frozen(t: Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach().clone(), requires_grad=False)

        self.embed = frozen(base.embed_tokens.weight)  # [V, E]
        self.wqkv = nn.ParameterList()  # [(H + 2 H_kv) * D, E]
        self.wo = nn.ParameterList()  # [E, H * D]
        self.w_gate_up = nn.ParameterList()  # [2 I, E]
        self.w_down = nn.ParameterList()  # [E, I]
        self.norm_attn = nn.ParameterList()  # [E]
        self.norm_mlp = nn.ParameterList()  # [E]
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            self.wqkv.append(frozen(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])))
            self.wo.append(frozen(a.o_proj.weight))
            self.w_gate_up.append(frozen(torch.cat([m.gate_proj.weight, m.up_proj.weight])))
            self.w_down.append(frozen(m.down_proj.weight))
            self.norm_attn.append(frozen(layer.input_layernorm.weight))
            self.norm_mlp.append(frozen(layer.post_attention_layernorm.weight))
        self.norm_out = frozen(base.norm.weight)
        # tied embeddings (SmolLM2, our presets) keep one [V, E] matrix for both ends
        tied = hf.lm_head.weight is base.embed_tokens.weight
        self.lm_head = self.embed if tied else frozen(hf.lm_head.weight)  # [V, E]
        # a compact draft (models.attach_compact_vocab): global id -> table row, and its head map
        rows = getattr(base.embed_tokens, "rows", None)
        self.register_buffer("input_rows", None if rows is None else rows.clone(), persistent=False)
        if rows is not None:
            self.register_buffer("head_columns", hf.head_columns.clone(), persistent=False)
        if head_ids is not None:
            self.restrict_head(head_ids)
        # rope table over every position, computed as HF does (fp32, then the model's dtype); HF
        # computes any position on the fly, so the table also covers prompts past the trained length
        rot = base.rotary_emb
        n_pos = max(cfg.max_position_embeddings, ROPE_TABLE_MIN)
        pos = torch.arange(n_pos, dtype=torch.float32, device=rot.inv_freq.device)
        freqs = pos[:, None] * rot.inv_freq.float()[None, :]  # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
        dtype = self.embed.dtype
        self.register_buffer("cos", (emb.cos() * rot.attention_scaling).to(dtype), persistent=False)
        self.register_buffer("sin", (emb.sin() * rot.attention_scaling).to(dtype), persistent=False)

    def restrict_head(self, head_ids: Tensor | list[int]) -> None:
        """Make this a code-head model: logits over the vocabulary ids ``head_ids`` [H] only
        (in that order), one [H, E] matmul instead of [V, E]; the input embedding keeps all V
        rows (prompts use the whole vocabulary). ``head_columns`` [V] maps a token id to its
        logit column (-1: not in the head); the decoding core reads it (``beam.head_columns``)."""
        if self.input_rows is not None:
            raise ValueError("code head: a compact-vocabulary model's tied table is its head already")
        V = self.lm_head.shape[0]
        ids = torch.as_tensor(head_ids, dtype=torch.long, device=self.embed.device).flatten()
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= V:
            raise ValueError(f"code head: token ids must be in 0..{V - 1}")
        if ids.unique().numel() != ids.numel():
            raise ValueError("code head: token ids must be distinct")
        self.lm_head = nn.Parameter(self.lm_head.detach()[ids].clone(), requires_grad=False)  # [H, E]
        columns = torch.full((V,), -1, dtype=torch.long, device=ids.device)
        columns[ids] = torch.arange(ids.numel(), device=ids.device)
        self.register_buffer("head_columns", columns, persistent=False)
        self.head_ids = ids

    def new_cache(self) -> KVCache:
        return KVCache(len(self.wqkv))

    def rms_norm(self, x: Tensor, weight: Tensor) -> Tensor:
        """As LlamaRMSNorm: normalised in fp32, scaled in the input dtype."""
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    @staticmethod
    def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x [B, T, h, D], cos/sin [B, T, 1, D]: x * cos + rotate_half(x) * sin."""
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def attention(self, i: int, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                  cache: KVCache | None, rows: slice | Tensor = slice(None)) -> Tensor:
        """Attention output of the query positions ``rows`` (every position's K/V is computed
        and cached)."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(x, self.wqkv[i]).view(B, T, H + 2 * Hkv, D)
        qk = self.rope(qkv[:, :, : H + Hkv], cos, sin)  # q and k heads rotated together
        q = qk[:, :, :H].transpose(1, 2)  # [B, H, T, D]
        k = qk[:, :, H:].transpose(1, 2)  # [B, Hkv, T, D]
        v = qkv[:, :, H + Hkv:].transpose(1, 2)  # [B, Hkv, T, D]
        if cache is not None:
            k, v = cache.append(i, k, v)  # [B, Hkv, S + T, D]
        if Hkv != H:
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        q = q[:, :, rows]  # [B, H, Q, D]
        if mask is not None:
            mask = mask[:, :, rows]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling,
                                             is_causal=mask is None)
        return F.linear(out.transpose(1, 2).reshape(B, q.shape[2], H * D), self.wo[i])

    def mlp(self, i: int, x: Tensor) -> Tensor:
        gate, up = F.linear(x, self.w_gate_up[i]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w_down[i])

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: KVCache | None = None,
                use_cache: bool = True, logits_to_keep: int | Tensor = 0) -> Output:
        """input_ids [B, T]; attention_mask [B, 1, T, S + T] additive (None: causal, no cache);
        position_ids [B, T]. ``cache`` is extended in place. ``logits_to_keep`` as in HF: the last
        n positions (0 = all) or a 1-D tensor of positions."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        cached = cache is not None and cache.layers[0].keys is not None
        if not cached and T + MAX_CODE_DEPTH > self.cos.shape[0]:  # checked once, on the host
            raise ValueError(f"a chunk of {T} tokens (prompt + tree) is too long for this model's "
                             f"rope table of {self.cos.shape[0]} positions (semantic IDs up to "
                             f"{MAX_CODE_DEPTH} codes deep); shorten the prompt")
        if attention_mask is None and cached:
            raise ValueError("FastLlama needs an attention mask when the cache holds tokens")
        if attention_mask is not None and attention_mask.dim() != 4:
            raise ValueError("FastLlama takes a 4-D additive attention mask [B, 1, Q, S + Q]")
        cos = self.cos[position_ids].unsqueeze(2)  # [B, T, 1, D]
        sin = self.sin[position_ids].unsqueeze(2)
        # rows whose logits are returned; the last layer computes attention and MLP for them
        # only (every row's K/V is still cached). Without a mask SDPA's causal flag needs the
        # full square, so then the rows are cut after the last layer instead.
        if isinstance(logits_to_keep, Tensor):
            rows: slice | Tensor = logits_to_keep
        else:
            rows = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        if self.input_rows is not None:  # a compact table: global ids -> its rows
            input_ids = table_rows(self.input_rows, input_ids)
        x = F.embedding(input_ids, self.embed)  # [B, T, E]
        n = len(self.wqkv)
        for i in range(n):
            q_rows = rows if i == n - 1 and attention_mask is not None else slice(None)
            x = x[:, q_rows] + self.attention(i, self.rms_norm(x, self.norm_attn[i]), cos, sin,
                                              attention_mask, cache if use_cache else None, q_rows)
            x = x + self.mlp(i, self.rms_norm(x, self.norm_mlp[i]))
        if attention_mask is None:
            x = x[:, rows]
        return Output(F.linear(self.rms_norm(x, self.norm_out), self.lm_head))


def fast_forward(model: nn.Module, head_ids: Tensor | list[int] | None = None) -> nn.Module:
    """``FastLlama`` of ``model`` for plain Llama checkpoints, else ``model`` itself (HF forward).
    ``head_ids``: a code head (``FastLlama.restrict_head``); the HF forward keeps its full head."""
    if isinstance(model, FastLlama):
        if head_ids is not None:
            model.restrict_head(head_ids)
        return model
    if unsupported_reason(model) is not None:
        return model
    return FastLlama(model, head_ids)  # its weights and rope table sit on the model's device already
