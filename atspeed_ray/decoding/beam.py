"""Trie-constrained beam search, batched over requests, on a tree-structured KV cache.

Scores follow HF's constrained beam search (and the AtSpeed reference code): log-softmax over the
full vocabulary, disallowed tokens removed, no renormalisation over the allowed set; a beam's
score is the sum of its tokens' log-probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.cache import TreeCache
from atspeed_ray.decoding.decoder import DecoderOutput, head_columns
from atspeed_ray.decoding.tree import Nodes, left_pad, tree_decode, tree_forward


@dataclass
class DecodeResult:
    items: list[list[int]]  # per request, K item ids, best first (-1 if fewer than K exist)
    sequences: Tensor  # [B, K, L] code tokens
    scores: Tensor  # [B, K] cumulative log-probabilities
    stats: dict[str, list[int]] = field(default_factory=dict)  # per request counters


def log_probs(logits: Tensor) -> Tensor:
    """Log-softmax in at least fp32 (bf16/fp16 logits are upcast; fp64 stays fp64)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1)


def take(x: Tensor, idx: Tensor) -> Tensor:
    """Gather rows along dim 1: x [B, M, ...], idx [B, W] -> [B, W, ...]."""
    view = idx.reshape(idx.shape + (1,) * (x.dim() - 2)).expand(idx.shape + x.shape[2:])
    return x.gather(1, view)


def row_slices(sizes: list[int]) -> list[slice]:
    """Consecutive row ranges of ``sizes`` rows each: [0, s0), [s0, s0 + s1), ..."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


@dataclass
class Candidates:
    """All one-token extensions of M beams under the trie, in a padded column space."""

    scores: Tensor  # [B, M * C] cumulative scores, -inf where the trie forbids the extension
    child: Tensor  # [B, M * C] trie node of each extension (-1 = forbidden)
    tokens: Tensor  # [B, C] token id of each column at this depth
    num_columns: int


def column_log_probs(logp: Tensor, depth: Tensor, index: ItemIndex, head: Tensor | None = None
                     ) -> Tensor:
    """logp [B, M, V] -> [B, M, C]: the log-probs of the C code tokens of depth [B] (the only
    ones a constrained step reads; C is the widest codebook, far below V for an LLM vocabulary).
    A code-head model's logp is [B, M, H] over its head; ``head`` [V] (``head_columns``) maps a
    token id to its column there."""
    B, M, _ = logp.shape
    tokens = index.column_tokens(depth)  # [B, C]
    if head is not None:  # padding columns (no child at any node) may miss the head: masked later
        tokens = head[tokens].clamp(min=0)
    return logp.gather(2, tokens[:, None, :].expand(B, M, tokens.shape[1]))


def check_code_head(model: torch.nn.Module, index: ItemIndex) -> None:
    """ValueError unless every code token of ``index`` has a column in ``model``'s code head."""
    head = head_columns(model)
    if head is None:
        return
    tokens = (index.token_column >= 0).nonzero()[:, 1].unique().to(head.device)  # code token ids
    missing = tokens[(tokens >= head.numel())]
    inside = tokens[tokens < head.numel()]
    missing = torch.cat([missing, inside[head[inside] < 0]])
    if missing.numel():
        raise ValueError(f"the draft's code head lacks {missing.numel()} code token(s) of the "
                         f"catalogue, e.g. id {int(missing[0])}: rebuild it from this data")


def expand_columns(col_logp: Tensor, scores: Tensor, node: Tensor, depth: Tensor,
                   index: ItemIndex) -> Candidates:
    """Column log-probs [B, M, C] (``column_log_probs``), beam scores [B, M], trie nodes [B, M],
    depth [B] -> candidates."""
    B, M, C = col_logp.shape
    tokens = index.column_tokens(depth)  # [B, C]
    child = index.child_table(node)  # [B, M, C]
    cand = (scores[..., None] + col_logp).masked_fill(child < 0, float("-inf"))
    return Candidates(cand.reshape(B, M * C), child.reshape(B, M * C), tokens, C)


