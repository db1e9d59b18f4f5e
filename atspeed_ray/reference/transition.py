"""Item transitions (a reference method): what followed the user's recent items in the train
sequences.

Fit: for every train sequence s and every gap g = 1..max_gap, the pair (s[p], s[p + g]) adds
1/g to ``W[s[p], s[p + g]]``: an item that came right after counts 1, two steps later 1/2, ...

Score of item x for a history h (oldest first): the j-th most recent of its last ``recent``
items (j = 0 for the last one) votes with weight decay**j::

    score(x) = sum_j decay**j * W[h[-1 - j], x]

Ranking: items with a positive score by score, ties by train popularity, then by smaller item
id; then, to fill K, the remaining items in popularity order (the back-off: popularity is the
ranking of an empty vote, and using it as the tie-break makes the two one order rather than
two lists glued together). With ``skip_history`` no item of h is ever returned.

Pure numpy; ``W`` is stored as sorted rows (CSR), so a score touches only the followers of at
most ``recent`` items.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from atspeed_ray.reference.config import TransitionConfig


@dataclass
class TransitionModel:
    indptr: np.ndarray  # [I + 1] int64: followers of item a are follower[indptr[a]:indptr[a + 1]]
    follower: np.ndarray  # [E] int64 follower item ids, sorted within each row
    weight: np.ndarray  # [E] float64 sum of 1/gap over the pair's occurrences
    popularity: np.ndarray  # [I] int64 occurrences of each item in the train sequences
    allowed: np.ndarray  # [I] bool items that may be recommended
    config: TransitionConfig

    @property
    def num_items(self) -> int:
        return len(self.popularity)


def fit_transitions(sequences: Sequence[Sequence[int]], allowed: np.ndarray,
                    config: TransitionConfig | None = None) -> TransitionModel:
    """Count gap-weighted transitions of ``sequences`` (item ids < len(allowed), oldest first)."""
    cfg = config or TransitionConfig()
    n = len(allowed)
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences if len(s)]
    src, dst, w = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0)]
    for s in seqs:
        for g in range(1, min(cfg.max_gap, len(s) - 1) + 1):
            src.append(s[:-g])
            dst.append(s[g:])
            w.append(np.full(len(s) - g, 1.0 / g))
    key = np.concatenate(src) * n + np.concatenate(dst)  # [P] one key per (source, follower)
    pairs, inverse = np.unique(key, return_inverse=True)  # sorted by source, then follower
    weight = np.bincount(inverse, weights=np.concatenate(w), minlength=len(pairs))
    indptr = np.searchsorted(pairs // n, np.arange(n + 1))
    flat = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    popularity = np.bincount(flat, minlength=n).astype(np.int64)
    return TransitionModel(indptr, pairs % n, weight, popularity, np.asarray(allowed, bool), cfg)


def transition_scores(model: TransitionModel, history: Sequence[int]) -> np.ndarray:
    """[I] float64 score of every item for one history (see the module docstring)."""
    cfg = model.config
    scores = np.zeros(model.num_items)
    for j, item in enumerate(reversed(list(history)[-cfg.recent:])):
        lo, hi = model.indptr[item], model.indptr[item + 1]
        scores[model.follower[lo:hi]] += cfg.decay ** j * model.weight[lo:hi]  # followers are unique
    return scores


def popularity_order(popularity: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Allowed item ids, most popular first, ties by smaller id (the order of ``popularity_topk``)."""
    order = np.lexsort((np.arange(len(popularity)), -popularity))
    return order[allowed[order]]


def rank_transitions(model: TransitionModel, histories: Sequence[Sequence[int]], k: int,
                     skip_history: bool = True) -> list[list[int]]:
    """Top-``k`` item ids for each history (fewer only if fewer items may be recommended)."""
    backoff = popularity_order(model.popularity, model.allowed)
    out = []
    for history in histories:
        scores = transition_scores(model, history)
        banned = set(map(int, history)) if skip_history else set()
        cand = np.flatnonzero((scores > 0) & model.allowed)
        cand = cand[np.lexsort((cand, -model.popularity[cand], -scores[cand]))]
        ranked = [int(i) for i in cand if int(i) not in banned][:k]
        chosen = banned | set(ranked)
        for i in backoff:
            if len(ranked) >= k:
                break
            if int(i) not in chosen:
                ranked.append(int(i))
        out.append(ranked)
    return out
