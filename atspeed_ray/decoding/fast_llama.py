"""A compact Llama forward for decoding (gpt-fast style), beside the HF model it is read from.

On small models the HF forward spends most of its time outside the matrix products (module
dispatch, mask and rope plumbing, cache bookkeeping): on the 2-core CPU the 4-layer ``cpu``
target takes ~6 ms per call of which ~1 ms is arithmetic. ``FastLlama`` runs the same maths with
fused q|k|v and gate|up projections, a precomputed rope table and one SDPA call per layer, and
keeps its KV cache in static per-layer buffers (``KVCache``: allocated once per request batch,
written and compacted in place) with the layout ``TreeCache`` works on. ``compile_step`` runs
each layer's two dense blocks (``pre_attention``, ``post_attention``: pure tensor functions)
through ``torch.compile``; off by default (``settings.DEFAULT_COMPILE``: see there for why).
``pack_weights`` lays every projection out once for the CPU's GEMM library (oneDNN for bf16,
MKL for fp32), which otherwise re-lays the weight out on every call; on by default on CPU
(``settings.DEFAULT_PACK``: see there for the measurement).

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

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atspeed_ray.decoding.cache import CACHE_RESERVE, KVCache
from atspeed_ray.decoding.decoder import Chunk, DecoderOutput

SUPPORTED_ROPE = ("default", "linear", "llama3")  # types that only change inv_freq (+ scaling)
ROPE_TABLE_MIN = 4096  # rope table rows at least (positions = prompt length + depth)
MAX_CODE_DEPTH = 64  # positions kept free after a prompt for the tokens decoded below it


PACK_ROWS_HINT = 64  # rows per call the GEMM libraries lay packed weights out for (any count works)


def packing_library(dtype: torch.dtype, device: torch.device) -> str | None:
    """The CPU GEMM library that can pack weights of ``dtype`` on ``device`` (None: none here,
    e.g. CUDA, fp64, or a torch built without it)."""
    if device.type != "cpu":
        return None
    if dtype == torch.bfloat16 and onednn_packs_bf16():
        return "onednn"
    if dtype == torch.float32 and torch.backends.mkl.is_available():
        return "mkl"
    return None


@functools.cache
def onednn_packs_bf16() -> bool:
    """Whether oneDNN lays bf16 weights out on this CPU: it needs AVX512 (BW, VL, DQ) or
    AVX-NE-CONVERT (an AVX2-only CPU, e.g. some AMD EPYC, refuses: bf16 then runs unpacked)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(2, 2, dtype=torch.bfloat16), 2)
    except RuntimeError:
        return False
    return True


class PackedWeight:
    """A projection's weight [O, I] laid out once for the CPU GEMM library (``packing_library``):
    ``self(x)`` = ``F.linear(x, w)`` for x [..., I], without the per-call re-layout.
    oneDNN (bf16) gives F.linear's bits; MKL (fp32) differs from it in the last ulps."""

    def __init__(self, w: Tensor):
        lib = packing_library(w.dtype, w.device)
        if lib is None:
            raise ValueError(f"no CPU GEMM library packs {w.dtype} weights on {w.device}")
        self.lib, self.weight, self.out_features = lib, w, w.shape[0]
        self.packed = (torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT) if lib == "onednn"
                       else torch.ops.mkl._mkl_reorder_linear_weight(w, PACK_ROWS_HINT))

    def __call__(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [M, I]
        if self.lib == "onednn":
            y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, None, "none", [], "")
        else:
            y = torch.ops.mkl._mkl_linear(rows, self.packed, self.weight, None, rows.shape[0])
        return y.view(*x.shape[:-1], self.out_features)


Weight = Tensor | PackedWeight


