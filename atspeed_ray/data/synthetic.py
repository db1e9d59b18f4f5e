"""Seeded synthetic data in the release format: the built-in default data set.

Generative story (all randomness from one ``numpy`` generator seeded by ``config.seed``):

* Items live in *clusters*: each cluster is one distinct level-2 ID prefix ``(a, b)`` (level-1 only
  when L == 2). Clusters share level-1 codes, so the ID is hierarchical; the remaining L-2 codes are
  distinct within a cluster, so every item has a unique semantic ID.
* Popularity: item weights follow a Zipf law over a random ranking (``zipf_exponent``); cluster
  weight = sum of its item weights.
* Users hold ``interests_per_user`` clusters (drawn by cluster weight). At each step, with
  probability ``drift_prob`` one interest is replaced by a new cluster (slow drift). The next item is
  in the previous item's cluster with probability ``stay_prob`` (and then, with probability
  ``successor_prob``, it is the previous item's fixed successor: an item-to-item transition a model
  can learn), in a random cluster with probability ``explore_prob``, else in one of the user's
  interests. Within a cluster items are drawn by popularity; a user never repeats an item.
* Time: each user is active in a random window of a global clock. As in the paper, the last
  ``test_frac`` of all interactions (by global time) go to test, the ``valid_frac`` before to
  validation, the rest to train; users with fewer than 2 train interactions are dropped (counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from atspeed_ray.data.release import write_release
from atspeed_ray.data.tokenizer import code_token


class SyntheticConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_items: int = Field(600, ge=2)
    num_users: int = Field(1500, ge=1)
    L: int = Field(4, ge=2, le=26)
    codebook_sizes: list[int] = Field(default_factory=lambda: [16, 16, 16, 16])  # length L
    items_per_cluster: float = Field(12.0, gt=0)  # mean items per level-2 prefix
    min_seq_len: int = Field(5, ge=2)
    max_seq_len: int = Field(30, ge=2)
    zipf_exponent: float = Field(1.0, ge=0)
    interests_per_user: int = Field(3, ge=1)
    stay_prob: float = Field(0.6, ge=0, le=1)
    successor_prob: float = Field(0.5, ge=0, le=1)
    explore_prob: float = Field(0.05, ge=0, le=1)
    drift_prob: float = Field(0.03, ge=0, le=1)
    valid_frac: float = Field(0.1, ge=0, lt=1)
    test_frac: float = Field(0.1, ge=0, lt=1)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _default_codebooks(cls, data: Any) -> Any:
        if isinstance(data, dict) and "codebook_sizes" not in data and "L" in data:
            data = {**data, "codebook_sizes": [16] * int(data["L"])}
        return data

    @model_validator(mode="after")
    def _check(self) -> "SyntheticConfig":
        if len(self.codebook_sizes) != self.L:
            raise ValueError(f"codebook_sizes has {len(self.codebook_sizes)} entries, expected L={self.L}")
        if min(self.codebook_sizes) < 1:
            raise ValueError("codebook sizes must be >= 1")
        if self.max_seq_len < self.min_seq_len:
            raise ValueError("max_seq_len must be >= min_seq_len")
        if self.stay_prob + self.explore_prob > 1:
            raise ValueError("stay_prob + explore_prob must be <= 1")
        if self.valid_frac + self.test_frac >= 1:
            raise ValueError("valid_frac + test_frac must be < 1")
        P = self.prefix_len
        if math.prod(self.codebook_sizes[:P]) < self.num_clusters:
            raise ValueError(f"{self.num_clusters} clusters do not fit in {self.codebook_sizes[:P]} prefixes")
        if math.prod(self.codebook_sizes[P:]) * self.num_clusters < self.num_items:
            raise ValueError(f"{self.num_items} items do not fit in codebooks {self.codebook_sizes}")
        return self

    @property
    def prefix_len(self) -> int:
        """Length of the cluster prefix: 2 (level-2 prefix), or 1 when L == 2."""
        return min(2, self.L - 1)

    @property
    def num_clusters(self) -> int:
        return max(1, min(self.num_items, round(self.num_items / self.items_per_cluster)))


@dataclass
class Synthetic:
    config: SyntheticConfig
    item_codes: dict[int, list[str]]  # item -> L code strings
    item_cluster: dict[int, int]  # item -> cluster id (one per level-2 prefix)
    train: dict[int, list[int]]
    valid: dict[int, list[int]]
    test: dict[int, list[int]]
    stats: dict[str, int] = field(default_factory=dict)


def _items(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Item codes [I, L] (row = item id) and cluster [I]."""
    cb, P, K, I = cfg.codebook_sizes, cfg.prefix_len, cfg.num_clusters, cfg.num_items
    prefixes = np.stack(np.unravel_index(rng.choice(math.prod(cb[:P]), K, replace=False), cb[:P]), 1)
    S = math.prod(cb[P:])  # suffixes available per cluster
    sizes = np.ones(K, dtype=np.int64) + rng.multinomial(I - K, rng.dirichlet(np.full(K, 2.0)))
    while (sizes > S).any():  # move overflow to clusters with room
        over = int(np.argmax(sizes))
        room = np.flatnonzero(sizes < S)
        sizes[over] -= 1
        sizes[rng.choice(room)] += 1
    cluster = np.repeat(np.arange(K), sizes)  # [I], rows grouped by cluster
    suffix = np.concatenate([rng.choice(S, n, replace=False) for n in sizes])
    codes = np.concatenate([prefixes[cluster], np.stack(np.unravel_index(suffix, cb[P:]), 1)], 1)
    perm = rng.permutation(I)  # item id of each row: ids are not ordered by cluster
    out_codes, out_cluster = np.empty_like(codes), np.empty_like(cluster)
    out_codes[perm], out_cluster[perm] = codes, cluster
    return out_codes, out_cluster


