"""Training a feature draft (``drafts/feature.py``, ``align --draft-kind feature``).

The teacher is the target's own top-K beam search, level by level (``target_tree``): at every
depth the K beams, their scores and trie nodes, the target's hidden state after each (where it
scores the next code) and its column log-probs for that next code. This is exactly what strict
verification compares with: the draft must rank the children of the target's K beams so that the
target's top K among them fall in the draft's top N.

At each depth d >= 1 the draft reads, for every beam, the feature where its last code was chosen
and that code, and is trained on the align term of its objective (``--loss``, ``FEATURE_LOSSES``)

* ``atspeed-s`` (strict verification), ``losses.candidate_kl``: the KL divergence from the
  target's to the draft's distribution over the K x C candidate extensions (beam score + log-prob
  of the code, the trie's invalid ones removed): the sequence-level distribution a beam step ranks;
* ``atspeed-r`` (relaxed verification), ``losses.beam_tvd``: the total variation between the
  target's and the draft's next-code distributions after each of the target's beams (AtSpeed-R's
  TVD on the teacher sequences);

plus ``losses.feature_regression``: its predicted hidden state against the target's (weight
``feature_weight``); once from the target's own feature of the parent (a round that starts at
this depth) and once from each of its own earlier predictions along the path (a round that
started higher up and drafted down to here: the unrolled steps EAGLE-3 and HASS train on).

Training runs in the shared loop (``training.loop.run``, in process or on Ray Train + DeepSpeed):
a sample is a prompt, a batch is the target's trees of its prompts (``TreeTeacher``: the frozen
target on every worker computes each prompt's tree once and keeps it), the objective is
``FeatureObjective``.

``width_needed`` is the validation measure: per depth, the draft width whose top N hold the
target's top K (``benchmarking.cover_width``), from the target's feature (the first drafted
step of a round) and unrolled from one level up.
"""

from __future__ import annotations

import hashlib
import os
import statistics
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.beam import (
    beam_step, column_log_probs, expand_columns, log_probs, prefill_decode, root_beams,
    score_dtype, step_nodes, take,
)
from atspeed_ray.decoding.feed import Context, prompt_valid
from atspeed_ray.decoding.tree import tree_decode
from atspeed_ray.drafts.feature import FeatureConfig, FeatureDraft, PathKV
from atspeed_ray.training.losses import beam_tvd, candidate_kl, feature_regression


@dataclass(frozen=True)
class Level:
    """The target's beams holding d codes, over a batch of B prompts (M = 1 at d = 0, else K)."""

    tokens: Tensor  # [B, M, L]
    scores: Tensor  # [B, M] cumulative target log-probs (-inf: dead)
    node: Tensor  # [B, M] trie node
    parent: Tensor  # [B, M] index among the beams of depth d - 1 (zeros at d = 0)
    feature: Tensor  # [B, M, E] the target's hidden state after each beam
    col_logp: Tensor  # [B, M, C] the target's column log-probs for code d + 1

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Level:
        def mv(x: Tensor) -> Tensor:
            return x.to(device, dtype) if (dtype is not None and x.is_floating_point()) else x.to(device)
        return Level(*(mv(getattr(self, f.name)) for f in fields(self)))

    def rows(self, b: slice) -> Level:
        """The prompts ``b`` of the batch (copies: they do not hold the batch's storage)."""
        return Level(*(getattr(self, f.name)[b].clone() for f in fields(self)))

    @staticmethod
    def cat(levels: Sequence[Level]) -> Level:
        """The same depth of several batches, as one batch."""
        return Level(*(torch.cat([getattr(lv, f.name) for lv in levels]) for f in fields(Level)))


