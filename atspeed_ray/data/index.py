"""Item index: item id <-> semantic-ID code tokens, and the prefix trie of valid IDs.

Pure torch. Trie nodes have global ids: inner nodes (depth 0..L-1, root = 0) come first, then the
leaves (depth L, one per distinct code tuple). Every depth d has a padded column space of
``C = max_d C_d`` candidate tokens, so that one gather serves beams at mixed depths:

* ``level_tokens``  [L, C]          token id of column c at depth d (padding columns hold 0)
* ``children``      [N_inner + 1, C] child node id through column c, or -1. The extra last row is
                                     all -1: it serves leaves and dead beams (node id -1).
* ``token_column``  [L, V_max]      column of token v at depth d, or -1 (the inverse map)
* ``leaf_item``     [N_leaves]      representative item of each leaf

This is what makes trie masks vectorised: the allowed next tokens of M beams are one gather,
``children[node] >= 0`` ([M, C]), with no Python loop over beams.

Collisions (several items sharing one code tuple; the Beauty index has 9 groups,
21 items: 7 pairs, a triple and a quadruple): a generative
recommender cannot tell such items apart, since it only ever emits the code tuple. The trie keeps
one leaf per tuple and decoding returns the group's *representative*, the smallest item id.
``ItemIndex.collisions`` lists the groups and ``canonical()`` maps any item to its representative,
so that evaluation compares like with like. Nothing is dropped: every item stays in ``codes_of``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from atspeed_ray.data.errors import DataError


@dataclass
class ItemIndex:
    item_ids: Tensor  # [I] long, sorted ascending
    codes: Tensor  # [I, L] long token ids, row i belongs to item_ids[i]
    level_tokens: Tensor  # [L, C] long
    children: Tensor  # [N_inner + 1, C] long
    token_column: Tensor  # [L, V_max] long
    leaf_item: Tensor  # [N_leaves] long
    item_leaf: Tensor  # [I] long, leaf number (0-based among leaves) of each item row
    collisions: list[list[int]]  # groups of item ids sharing one code tuple

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_codes(cls, mapping: Mapping[int, Sequence[int]]) -> "ItemIndex":
        """Build from ``{item_id: [token_id, ...]}`` (model token ids, all of the same length L)."""
        if not mapping:
            raise DataError("item index is empty: at least one item with a semantic ID is needed")
        lengths = {len(v) for v in mapping.values()}
        if len(lengths) != 1:
            by_len: dict[int, int] = {}
            for item, v in mapping.items():
                by_len.setdefault(len(v), int(item))
            detail = ", ".join(f"length {n} (e.g. item {i})" for n, i in sorted(by_len.items()))
            raise DataError(f"semantic IDs must all have the same length; found {detail}")
        L = lengths.pop()
        if L < 1:
            raise DataError("semantic IDs must have at least one code token")
        items = sorted(int(k) for k in mapping)
        if items[0] < 0:
            raise DataError(f"item ids must be >= 0, got {items[0]}")
        item_ids = torch.tensor(items, dtype=torch.long)
        codes = torch.tensor([[int(t) for t in mapping[i]] for i in items], dtype=torch.long)
        if (codes < 0).any():
            bad = items[int((codes < 0).any(1).nonzero()[0])]
            raise DataError(f"item {bad}: token ids must be >= 0")
        return cls._build(item_ids, codes)

    @classmethod
    def _build(cls, item_ids: Tensor, codes: Tensor) -> "ItemIndex":
        I, L = codes.shape
        per_level = [torch.unique(codes[:, d], return_inverse=True) for d in range(L)]
        C = max(len(toks) for toks, _ in per_level)
        level_tokens = torch.zeros(L, C, dtype=torch.long)
        token_column = torch.full((L, int(codes.max()) + 1), -1, dtype=torch.long)
        edges = []  # per depth: (parent local id [E], column [E], child local id [E])
        node = torch.zeros(I, dtype=torch.long)  # local id (within its depth) of each item's prefix
        counts = [1]
        for d, (toks, col) in enumerate(per_level):
            level_tokens[d, : len(toks)] = toks
            token_column[d, toks] = torch.arange(len(toks))
            pair = node * C + col  # [I] unique (parent, column) pairs are the children
            uniq, child = torch.unique(pair, return_inverse=True)
            edges.append((uniq // C, uniq % C, torch.arange(len(uniq))))
            node = child
            counts.append(len(uniq))
        offsets = torch.tensor([0] + counts).cumsum(0)  # global id of the first node of each depth
        n_inner = int(offsets[L])
        children = torch.full((n_inner + 1, C), -1, dtype=torch.long)
        for d, (parent, col, child) in enumerate(edges):
            children[offsets[d] + parent, col] = offsets[d + 1] + child
        # node is now the leaf number of each item. Representative = smallest item id in the leaf.
        n_leaves = counts[L]
        leaf_item = torch.full((n_leaves,), torch.iinfo(torch.long).max, dtype=torch.long)
        leaf_item.scatter_reduce_(0, node, item_ids, reduce="amin")
        per_leaf = torch.bincount(node, minlength=n_leaves)
        collisions = [
            item_ids[node == leaf].tolist() for leaf in (per_leaf > 1).nonzero().flatten().tolist()
        ]
        return cls(item_ids, codes, level_tokens, children, token_column, leaf_item, node, collisions)

    # ------------------------------------------------------------------ basic facts
    @property
    def L(self) -> int:
        return self.codes.shape[1]

    @property
    def num_items(self) -> int:
        return self.codes.shape[0]

    @property
    def num_leaves(self) -> int:
        return self.leaf_item.shape[0]

    @property
    def num_inner(self) -> int:
        return self.children.shape[0] - 1

    @property
    def num_columns(self) -> int:
        return self.level_tokens.shape[1]

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, device: torch.device | str) -> "ItemIndex":
        device = torch.device(device)
        if device == self.device:
            return self
        mv = lambda t: t.to(device)  # noqa: E731
        return ItemIndex(
            mv(self.item_ids), mv(self.codes), mv(self.level_tokens), mv(self.children),
            mv(self.token_column), mv(self.leaf_item), mv(self.item_leaf), self.collisions,
        )

    # ------------------------------------------------------------------ item <-> codes
    def rows_of(self, items: Tensor | Sequence[int]) -> Tensor:
        """Row of each item id ([...] long); raises KeyError naming the first unknown item."""
        items = torch.as_tensor(items, dtype=torch.long, device=self.device)
        row = torch.searchsorted(self.item_ids, items.clamp(min=0))
        row = row.clamp(max=self.num_items - 1)
        ok = (self.item_ids[row] == items) & (items >= 0)
        if not bool(ok.all()):
            raise KeyError(f"item {int(items[~ok].flatten()[0])} is not in the item index")
        return row

    def contains(self, items: Tensor | Sequence[int]) -> Tensor:
        items = torch.as_tensor(items, dtype=torch.long, device=self.device)
        row = torch.searchsorted(self.item_ids, items.clamp(min=0)).clamp(max=self.num_items - 1)
        return (self.item_ids[row] == items) & (items >= 0)

    def codes_of(self, items: Tensor | Sequence[int]) -> Tensor:
        """[...] item ids -> [..., L] code token ids."""
        return self.codes[self.rows_of(items)]

    def canonical(self, items: Tensor | Sequence[int]) -> Tensor:
        """Map each item to the representative of its code tuple (itself unless it collides)."""
        return self.leaf_item[self.item_leaf[self.rows_of(items)]]

    def items_of(self, sequences: Tensor) -> Tensor:
        """[..., L] code token ids -> [...] representative item ids, -1 where no item has them."""
        node = self.prefix_nodes(sequences.reshape(-1, self.L).to(self.device))
        return self.leaf_items_of(node).reshape(sequences.shape[:-1])

    def leaf_items_of(self, node: Tensor) -> Tensor:
        """[...] node ids -> representative item ids, -1 for anything that is not a leaf."""
        leaf = node - self.num_inner
        ok = (leaf >= 0) & (leaf < self.num_leaves)
        return torch.where(ok, self.leaf_item[leaf.clamp(0, self.num_leaves - 1)], -1)

    # ------------------------------------------------------------------ trie (hot path)
    def child_table(self, node: Tensor) -> Tensor:
        """[...] node ids (-1 = dead) -> [..., C] child node ids through each column (-1 = none)."""
        dead = (node < 0) | (node >= self.num_inner)
        return self.children[torch.where(dead, self.num_inner, node)]

    def column_tokens(self, depth: Tensor | int) -> Tensor:
        """Depth(s) [...] -> [..., C] token id of every column at that depth."""
        return self.level_tokens[depth]

    def columns_of(self, tokens: Tensor, depth: Tensor | int) -> Tensor:
        """Token ids [...] at depth(s) [...] -> their column, -1 if no item uses them there."""
        V = self.token_column.shape[1]
        ok = (tokens >= 0) & (tokens < V)
        depth = torch.as_tensor(depth, device=self.device).expand_as(tokens)
        col = self.token_column[depth, tokens.clamp(0, V - 1)]
        return torch.where(ok, col, -1)

    def advance(self, node: Tensor, tokens: Tensor, depth: Tensor | int) -> Tensor:
        """Follow ``tokens`` [...] from ``node`` [...] at ``depth``; -1 where the edge is missing."""
        col = self.columns_of(tokens, depth)
        nxt = self.child_table(node).gather(-1, col.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(col >= 0, nxt, -1)

    def allowed_mask(self, node: Tensor, depth: int, vocab_size: int) -> Tensor:
        """[M] node ids at ``depth`` -> [M, vocab_size] bool mask of allowed next tokens."""
        mask = torch.zeros(node.shape[0], vocab_size + 1, dtype=torch.bool, device=self.device)
        ok = self.child_table(node) >= 0  # [M, C]
        mask.scatter_(1, torch.where(ok, self.level_tokens[depth], vocab_size), ok)
        return mask[:, :vocab_size]

    def prefix_nodes(self, prefixes: Tensor) -> Tensor:
        """[M, t] code-token prefixes -> [M] node ids at depth t (-1 if not a valid prefix)."""
        node = torch.zeros(prefixes.shape[0], dtype=torch.long, device=self.device)
        for d in range(prefixes.shape[1]):
            node = self.advance(node, prefixes[:, d], d)
        return node