@dataclass
class _Catalog:
    """The item side of the generative story: clusters, popularity and successors."""

    cluster: np.ndarray  # [I] cluster of each item
    members: list[np.ndarray]  # K arrays: the items of each cluster
    weight: np.ndarray  # [I] Zipf popularity
    cluster_p: np.ndarray  # [K] cluster popularity (sums of item weights, normalised)
    successor: np.ndarray  # [I] the item's fixed successor (a cycle within each cluster)

    def pick(self, rng: np.random.Generator, items: np.ndarray, seen: set[int]) -> int | None:
        """An unseen item of ``items`` drawn by popularity (None if all were seen)."""
        items = np.array([i for i in items if i not in seen], dtype=np.int64)
        if len(items) == 0:
            return None
        w = self.weight[items]
        return int(rng.choice(items, p=w / w.sum()))


def _catalog(cfg: SyntheticConfig, rng: np.random.Generator, cluster: np.ndarray) -> _Catalog:
    I, K = cfg.num_items, cfg.num_clusters
    w = (rng.permutation(I) + 1.0) ** -cfg.zipf_exponent  # [I] Zipf popularity
    members = [np.flatnonzero(cluster == k) for k in range(K)]
    cw = np.array([w[m].sum() for m in members])
    succ = np.arange(I)
    for m in members:  # a random cycle within each cluster: item -> its successor
        order = rng.permutation(m)
        succ[order] = np.roll(order, -1)
    return _Catalog(cluster, members, w, cw / cw.sum(), succ)