@dataclass(frozen=True)
class TargetTree:
    """``target_tree`` of a batch of prompts: its levels and the prompts' hidden states."""

    levels: list[Level]  # depth 0..L-1
    context: Context  # the target's hidden states over the (left-padded) prompts

    @property
    def size(self) -> int:
        """B, the prompts of the batch."""
        return self.context.valid.shape[0]

    def to(self, device: torch.device | str) -> TargetTree:
        return TargetTree([lv.to(device) for lv in self.levels], self.context.to(device))

    def split(self) -> list[TargetTree]:
        """One tree per prompt, its context cut to the prompt's own tokens (no padding)."""
        out = []
        for b in range(self.size):
            n = int(self.context.valid[b].sum())  # left padding: the last n columns are real
            P = self.context.valid.shape[1]
            ctx = Context(self.context.features[b:b + 1, P - n:].clone(),
                          self.context.valid[b:b + 1, P - n:].clone())
            out.append(TargetTree([lv.rows(slice(b, b + 1)) for lv in self.levels], ctx))
        return out

    @staticmethod
    def stack(trees: Sequence[TargetTree]) -> TargetTree:
        """Trees (of one or more prompts each) as one batch, the contexts left-padded again."""
        if not trees:
            raise ValueError("no trees to stack")
        P = max(t.context.valid.shape[1] for t in trees)
        pad = [P - t.context.valid.shape[1] for t in trees]
        ctx = Context(torch.cat([F.pad(t.context.features, (0, 0, n, 0)) for t, n in zip(trees, pad)]),
                      torch.cat([F.pad(t.context.valid, (n, 0), value=False) for t, n in zip(trees, pad)]))
        return TargetTree([Level.cat([t.levels[d] for t in trees]) for d in range(len(trees[0].levels))],
                          ctx)


@torch.no_grad()
def target_tree(target: torch.nn.Module, prompts: list[list[int]], index: ItemIndex, k: int
                ) -> TargetTree:
    """The target's top-``k`` beam search of ``prompts`` (``beam_search``'s loop) with what a
    feature draft learns from, per depth 0..L-1 (``Level``), and the prompts' hidden states."""
    device = next(target.parameters()).device
    index = index.to(device)
    B, L = len(prompts), index.L
    out, cache, _ = prefill_decode(target, prompts, hidden=True, context=True)
    assert out.hidden is not None and out.context is not None
    P = cache.prompt_cols
    context = Context(out.context[:, :P].float(), prompt_valid(prompts, P, device))
    feature, logp = out.hidden[:, :1], log_probs(out.logits[:, :1])  # [B, 1, ...] prompt end
    beams = root_beams(B, 1, L, ["target"], device, score_dtype(target))
    parent = torch.zeros(B, 1, dtype=torch.long, device=device)
    levels: list[Level] = []
    for d in range(L):
        depth = torch.full((B,), d, dtype=torch.long, device=device)
        col = column_log_probs(logp, depth, index)  # [B, M, C]
        levels.append(Level(beams.tokens, beams.scores, beams.node, parent, feature.float(), col))
        if d == L - 1:
            break
        step = beam_step(expand_columns(col, beams.scores, beams.node, depth, index), k)
        beams, parent = beams.extend(step, depth), step.parent
        out, cache, slots = tree_decode(target, cache, step_nodes(beams, depth, "target"),
                                        max_chain=0, hidden=True)
        assert out.hidden is not None
        beams = beams.with_slots("target", depth, slots)
        feature, logp = out.hidden, log_probs(out.logits)
    return TargetTree(levels, context)


def draft_levels(draft: FeatureDraft, tree: TargetTree, index: ItemIndex
                 ) -> list[dict[int, tuple[Tensor, Tensor]]]:
    """``draft`` (a ``FeatureDraft``, or a DeepSpeed engine around one: its forward is the
    draft's ``step``) over ``tree``: for each depth d >= 1 (list index d - 1), start depth s ->
    (the draft's predicted hidden states [B, K, E], its column log-probs [B, K, C]) for a round
    that started at depth s (s = d: from the target's feature of the parent; s < d: unrolled
    from its own)."""
    out: list[dict[int, tuple[Tensor, Tensor]]] = []
    own: dict[int, tuple[Tensor, PathKV]] = {}
    levels, ctx = tree.levels, draft.context_kv(tree.context)
    for d in range(1, len(levels)):
        lv, prev = levels[d], levels[d - 1]
        B = lv.parent.shape[0]
        pos = torch.full((B,), d - 1, dtype=torch.long, device=lv.parent.device)
        last = lv.tokens[..., d - 1]  # [B, K]
        starts: dict[int, tuple[Tensor, PathKV | None]] = {d: (take(prev.feature, lv.parent), None)}
        for s, (f, path) in own.items():
            starts[s] = (take(f, lv.parent), [(take(a, lv.parent), take(b, lv.parent)) for a, b in path])
        now, res = {}, {}
        for s, (feature, past) in starts.items():
            f, logp, path = draft(feature, last, pos, past, ctx)  # its forward: step
            res[s] = (f, column_log_probs(logp, pos + 1, index, draft.head_columns))
            now[s] = (f, path)
        own = now
        out.append(res)
    return out


# the align term of each objective a feature draft trains with (``align --draft-kind feature
# --loss NAME``): scores [B, K], p_logp / q_logp / valid [B, K, C], temperature -> a scalar
FEATURE_LOSSES: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]] = {
    "atspeed-s": candidate_kl,
    "atspeed-r": beam_tvd,
}