def expand(logp: Tensor, scores: Tensor, node: Tensor, depth: Tensor, index: ItemIndex,
           head: Tensor | None = None) -> Candidates:
    """logp [B, M, V] (a code head's: [B, M, H], ``head`` its column map), beam scores [B, M],
    trie nodes [B, M], depth [B] -> candidates."""
    return expand_columns(column_log_probs(logp, depth, index, head), scores, node, depth, index)


@dataclass
class Step:
    """W chosen extensions."""

    parent: Tensor  # [B, W] index of the parent beam
    token: Tensor  # [B, W]
    score: Tensor  # [B, W] cumulative
    node: Tensor  # [B, W] trie node (-1 = dead)
    flat: Tensor  # [B, W] index into the candidates' flat space


def choose(cands: Candidates, key: Tensor, width: int) -> Step:
    """Take the ``width`` candidates with the largest ``key`` [B, M * C] (ties: lowest index)."""
    B, F = key.shape
    if F < width:  # fewer candidates than beams: pad with impossible ones
        pad = key.new_full((B, width - F), float("-inf"))
        key = torch.cat([key, pad], 1)
    # [B, W], sorted by key; a stable sort, because topk breaks ties in no fixed order (it
    # differs by the row's length: measured, bf16 logits tie often), and strict decoding must
    # keep the beams beam search keeps
    flat = key.sort(dim=1, descending=True, stable=True).indices[:, :width]
    ok = flat < F
    flat_c = flat.clamp(max=F - 1)
    C = cands.num_columns
    score = torch.where(ok, cands.scores.gather(1, flat_c), float("-inf"))
    node = torch.where(ok, cands.child.gather(1, flat_c), -1)
    token = cands.tokens.gather(1, flat_c % C)
    return Step(flat_c // C, token, score, node, flat_c)


def score_dtype(model: torch.nn.Module) -> torch.dtype:
    """Beam scores are kept in fp64 for fp64 models, else fp32 (what ``log_probs`` returns)."""
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def beam_step(cands: Candidates, width: int, noise: Tensor | None = None) -> Step:
    """Top-``width`` extensions; with Gumbel ``noise`` [B, M * C] (``noise.gumbel``) added to
    the cumulative sequence scores, ``width`` draws without replacement from their softmax
    (Gumbel top-k)."""
    return choose(cands, cands.scores if noise is None else cands.scores + noise, width)


@dataclass
class Beams:
    """M beams per request and where their tokens sit in each model's tree cache.

    Row operations (``select_rows``, ``split``, ``cat``, ``where_rows``) act on the request
    dimension B, ``take`` on the beam dimension M; every tensor field (and every cache's slots)
    moves together.
    """

    tokens: Tensor  # [B, M, L] code tokens (0 beyond the beam's depth)
    scores: Tensor  # [B, M] cumulative target log-probs (-inf = dead beam)
    node: Tensor  # [B, M] trie node
    slots: dict[str, Tensor]  # cache name -> [B, M, L] slot of the token at each depth (-1 = not cached)
    # [B, M, F] opaque to the core: the target's last-layer hidden state where it chose each
    # beam's last token (after the beam's parent; the prompt's end for a first code), kept for a
    # drafter that reads them (``Drafter.wants_features``); None where nobody asked
    features: Tensor | None = None

    def map(self, fn: Callable[[Tensor], Tensor]) -> Beams:
        """``fn`` applied to every tensor (tokens, scores, node, each cache's slots, features)."""
        return Beams(fn(self.tokens), fn(self.scores), fn(self.node),
                     {k: fn(v) for k, v in self.slots.items()},
                     None if self.features is None else fn(self.features))

    def take(self, idx: Tensor) -> Beams:
        """Beams ``idx`` [B, W] of each request -> [B, W, ...]."""
        return self.map(lambda x: take(x, idx))

    def select_rows(self, rows: Tensor | slice) -> Beams:
        """Requests ``rows`` only (an index tensor [B'] or a slice)."""
        return self.map(lambda x: x[rows])

    def to(self, device: torch.device) -> Beams:
        return self.map(lambda x: x.to(device))

    def split(self, sizes: list[int]) -> list[Beams]:
        """Consecutive groups of ``sizes`` requests (the inverse of ``Beams.cat``)."""
        return [self.select_rows(rows) for rows in row_slices(sizes)]

    @staticmethod
    def cat(parts: Sequence[Beams]) -> Beams:
        """The requests of ``parts`` stacked along the batch dimension (same M, L, caches)."""
        feats = [p.features for p in parts]
        return Beams(torch.cat([p.tokens for p in parts]), torch.cat([p.scores for p in parts]),
                     torch.cat([p.node for p in parts]),
                     {k: torch.cat([p.slots[k] for p in parts]) for k in parts[0].slots},
                     None if any(f is None for f in feats) else torch.cat(feats))  # type: ignore[arg-type]

    def where_rows(self, mask: Tensor, other: Beams) -> Beams:
        """Per request: these beams where ``mask`` [B], else ``other``'s."""
        def pick(x: Tensor, y: Tensor) -> Tensor:
            return torch.where(mask.view(-1, *([1] * (x.dim() - 1))), x, y)
        features = (None if self.features is None or other.features is None
                    else pick(self.features, other.features))
        return Beams(pick(self.tokens, other.tokens), pick(self.scores, other.scores),
                     pick(self.node, other.node),
                     {k: pick(v, other.slots[k]) for k, v in self.slots.items()}, features)

    def forget_slots(self) -> Beams:
        """The same beams with nothing cached anywhere (for a stateless forward)."""
        return replace(self, slots={k: torch.full_like(v, -1) for k, v in self.slots.items()})

    def extend(self, step: Step, depth: Tensor, features: Tensor | None = None) -> Beams:
        """The beams of ``step`` (children of self), their new token written at ``depth`` [B];
        ``features`` [B, W, F]: the target's where it chose them (None: not known)."""
        child = self.take(step.parent)
        at = depth[:, None, None].expand(-1, step.token.shape[1], 1)
        tokens = child.tokens.scatter(2, at, step.token[..., None])
        slots = {k: v.scatter(2, at, -1) for k, v in child.slots.items()}
        return Beams(tokens, step.score, step.node, slots, features)

    def with_slots(self, name: str, depth: Tensor, slot: Tensor) -> Beams:
        """Record that the token at ``depth`` [B] of each beam now sits in cache slot ``slot`` [B, M]."""
        at = depth[:, None, None].expand(-1, slot.shape[1], 1)
        slots = dict(self.slots)
        slots[name] = slots[name].scatter(2, at, slot[..., None])
        return replace(self, slots=slots)


def root_beams(B: int, K: int, L: int, names: list[str], device: torch.device,
               dtype: torch.dtype) -> Beams:
    """K beams per request at depth 0: beam 0 live with score 0, the others dead (as HF does)."""
    scores = torch.full((B, K), float("-inf"), dtype=dtype, device=device)
    scores[:, 0] = 0.0
    node = torch.zeros(B, K, dtype=torch.long, device=device)
    empty = torch.full((B, K, L), -1, dtype=torch.long, device=device)
    return Beams(torch.zeros(B, K, L, dtype=torch.long, device=device), scores, node,
                 {n: empty.clone() for n in names})


def step_nodes(beams: Beams, depth: Tensor, name: str) -> Nodes:
    """Nodes feeding each beam's token at ``depth`` [B] (its other tokens are cached)."""
    B, M, L = beams.tokens.shape
    tok = beams.tokens.gather(2, depth[:, None, None].expand(B, M, 1)).squeeze(-1)
    return Nodes(tok, depth[:, None].expand(B, M), torch.full_like(tok, -1), beams.slots[name],
                 torch.isfinite(beams.scores))


def pad_id_of(model: torch.nn.Module) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def empty_nodes(B: int, device: torch.device) -> Nodes:
    z = torch.zeros(B, 0, dtype=torch.long, device=device)
    return Nodes(z, z, z, z[..., None], z.bool())


def prefill(model: torch.nn.Module, prompts: list[list[int]], extra: Nodes | None = None,
            max_chain: int = 8) -> tuple[Tensor, TreeCache, Tensor, Tensor]:
    """``prefill_decode`` as logits: (last-prompt-token logits [B, V], cache, node logits
    [B, T, V], node slots [B, T])."""
    out, cache, slots = prefill_decode(model, prompts, extra, max_chain)
    return out.logits[:, 0], cache, out.logits[:, 1:], slots


def prefill_decode(model: torch.nn.Module, prompts: list[list[int]], extra: Nodes | None = None,
                   max_chain: int = 8, hidden: bool = False, context: bool = False
                   ) -> tuple[DecoderOutput, TreeCache, Tensor]:
    """Feed the prompts (plus optional tree nodes, whose in-chunk parent chains are at most
    ``max_chain`` long) in one forward.

    Returns (the decoder's output [B, 1 + T, ...]: the prompt's last token, then the nodes;
    with ``hidden``, hidden states too; with ``context``, ``.context`` [B, P + T, E] at every
    position, the left-padded prompt block first), the cache, node slots [B, T]).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    device = next(model.parameters()).device
    tokens, valid = left_pad(prompts, pad_id_of(model), device)
    nodes = extra if extra is not None else empty_nodes(len(prompts), device)
    return tree_decode(model, None, nodes, prompt=(tokens, valid), max_chain=max_chain,
                       hidden=hidden, context=context)


def finish(beams: Beams, index: ItemIndex, stats: dict[str, list[int]] | None = None) -> DecodeResult:
    items = index.items_of(beams.tokens)  # [B, K]
    items = torch.where(torch.isfinite(beams.scores), items, -1)
    return DecodeResult(items.tolist(), beams.tokens, beams.scores, stats or {})


StepObserver = Callable[[int, dict[str, Candidates]], None]


@torch.no_grad()
def beam_search(model: torch.nn.Module, prompts: list[list[int]], index: ItemIndex, k: int,
                followers: dict[str, torch.nn.Module] | None = None,
                observe: StepObserver | None = None) -> DecodeResult:
    """Top-``k`` items per prompt by trie-constrained beam search: L forwards of ``model``.

    ``followers`` (name -> model) are fed the same beams, each in its own cache, and score the
    same candidates; ``observe(d, candidates)`` sees every model's candidates at each depth d
    (``model``'s under the name "target"). Neither changes the result."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = next(model.parameters()).device
    index = index.to(device)
    models = {"target": model, **(followers or {})}
    for m in models.values():
        check_code_head(m, index)
    # a code-head model searches over its own (head-normalised) scores
    heads = {name: head_columns(m) for name, m in models.items()}
    B, L = len(prompts), index.L
    logp, caches = {}, {}
    for name, m in models.items():
        last_logits, caches[name], _, _ = prefill(m, prompts)
        logp[name] = log_probs(last_logits)[:, None, :]  # [B, 1, V] one live root per request
    beams = root_beams(B, 1, L, list(models), device, score_dtype(model))
    for d in range(L):
        depth = torch.full((B,), d, dtype=torch.long, device=device)
        cands = {name: expand(logp[name], beams.scores, beams.node, depth, index, heads[name])
                 for name in models}
        if observe is not None:
            observe(d, cands)
        step = beam_step(cands["target"], k)
        beams = beams.extend(step, depth)
        if d == L - 1:
            break
        for name, m in models.items():
            logits, caches[name], slots = tree_forward(m, caches[name], step_nodes(beams, depth, name),
                                                       max_chain=0)
            beams = beams.with_slots(name, depth, slots)
            logp[name] = log_probs(logits)  # [B, K, V]
    calls = [L] * B
    return finish(beams, index, {"target_calls": calls})
