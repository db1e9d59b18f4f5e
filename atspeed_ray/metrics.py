"""Top-K metrics against a target *set* per user, as in the LC-Rec / AtSpeed evaluation.

For one user with ranked list r and target set T (|T| >= 1):

* Recall@K = |r[:K] ∩ T| / |T|
* NDCG@K   = DCG / IDCG, DCG = sum over hits at 0-based rank j < K of 1 / log2(j + 2),
             IDCG = the DCG of min(|T|, K) hits at ranks 0, 1, ...

Both are averaged over users. An item repeated in r counts once (at its first rank), so that a
ranking with duplicates (e.g. after mapping colliding items to one representative) cannot score
more than one hit per target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _hit_ranks(ranked: Sequence[int], targets: Sequence[int], k: int) -> list[int]:
    """0-based ranks < k at which a not-yet-hit target appears."""
    todo, hits = set(targets), []
    for j, item in enumerate(ranked[:k]):
        if item in todo:
            todo.discard(item)
            hits.append(j)
    return hits


def _check(ranked: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], k: int) -> None:
    if len(ranked) != len(targets):
        raise ValueError(f"{len(ranked)} rankings but {len(targets)} target lists")
    if not ranked:
        raise ValueError("no users to evaluate")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if any(len(t) == 0 for t in targets):
        raise ValueError("every user needs at least one target item")


def recall_at_k(ranked: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], k: int) -> float:
    """Mean over users of |top-k ∩ targets| / |targets|."""
    _check(ranked, targets, k)
    return sum(len(_hit_ranks(r, t, k)) / len(set(t)) for r, t in zip(ranked, targets)) / len(ranked)


def ndcg_at_k(ranked: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], k: int) -> float:
    """Mean over users of DCG@k / IDCG@k with binary relevance."""
    _check(ranked, targets, k)
    total = 0.0
    for r, t in zip(ranked, targets):
        dcg = sum(1.0 / math.log2(j + 2) for j in _hit_ranks(r, t, k))
        idcg = sum(1.0 / math.log2(j + 2) for j in range(min(len(set(t)), k)))
        total += dcg / idcg
    return total / len(ranked)


def evaluate_rankings(
    ranked: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], ks: Sequence[int] = (5, 10, 20)
) -> dict[str, float]:
    """``{"recall@5": ..., "ndcg@5": ..., ...}`` for each k in ``ks``."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranked, targets, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranked, targets, k)
    return out


def cover_width(target_scores: "torch.Tensor", draft_scores: "torch.Tensor", k: int) -> "torch.Tensor":
    """target_scores, draft_scores [B, F] (the same candidates, -inf where the trie forbids one)
    -> [B]: the smallest N whose top N by the draft's score hold all of the target's top k
    (0 for a request without a live candidate): the draft width a strict beam step needs
    (``benchmarking.code_cover``, ``training.feature.width_needed``)."""
    import torch

    kk = min(k, target_scores.shape[1])
    top = target_scores.topk(kk, dim=1)  # the target's top kk candidates
    order = draft_scores.argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1).gather(1, top.indices) + 1  # [B, kk] the draft's rank (1 = best)
    return torch.where(torch.isfinite(top.values), rank, 0).max(dim=1).values
