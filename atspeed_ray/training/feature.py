"""Training a feature draft (``drafts/feature.py``, ``align --draft-kind feature``).

The teacher is the target's own top-K beam search, level by level (``target_tree``): at every
depth the K beams, their scores and trie nodes, the target's hidden state after each (where it
scores the next code) and its column log-probs for that next code. This is exactly what strict
verification compares with: the draft must rank the children of the target's K beams so that the
target's top K among them fall in the draft's top N.

At each depth d >= 1 the draft reads, for every beam, the feature where its last code was chosen
and that code, and is trained on

* ``losses.candidate_kl``: the KL divergence from the target's to the draft's distribution over
  the K x C candidate extensions (beam score + log-prob of the code, the trie's invalid ones
  removed): the sequence-level distribution a beam step ranks by;
* ``losses.feature_regression``: its predicted hidden state against the target's (weight
  ``feature_weight``);

once from the target's own feature of the parent (a round that starts at this depth) and once
from each of its own earlier predictions along the path (a round that started higher up and
drafted down to here: the unrolled steps EAGLE-3 and HASS train on).

``width_needed`` is the validation measure: per depth, the draft width whose top N hold the
target's top K (``benchmarking.cover_width``), from the target's feature (the first drafted
step of a round) and unrolled from one level up.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.decoding.beam import (
    beam_step, column_log_probs, expand_columns, log_probs, prefill_decode, root_beams,
    score_dtype, step_nodes, take,
)
from atspeed_ray.decoding.feed import Context, prompt_valid
from atspeed_ray.decoding.tree import tree_decode
from atspeed_ray.drafts.feature import FeatureConfig, FeatureDraft, PathKV
from atspeed_ray.training.losses import candidate_kl, feature_regression


@dataclass
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
        return Level(*(mv(getattr(self, f)) for f in self.__dataclass_fields__))


@dataclass
class TargetTree:
    """``target_tree`` of a batch of prompts: its levels and the prompts' hidden states."""

    levels: list[Level]  # depth 0..L-1
    context: Context  # the target's hidden states over the (left-padded) prompts

    def to(self, device: torch.device | str) -> TargetTree:
        return TargetTree([lv.to(device) for lv in self.levels], self.context.to(device))


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
    """For each depth d >= 1 (list index d - 1), start depth s -> (the draft's predicted hidden
    states [B, K, E], its column log-probs [B, K, C]) for a round that started at depth s
    (s = d: from the target's feature of the parent; s < d: unrolled from its own)."""
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
            f, logp, path = draft.step(feature, last, pos, past, ctx)
            res[s] = (f, column_log_probs(logp, pos + 1, index, draft.head_columns))
            now[s] = (f, path)
        own = now
        out.append(res)
    return out


def tree_loss(draft: FeatureDraft, tree: TargetTree, index: ItemIndex,
              feature_weight: float) -> tuple[Tensor, dict[str, float]]:
    """The training loss of one batch of target trees (module docstring) and its parts."""
    total, parts, n = 0.0, {"kl": 0.0, "feature": 0.0}, 0
    for d, res in enumerate(draft_levels(draft, tree, index), start=1):
        lv = tree.levels[d]
        valid = index.child_table(lv.node) >= 0  # [B, K, C]
        live = torch.isfinite(lv.scores)  # [B, K]
        for f, col in res.values():
            kl = candidate_kl(lv.scores.float(), lv.col_logp.float(), col, valid)
            reg = feature_regression(f, lv.feature, live)
            total = total + kl + feature_weight * reg
            parts["kl"] += float(kl.detach())
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


@dataclass(frozen=True)
class FeatureTraining:
    """What ``train_feature_draft`` runs (``align --draft-kind feature`` fills it)."""

    k: int = 10  # the target's top-K the draft learns to hold
    layers: int = 1
    heads: int = 4
    intermediate: int = 0  # 0: 2 x hidden
    epochs: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 16  # prompts per step
    feature_weight: float = 0.1
    max_samples: int | None = 2000  # training prompts (the teacher's cost: L target passes each)
    val_samples: int = 64
    seed: int = 0


def teacher_trees(target: torch.nn.Module, prompts: list[list[int]], index: ItemIndex, k: int,
                  batch_size: int, label: str) -> list[TargetTree]:
    """``target_tree`` of ``prompts`` in batches of similar lengths (prompts are left-padded to
    the longest of their batch), kept on the CPU; progress lines on stdout."""
    out, t0 = [], time.perf_counter()
    prompts = sorted(prompts, key=len)
    n = math.ceil(len(prompts) / batch_size)
    for i in range(n):
        out.append(target_tree(target, prompts[i * batch_size:(i + 1) * batch_size], index,
                               k).to("cpu"))
        if (i + 1) % max(1, n // 10) == 0 or i + 1 == n:
            print(f"[feature] {label} teacher {i + 1}/{n} batches, {time.perf_counter() - t0:.0f} s",
                  flush=True)
    return out


def train_feature_draft(target: torch.nn.Module, index: ItemIndex, train: list[list[int]],
                        valid: list[list[int]], cfg: FeatureTraining, out: Path) -> dict:
    """Train a fresh ``FeatureDraft`` on ``target`` (an HF causal LM, frozen) in process and save
    it to ``out`` with ``training.json`` (per epoch: losses and the widths the codes need on the
    validation prompts)."""
    torch.manual_seed(cfg.seed)
    device = next(target.parameters()).device
    E = target.config.hidden_size
    draft = FeatureDraft.from_target(target, index, FeatureConfig(
        hidden=E, layers=cfg.layers, heads=cfg.heads, intermediate=cfg.intermediate)).float()
    index = index.to(device)
    train_trees = teacher_trees(target, train[:cfg.max_samples], index, cfg.k, cfg.batch_size, "train")
    val_trees = teacher_trees(target, valid[:cfg.val_samples], index, cfg.k, cfg.batch_size, "valid")
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    steps = cfg.epochs * len(train_trees)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(1, steps))
    history = []

    def validate() -> dict[str, float]:
        draft.eval()
        widths: dict[str, list[int]] = {}
        for tree in val_trees:
            for name, w in width_needed(draft, tree.to(device), index, cfg.k).items():
                widths.setdefault(name, []).extend(w)
        draft.train()
        return {f"{name}_width_median": float(statistics.median_high(w)) for name, w in widths.items()}

    print(f"[feature] before training: {validate()}", flush=True)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        order = torch.randperm(len(train_trees)).tolist()
        sums = {"loss": 0.0, "kl": 0.0, "feature": 0.0}
        for tree in (train_trees[i] for i in order):
            loss, parts = tree_loss(draft, tree.to(device), index, cfg.feature_weight)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
            opt.step()
            sched.step()
            sums["loss"] += float(loss.detach())
            for key, v in parts.items():
                sums[key] += v
        rec = {"epoch": epoch, **{key: v / len(train_trees) for key, v in sums.items()},
               **validate(), "epoch_seconds": time.perf_counter() - t0}
        history.append(rec)
        print("[feature] epoch {epoch}/{n}: ".format(epoch=epoch, n=cfg.epochs)
              + ", ".join(f"{key} {v:.4g}" for key, v in rec.items() if key != "epoch"), flush=True)
    draft.eval().save(out)
    result = {"config": cfg.__dict__, "train_prompts": len(train[:cfg.max_samples]),
              "epochs": history}
    (out / "training.json").write_text(json.dumps(result, indent=2))
    return result