def linear(x: Tensor, w: Weight) -> Tensor:
    """x [..., I] @ w.T [I, O] -> [..., O], with a plain or a packed weight.

    Batch invariance (what strict decoding in bf16 needs: a token's logits must not depend on
    how many tokens share its forward). Measured with torch 2.13's oneDNN, plain and packed
    (``results/beauty-llm/RUN.md``, ``results/beauty-smollm2/amx_invariance.py``):
    - on an AVX512-BF16 CPU without AMX every call of 2 or more rows gives each row the bits of
      any other such call, while a single row takes another path whose sums differ in the last
      bit for some rows of the 1536-wide down projection: there a single row is fed as two;
    - on an AMX CPU the kernel (and, with 2 threads, the split of the work) follows the call's
      row count: calls of up to 32 rows, of 48 and of 256 each sum differently from one
      another, while calls of exactly 64, 96 or 128 rows give every row the same bits, wherever
      it sits among them. There every call is cut into such calls (``amx_calls``), the last
      one padded with zero rows.
    """
    def project(rows: Tensor) -> Tensor:
        return w(rows) if isinstance(w, PackedWeight) else F.linear(rows, w)

    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return project(x)
    rows = x.reshape(-1, x.shape[-1])  # [M, I]
    if cpu_has_amx():
        sizes = amx_calls(rows.shape[0])
        padded = F.pad(rows, (0, 0, 0, sum(sizes) - rows.shape[0]))  # zero rows at the end
        parts = [project(part) for part in padded.split(sizes)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out[:rows.shape[0]].reshape(*x.shape[:-1], -1)
    if rows.shape[0] == 1:
        two = rows.expand(2, -1).contiguous()  # the GEMM path of every larger call
        return project(two)[:1].view(*x.shape[:-1], -1)
    return project(x)


AMX_CALL_ROWS = (64, 96, 128)  # row counts whose AMX bf16 GEMMs agree bit for bit (see linear)


def amx_calls(m: int) -> list[int]:
    """The row counts (each in ``AMX_CALL_ROWS``) of the calls that ``linear`` cuts m rows into
    on an AMX CPU: the fewest padded rows (m rounded up to 32, at least 64), then the fewest
    calls."""
    lo, hi = AMX_CALL_ROWS[0], AMX_CALL_ROWS[-1]
    total, sizes = max(lo, -(-m // 32) * 32), []
    while total > hi:  # whole calls of hi rows while what is left stays at least lo
        take = hi if total - hi >= lo else total - lo
        sizes.append(take)
        total -= take
    return sizes + [total]


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matmuls


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The native-bf16 flags (``CPU_BF16_FLAGS``) this CPU reports (empty if none or unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                      if ln.startswith("flags")), []))
    return [f for f in CPU_BF16_FLAGS if f in flags]


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX bf16 tiles (read once; ``linear`` asks on every bf16 call)."""
    return "amx_bf16" in cpu_bf16_flags()


def table_rows(rows: Tensor, ids: Tensor) -> Tensor:
    """Global token ids [...] -> rows of a compact embedding table (``models.COMPACT_VOCAB_KEY``):
    ``rows`` [V + 1] holds the row of every id below V and, last, the unknown row, which every
    id outside 0..V-1 reads."""
    n = rows.numel() - 1
    return rows[torch.where((ids >= 0) & (ids < n), ids, n)]


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


MIN_QUERY_ROWS = 4  # fp32 matmuls of fewer rows take other kernels on the CPU (see below)


def tree_key_slots(mask: Tensor, prompt_cols: int) -> Tensor:
    """mask [B, 1, Q, S] additive -> [B, Q, A] long: the key columns at or past ``prompt_cols``
    (tree nodes: ancestors and self) each query sees, in column order, padded with -1; A is the
    most any query sees (one host read)."""
    visible = mask[:, 0, :, prompt_cols:] == 0  # [B, Q, S_tree]
    n = visible.shape[-1]
    A = int(visible.sum(-1).max()) if n and visible.numel() else 0
    cols = torch.where(visible, torch.arange(n, device=mask.device), n)
    first = cols.sort(dim=-1).values[..., :A]  # [B, Q, A]
    return torch.where(first < n, first + prompt_cols, -1)


def invariant_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float,
                        prompt_cols: int | None = None, tree_slots: Tensor | None = None) -> Tensor:
    """Masked attention whose result for a query row depends only on that query and the keys it
    sees: not on how many other queries share the call, nor on where the keys it sees sit among
    masked ones. q [B, H, Q, D], k and v [B, H_kv, S, D] (H_kv divides H: grouped-query heads,
    query head h reads key head h // (H / H_kv)), mask [B, 1, Q, S] additive; the first
    ``prompt_cols`` key columns are the prompt block (every call lays it out alike; None: all S
    columns), the rest are tree nodes, of which each query sees the columns ``tree_slots``
    [B, Q, A] (``tree_key_slots``) -> [B, H, Q, D] in q's dtype.

    In fp32 (fp64 for fp64 inputs): the prompt block by plain matmuls over at least
    ``MIN_QUERY_ROWS`` query rows (a single query is repeated), then the tree keys one at a
    time in column order, so that the sums never depend on the tree's layout. Strict decoding
    in bf16 needs this: SDPA's CPU kernel blocks queries by the chunk's length and sums keys
    by their position in the cache, and either changes a row's last bits (measured:
    ``results/beauty-llm/RUN.md``), so a tree node's logits in a verification pass would
    differ from the same node's in a beam-search step.
    """
    Q, P = q.shape[2], mask.shape[-1] if prompt_cols is None else prompt_cols
    if tree_slots is None:
        tree_slots = torch.zeros(*mask.shape[:1], Q, 0, dtype=torch.long, device=q.device)
    if Q < MIN_QUERY_ROWS:  # the first query again, up to MIN_QUERY_ROWS rows
        pad = torch.zeros(MIN_QUERY_ROWS, dtype=torch.long, device=q.device)
        pad[:Q] = torch.arange(Q, device=q.device)
        q, mask, tree_slots = q[:, :, pad], mask[:, :, pad], tree_slots[:, pad]
    acc = torch.promote_types(q.dtype, torch.float32)
    B, H, Qp, D = q.shape
    Hkv, A = k.shape[1], tree_slots.shape[-1]
    G = H // Hkv
    q5 = q.to(acc).reshape(B, Hkv, G, Qp, D)  # the G query heads of each key head
    kf, vf = k.to(acc), v.to(acc)

    def per_key_head(x: Tensor) -> Tensor:  # [B, Hkv, G, Q', n] <-> [B, Hkv, G * Q', n]
        return x.reshape(B, Hkv, G * Qp, x.shape[-1])

    s_p = (per_key_head(q5) @ kf[:, :, :P].transpose(-1, -2)).view(B, Hkv, G, Qp, P)
    s_p = s_p * scale + mask[:, :, None, :, :P].to(acc)  # [B, Hkv, G, Q', P]
    m = s_p.amax(-1)  # [B, Hkv, G, Q']
    if A:  # the tree keys each query sees, gathered: [B, Hkv, Q', A, D]
        at = tree_slots.clamp(min=0).reshape(B, 1, Qp * A, 1).expand(B, Hkv, Qp * A, D)
        k_t, v_t = (x.gather(2, at).view(B, Hkv, 1, Qp, A, D) for x in (kf, vf))
        s_t = (q5[..., None, :] * k_t).sum(-1) * scale  # [B, Hkv, G, Q', A]
        s_t = s_t.masked_fill((tree_slots < 0)[:, None, None], float("-inf"))
        m = torch.maximum(m, s_t.amax(-1))
    e_p = torch.exp(s_p - m[..., None])
    # the sums over the prompt keys as one product with [v | 1]: a GEMM sums each output along
    # the keys in order, so the masked (exactly 0) columns of a left-padded prompt leave a row's
    # bits alone; a vectorised sum(-1) (or a matrix-vector product with a ones column alone)
    # groups the terms by lane, which the padding shifts
    ones = vf.new_ones(*vf.shape[:2], P, 1)
    both = (per_key_head(e_p) @ torch.cat([vf[:, :, :P], ones], -1)).view(B, Hkv, G, Qp, D + 1)
    num, den = both[..., :D], both[..., D]  # [B, Hkv, G, Q', D], [B, Hkv, G, Q']
    if A:
        e_t = torch.exp(s_t - m[..., None])
        for a in range(A):  # one key at a time, in column order: the sums ignore the layout
            den, num = den + e_t[..., a], num + e_t[..., a, None] * v_t[..., a, :]
    return (num / den[..., None]).view(B, H, Qp, D)[:, :, :Q].to(q.dtype)


def causal_mask(T: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[1, 1, T, T] additive causal mask (0 = attend, dtype min = blocked)."""
    blocked = ~torch.tril(torch.ones(T, T, dtype=torch.bool, device=device))
    return torch.zeros(T, T, dtype=dtype, device=device).masked_fill(
        blocked, torch.finfo(dtype).min)[None, None]


def uses_invariant_attention(x: Tensor) -> bool:
    """Where ``FastLlama`` runs ``invariant_attention`` instead of SDPA: on the CPU below fp32
    (in fp32 and fp64 SDPA's last-bit differences stay far below any score gap; on CUDA SDPA's
    fused kernels are kept)."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """As LlamaRMSNorm: normalised in fp32, scaled in the input dtype."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, h, D], cos/sin [B, T, 1, D]: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def pre_attention(x: Tensor, norm_w: Tensor, wqkv: Weight, cos: Tensor, sin: Tensor, eps: float,
                  H: int, Hkv: int) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's input [B, T, E] -> rotated q [B, H, T, D], k and v [B, Hkv, T, D]: the
    attention norm, the fused q|k|v projection and rope (pure: ``FastLlama.compile_step``)."""
    B, T, _ = x.shape
    qkv = linear(rms_norm(x, norm_w, eps), wqkv).view(B, T, H + 2 * Hkv, -1)
    qk = rope(qkv[:, :, : H + Hkv], cos, sin)  # q and k heads rotated together
    return (qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2),
            qkv[:, :, H + Hkv:].transpose(1, 2))


def post_attention(x: Tensor, attn: Tensor, wo: Weight, norm_w: Tensor, w_gate_up: Weight,
                   w_down: Weight, eps: float) -> Tensor:
    """The rest of a layer: x [B, Q, E] + o-proj(attn [B, Q, H * D]), then + MLP(norm(.))."""
    x = x + linear(attn, wo)
    gate, up = linear(rms_norm(x, norm_w, eps), w_gate_up).chunk(2, dim=-1)
    return x + linear(F.silu(gate) * up, w_down)


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
        self.pre_attention, self.post_attention = pre_attention, post_attention  # eager step
        self.compiled = False
        self.packed: dict[str, list[PackedWeight]] | None = None  # ``pack_weights``
        self.pack_wanted = False  # packed whenever the dtype and device allow (``pack_weights``)

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
        # [V] token id -> logit column of a code head or compact table (``Decoder.head_columns``)
        self.register_buffer("head_columns", None if rows is None else hf.head_columns.clone(),
                             persistent=False)
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
        if self.packed is not None:
            self.packed["lm_head"] = [PackedWeight(self.lm_head)]

    def new_cache(self, reserve: int = CACHE_RESERVE) -> KVCache:
        """An empty static cache (``KVCache``); ``reserve`` tree slots are kept free."""
        return KVCache(len(self.wqkv), reserve)

    def rms_norm(self, x: Tensor, weight: Tensor) -> Tensor:
        return rms_norm(x, weight, self.eps)

    def pack_weights(self) -> bool:
        """Lay every projection (q|k|v, o, gate|up, down, the LM head) out once for the CPU GEMM
        library (``PackedWeight``); the parameters stay as they are (the embedding reads them).
        Returns False where no library packs this dtype on this device (the forward then runs
        on the plain weights, and is packed again if ``.to()`` brings a dtype that packs), or
        when the step is compiled (inductor then lays weights out itself)."""
        if self.compiled:
            return False
        self.pack_wanted = True  # kept through .to(): packed again where the new dtype allows
        if packing_library(self.lm_head.dtype, self.lm_head.device) is None:
            self.packed = None
            return False
        self.packed = {name: [PackedWeight(w) for w in getattr(self, name)]
                       for name in ("wqkv", "wo", "w_gate_up", "w_down")}
        self.packed["lm_head"] = [PackedWeight(self.lm_head)]
        return True

    def _apply(self, fn, recurse: bool = True):  # .to(), .float(), ...: packed copies follow
        out = super()._apply(fn, recurse)
        if self.pack_wanted:
            self.pack_weights()
        return out

    def weight(self, name: str, i: int = 0) -> Weight:
        """Projection ``name`` of layer ``i`` (``lm_head``: i = 0), packed when packed."""
        if self.packed is not None:
            return self.packed[name][i]
        return self.lm_head if name == "lm_head" else getattr(self, name)[i]

    def compile_step(self, **options) -> None:
        """Run each layer's two dense blocks (norm + q|k|v + rope; o-proj + residual + norm +
        MLP) through ``torch.compile`` (dynamic shapes: one graph for every layer, chunk and
        cache length). Attention and the cache writes stay eager. ``options`` go to
        ``torch.compile`` (e.g. ``mode="reduce-overhead"`` on CUDA)."""
        self.packed, self.pack_wanted = None, False  # inductor lays the weights out itself
        self.pre_attention = torch.compile(pre_attention, dynamic=True, **options)
        self.post_attention = torch.compile(post_attention, dynamic=True, **options)
        self.compiled = True

    def attention(self, i: int, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                  cache: KVCache | None, rows: slice | Tensor = slice(None),
                  prompt_cols: int | None = None, tree_slots: Tensor | None = None) -> Tensor:
        """Attention of the query positions ``rows`` of the layer input ``x`` (not yet
        normalised; every position's K/V is computed and cached), before the output projection:
        [B, Q, H * D]. ``prompt_cols`` and ``tree_slots`` [B, T, A] (every position's) lay the
        keys out for ``invariant_attention``."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.pre_attention(x, self.norm_attn[i], self.weight("wqkv", i), cos, sin,
                                     self.eps, H, Hkv)
        if cache is not None:
            k, v = cache.append(i, k, v)  # [B, Hkv, S + T, D]
        q = q[:, :, rows]  # [B, H, Q, D]
        if mask is not None:
            mask = mask[:, :, rows]
        if uses_invariant_attention(q):  # grouped heads read their key head in place
            if mask is None:
                mask = causal_mask(q.shape[2], q.dtype, q.device)
            out = invariant_attention(q, k, v, mask, self.scaling, prompt_cols,
                                      None if tree_slots is None else tree_slots[:, rows])
        else:
            if Hkv != H:
                k = k.repeat_interleave(H // Hkv, dim=1)
                v = v.repeat_interleave(H // Hkv, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling,
                                                 is_causal=mask is None)
        return out.transpose(1, 2).reshape(B, q.shape[2], H * D)

    def decode(self, chunk: Chunk, cache: KVCache, hidden: bool = False, context: bool = False
               ) -> DecoderOutput:
        """The ``Decoder`` contract: one forward over ``chunk``, appended to ``cache``."""
        return self(chunk.tokens, chunk.mask, chunk.positions, cache, logits_to_keep=chunk.keep,
                    prompt_cols=chunk.prompt_cols, output_hidden=hidden, output_context=context)

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: KVCache | None = None,
                use_cache: bool = True, logits_to_keep: int | Tensor = 0,
                prompt_cols: int | None = None, output_hidden: bool = False,
                output_context: bool = False) -> DecoderOutput:
        """input_ids [B, T]; attention_mask [B, 1, T, S + T] additive (None: causal, no cache);
        position_ids [B, T]. ``cache`` is extended in place. ``logits_to_keep`` as in HF: the last
        n positions (0 = all) or a 1-D tensor of positions. ``prompt_cols``: the first key
        columns are a prompt block laid out alike in every call (``tree_forward`` says so; only
        ``invariant_attention`` reads it). ``output_hidden``: the last layer's hidden states
        (after the final norm) at the same positions too; ``output_context``: at every position
        (the last layer then runs every row)."""
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
        tree_slots = None
        if prompt_cols is not None and attention_mask is not None and uses_invariant_attention(x):
            tree_slots = tree_key_slots(attention_mask, prompt_cols)  # [B, T, A], all layers'
        else:
            prompt_cols = None
        n = len(self.wqkv)
        for i in range(n):
            last_rows = i == n - 1 and attention_mask is not None and not output_context
            q_rows = rows if last_rows else slice(None)
            attn = self.attention(i, x, cos, sin, attention_mask, cache if use_cache else None,
                                  q_rows, prompt_cols, tree_slots)
            x = self.post_attention(x[:, q_rows], attn, self.weight("wo", i), self.norm_mlp[i],
                                    self.weight("w_gate_up", i), self.weight("w_down", i),
                                    self.eps)
        every = self.rms_norm(x, self.norm_out) if output_context else None  # [B, Q, E]
        if attention_mask is None or output_context:
            x = x[:, rows]
        h = self.rms_norm(x, self.norm_out)  # [B, Q', E]
        return DecoderOutput(linear(h, self.weight("lm_head")), h if output_hidden else None, every)


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