def tree_loss(draft: FeatureDraft, tree: TargetTree, index: ItemIndex, feature_weight: float,
              loss: str = "atspeed-s", temperature: float = 1.0
              ) -> tuple[Tensor, dict[str, float]]:
    """The training loss of one batch of target trees (module docstring) and its parts: the
    align term of ``loss`` (``FEATURE_LOSSES``) + ``feature_weight`` x the feature regression,
    averaged over the depths and the starts of the unrolled rounds."""
    if loss not in FEATURE_LOSSES:
        raise ValueError(f"a feature draft trains with --loss {' or '.join(FEATURE_LOSSES)}, "
                         f"not {loss!r}")
    term = FEATURE_LOSSES[loss]
    total, parts, n = 0.0, {"align": 0.0, "feature": 0.0}, 0
    for d, res in enumerate(draft_levels(draft, tree, index), start=1):
        lv = tree.levels[d]
        valid = index.child_table(lv.node) >= 0  # [B, K, C]
        live = torch.isfinite(lv.scores)  # [B, K]
        for f, col in res.values():
            align = term(lv.scores.float(), lv.col_logp.float(), col, valid, temperature)
            reg = feature_regression(f, lv.feature, live)
            total = total + align + feature_weight * reg
            parts["align"] += float(align.detach())
            parts["feature"] += float(reg.detach())
            n += 1
    return total / n, {k: v / n for k, v in parts.items()}


@torch.no_grad()
def width_needed(draft: FeatureDraft, tree: TargetTree, index: ItemIndex, k: int
                 ) -> dict[str, list[int]]:
    """Per depth d >= 1, per prompt: the draft width whose top N hold the target's top ``k``
    children (``cover_width``), for a round's first drafted step (``code{d+1}_first``: from the
    target's feature) and for its second (``code{d+1}_unrolled``: from the draft's own, one
    level up)."""
    from atspeed_ray.metrics import cover_width

    out: dict[str, list[int]] = {}
    for d, res in enumerate(draft_levels(draft, tree, index), start=1):
        lv = tree.levels[d]
        valid = index.child_table(lv.node) >= 0
        target = (lv.scores[..., None] + lv.col_logp).masked_fill(~valid, float("-inf")).flatten(1)
        for s, name in ((d, "first"), (d - 1, "unrolled")):
            if s in res:
                cand = (lv.scores[..., None] + res[s][1]).masked_fill(~valid, float("-inf"))
                out[f"code{d + 1}_{name}"] = cover_width(target.float(), cand.flatten(1).float(), k).tolist()
    return out




def width_medians(draft: FeatureDraft, trees: Sequence[TargetTree], index: ItemIndex, k: int
                  ) -> dict[str, float]:
    """``code{d}_{first,unrolled}_width_median`` over the prompts of ``trees`` (``width_needed``)."""
    widths: dict[str, list[int]] = {}
    for tree in trees:
        for name, w in width_needed(draft, tree, index, k).items():
            widths.setdefault(name, []).extend(w)
    return {f"{name}_width_median": float(statistics.median_high(w)) for name, w in widths.items()}


# ---------------------------------------------------------------------------- in the shared loop
FEATURE_MAX_SAMPLES = 2000  # training prompts when --max-samples is not given (L target passes each)


def fresh_feature_draft(target: torch.nn.Module, index: ItemIndex, layers: int) -> FeatureDraft:
    """A fresh fp32 ``FeatureDraft`` over ``target`` (its hidden size and head count)."""
    c = target.config
    return FeatureDraft.from_target(target, index, FeatureConfig(
        hidden=c.hidden_size, layers=layers, heads=c.num_attention_heads)).float()