def _user_sequence(cfg: SyntheticConfig, rng: np.random.Generator, cat: _Catalog) -> list[int]:
    """One user's items in order (interests, drift, stay/successor/explore moves; no repeats)."""
    K = cfg.num_clusters
    n = int(rng.integers(cfg.min_seq_len, cfg.max_seq_len + 1))
    interests = list(rng.choice(K, min(cfg.interests_per_user, K), replace=False, p=cat.cluster_p))
    seq: list[int] = []
    seen: set[int] = set()
    for _step in range(n):
        if rng.random() < cfg.drift_prob:
            interests[int(rng.integers(len(interests)))] = int(rng.choice(K, p=cat.cluster_p))
        r, prev = rng.random(), (seq[-1] if seq else None)
        item = None
        if prev is None:  # first item: from an interest
            pass
        elif r < cfg.stay_prob:
            if rng.random() < cfg.successor_prob and int(cat.successor[prev]) not in seen:
                item = int(cat.successor[prev])
            else:
                item = cat.pick(rng, cat.members[cat.cluster[prev]], seen)
        elif r < cfg.stay_prob + cfg.explore_prob:
            item = cat.pick(rng, cat.members[int(rng.choice(K, p=cat.cluster_p))], seen)
        if item is None:
            item = cat.pick(rng, cat.members[interests[int(rng.integers(len(interests)))]], seen)
        if item is None:  # the cluster is exhausted for this user: any unseen item
            item = cat.pick(rng, np.arange(cfg.num_items), seen)
        if item is None:
            break
        seq.append(item)
        seen.add(item)
    return seq


def _time_split(cfg: SyntheticConfig, rng: np.random.Generator, seqs: list[list[int]]) -> np.ndarray:
    """Split of every event, users concatenated (0 train, 1 valid, 2 test): each user is active
    in a random window of a global clock; the last events by global time go to test."""
    times = []
    for seq in seqs:
        span = rng.uniform(0.3, 1.0)
        start = rng.uniform(0.0, 1.0 - span)
        times.append(np.sort(start + rng.uniform(0.0, span, len(seq))))
    flat = np.concatenate(times)
    rank = np.empty(len(flat), dtype=np.int64)
    rank[np.argsort(flat, kind="stable")] = np.arange(len(flat))
    n_test, n_valid = round(cfg.test_frac * len(flat)), round(cfg.valid_frac * len(flat))
    return np.where(rank >= len(flat) - n_test, 2, np.where(rank >= len(flat) - n_test - n_valid, 1, 0))


def synthesize(config: SyntheticConfig | None = None) -> Synthetic:
    """Generate items, user sequences and the time split (deterministic for ``config.seed``)."""
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    codes, cluster = _items(cfg, rng)
    cat = _catalog(cfg, rng, cluster)
    seqs = [_user_sequence(cfg, rng, cat) for _ in range(cfg.num_users)]
    split = _time_split(cfg, rng, seqs)
    train: dict[int, list[int]] = {}
    valid: dict[int, list[int]] = {}
    test: dict[int, list[int]] = {}
    dropped, pos = 0, 0
    for seq in seqs:
        s = split[pos:pos + len(seq)]
        pos += len(seq)
        parts = [[i for i, x in zip(seq, s) if x == j] for j in range(3)]
        if len(parts[0]) < 2:
            dropped += 1
            continue
        u = len(train)
        train[u], valid[u], test[u] = parts
    I = cfg.num_items
    item_codes = {i: [code_token(d, int(c)) for d, c in enumerate(codes[i])] for i in range(I)}
    stats = {
        "generated_users": cfg.num_users,
        "users": len(train),
        "dropped_users_lt2_train": dropped,
        "clusters": cfg.num_clusters,
        "train_interactions": sum(map(len, train.values())),
        "valid_interactions": sum(map(len, valid.values())),
        "test_interactions": sum(map(len, test.values())),
    }
    return Synthetic(cfg, item_codes, {i: int(cluster[i]) for i in range(I)}, train, valid, test, stats)


def generate_synthetic(out_dir: str | Path, config: SyntheticConfig | None = None) -> Path:
    """Write the synthetic data set as a release folder (``sequential_*.txt`` + ``synthetic.json``)."""
    syn = synthesize(config)
    return write_release(out_dir, syn.item_codes, syn.train, syn.valid, syn.test, "synthetic.json")