class TreeTeacher:
    """The frozen ``target``'s trees (``target_tree``, top ``k``) of the prompts of a batch: each
    prompt's tree is computed once, kept on the CPU (``TargetTree.split``) and stacked again into
    any later batch that holds the prompt (every epoch reshuffles the batches). ``use_cache``
    keeps them in a safetensors file for later runs (``tree_cache_key``)."""

    def __init__(self, target: torch.nn.Module, index: ItemIndex, k: int):
        self.target, self.index, self.k = target, index, k
        self.trees: dict[tuple[int, ...], TargetTree] = {}

    def batch(self, prompts: Sequence[Sequence[int]]) -> TargetTree:
        """The trees of ``prompts`` as one batch, on the CPU."""
        keys = [tuple(p) for p in prompts]
        self.compute(list(dict.fromkeys(key for key in keys if key not in self.trees)))
        return TargetTree.stack([self.trees[key] for key in keys])

    def compute(self, prompts: Sequence[Sequence[int]]) -> None:
        """Run the target over ``prompts`` (in one batch) and keep their trees."""
        if prompts:
            tree = target_tree(self.target, [list(p) for p in prompts], self.index, self.k)
            self.trees.update(zip((tuple(p) for p in prompts), tree.to("cpu").split()))

    def use_cache(self, folder: Path, key: str, prompts: Sequence[Sequence[int]],
                  batch_size: int) -> tuple[int, int, Path]:
        """Load the trees cached under ``folder`` for ``key`` (``tree_cache_key``), compute those of
        ``prompts`` it lacks (batches of ``batch_size`` similar lengths) and, if any, write the
        union back (atomically: workers that fill the same file at once leave one whole copy).
        Returns (trees loaded, trees computed, the file)."""
        path = folder / f"trees-{key[:24]}.safetensors"
        loaded = self.load(path, key) if path.is_file() else 0
        missing = sorted({tuple(p) for p in prompts} - set(self.trees), key=lambda p: (len(p), p))
        for i in range(0, len(missing), batch_size):
            self.compute(missing[i:i + batch_size])
        if missing:
            self.save(path, key)
        return loaded, len(missing), path

    def save(self, path: Path, key: str) -> None:
        """All kept trees in one safetensors file: the prompts and their contexts ragged (flat
        tokens / features and lengths), every field of every level stacked over the prompts."""
        from safetensors.torch import save_file

        prompts = list(self.trees)
        trees = [self.trees[p] for p in prompts]
        tensors = {
            "prompt_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.long),
            "prompt_tokens": torch.tensor([t for p in prompts for t in p], dtype=torch.long),
            "context": torch.cat([t.context.features[0] for t in trees]),  # [sum of lengths, E]
        }
        for d in range(len(trees[0].levels)):
            for f in fields(Level):
                tensors[f"level{d}.{f.name}"] = torch.cat([getattr(t.levels[d], f.name) for t in trees])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({n: v.contiguous() for n, v in tensors.items()}, str(tmp),
                  metadata={"key": key, "k": str(self.k)})
        os.replace(tmp, path)

    def load(self, path: Path, key: str) -> int:
        """Add the trees of ``path`` (written by ``save`` for ``key``); returns how many."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != key:
            raise ValueError(f"{path}: teacher trees of another target, item index or K "
                             f"(key {meta.get('key', 'none')[:24]}, expected {key[:24]})")
        t = load_file(str(path))
        lengths = t["prompt_lengths"].tolist()
        starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        depths = sorted({int(n.split(".")[0][5:]) for n in t if n.startswith("level")})
        for i, n in enumerate(lengths):
            a, b = starts[i], starts[i + 1]
            levels = [Level(*(t[f"level{d}.{f.name}"][i:i + 1] for f in fields(Level))) for d in depths]
            ctx = Context(t["context"][None, a:b], torch.ones(1, n, dtype=torch.bool))
            self.trees[tuple(t["prompt_tokens"][a:b].tolist())] = TargetTree(levels, ctx)
        return len(lengths)


def tree_cache_key(target_dir: str | Path, index: ItemIndex, k: int) -> str:
    """What teacher trees depend on: the target's weights and config (the bytes of its files),
    the item index (its codes) and K; sha256 hex. The prompts are stored with their trees."""
    h = hashlib.sha256(f"atspeed-ray teacher trees v1, k={k}\n".encode())
    files = sorted(f for f in Path(target_dir).iterdir() if f.is_file() and (
        f.suffix in (".safetensors", ".bin") or f.name == "config.json"))
    if not any(f.suffix in (".safetensors", ".bin") for f in files):
        raise FileNotFoundError(f"{target_dir}: no weights (*.safetensors, *.bin) to key the "
                                f"teacher trees by")
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    h.update(index.item_ids.cpu().numpy().tobytes())
    h.update(index.codes.cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class FeatureObjective:
    """The loop's objective for a feature draft: ``tree_loss`` of a batch of trees."""

    index: ItemIndex
    loss: str  # FEATURE_LOSSES
    feature_weight: float
    temperature: float = 1.0

    def __call__(self, model: torch.nn.Module, batch: TargetTree) -> tuple[Tensor, dict[str, float]]:
        return tree_loss(model, batch, self.index, self.feature_weight, self.loss,  # type: ignore[arg-type]
                         self.temperature)
