"""Whole-sequence next-item training: one forward per user window instead of one per prefix.

The prepared train split holds one row per prefix of a user's training sequence (prompt = the
last ``history_len`` items before the target). Training on those rows recomputes the early
items of a user once per later item. Here a user's sequence ``s_1 .. s_m`` is fed once::

    prompt(s_1 .. s_m) = [prefix] codes(s_1) <sep> codes(s_2) <sep> ... codes(s_m) <sep>

and the L codes of every item ``s_2 .. s_m`` are predicted from the tokens before them, in one
causal forward. The logits predicting item ``s_i`` then see exactly the tokens of the per-prefix
prompt of ``s_i`` (same tokens, same position ids), so the objective is the per-prefix one.

Window rule: a user with more than ``history_len + 1`` items is cut into windows of at most
``history_len + 1`` items that overlap by one item (items ``0..h``, ``h..2h``, ...; 0-based);
each window predicts all of its items but the first, so every target item is predicted exactly
once. The first window's targets see the same history as their per-prefix samples; a later
window's target at offset k sees k items instead of ``history_len``. For users with at most
``history_len + 1`` training items (most users of the Amazon sets) the two objectives are equal.

Weighting: the loss of a batch is the mean cross-entropy over every predicted code of every
target item (each item has L codes), i.e. the mean over items of the per-item loss; the
per-prefix loop averages the same per-item loss over its samples (one item each).

This only holds for prompt templates where the prompt of a shorter history is a prefix of the
prompt of a longer one (plain history, or a fixed instruction before it); a template that puts
text after the history (``instruction``, ``chat``) is refused with a clear error, and
``samples="auto"`` then trains on the per-prefix rows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


# ---------------------------------------------------------------------------- layout
class TemplateError(ValueError):
    """The prompt template puts text after the history: whole sequences do not apply."""


@dataclass(frozen=True)
class Layout:
    """Where the codes of history item k sit in a prompt: ``offset + k * stride + j``."""

    offset: int  # tokens before the first item (bos, instruction)
    stride: int  # tokens per item (L codes + separator)
    L: int

    @classmethod
    def of(cls, fmt, L: int) -> "Layout":
        """Check that ``fmt.encode`` writes items at a fixed stride after a fixed prefix."""
        a, b = list(range(1, L + 1)), list(range(L + 1, 2 * L + 1))  # two dummy items
        p0, p1, p2 = fmt.encode([]), fmt.encode([a]), fmt.encode([a, b])
        offset, stride = len(p0), len(p1) - len(p0)
        ok = (stride >= L and len(p2) == offset + 2 * stride and p2[:len(p1)] == p1
              and p1[:offset] == p0 and p1[offset:offset + L] == a
              and p2[offset + stride:offset + stride + L] == b)
        if not ok:
            raise TemplateError("samples='sequence' needs a prompt template in which the prompt of a "
                             "shorter history is a prefix of a longer one's (nothing after the "
                             "history); this prepared folder's template is not: use samples='prefix'")
        return cls(offset, stride, L)


# ---------------------------------------------------------------------------- samples
@dataclass
class Sequences:
    """N training windows (at most ``history_len + 1`` items of one user each)."""

    users: np.ndarray  # [N] int64
    tokens: list[list[int]]  # N input token lists (up to the last target's second-to-last code)
    starts: list[np.ndarray]  # N x [n_i] int64 position of the first code of each target item
    codes: list[np.ndarray]  # N x [n_i, L] int64 code tokens of each target item

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, idx: Sequence[int] | np.ndarray) -> "Sequences":
        idx = np.asarray(idx, dtype=np.int64)
        pick = lambda x: [x[i] for i in idx] if isinstance(x, list) else x[idx]  # noqa: E731
        return Sequences(*(pick(getattr(self, f.name)) for f in fields(self)))

    def lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens])

    def num_items(self) -> int:
        return sum(len(s) for s in self.starts)


def user_sequences(users: Sequence[int], histories: Sequence[Sequence[int]],
                   targets: Sequence[Sequence[int]]) -> dict[int, list[int]]:
    """Each user's whole training sequence from the per-prefix rows: the first row's history
    followed by every row's target, in row order (rows of a user are contiguous and in order)."""
    out: dict[int, list[int]] = {}
    prev = None
    for row, (u, h, t) in enumerate(zip(users, histories, targets)):
        if u != prev:
            if u in out:
                raise ValueError(f"train row {row}: the rows of user {u} are not contiguous")
            out[u] = list(h)
            prev = u
        elif list(h[-1:]) != out[u][-1:]:
            raise ValueError(f"train row {row}: user {u}'s history does not end with the previous "
                             "row's target; not a per-prefix train split")
        out[u].append(int(t[0]))
    return out


def windows(seq: Sequence[int], history_len: int) -> list[list[int]]:
    """Windows of at most ``history_len + 1`` items overlapping by one (see the module doc)."""
    h = history_len
    return [list(seq[s:s + h + 1]) for s in range(0, max(len(seq) - 1, 1), h)]


def build_sequences(prepared, split: str = "train") -> Sequences:
    """The windows of every user of ``split`` (a per-prefix split written by ``prepare``)."""
    index, fmt = prepared.index, prepared.prompt_format
    h = int(prepared.summary.get("history_len", 20))
    layout = Layout.of(fmt, index.L)
    seqs = user_sequences(prepared.users(split), prepared.histories(split), prepared.targets(split))
    users, tokens, starts, codes = [], [], [], []
    for u, seq in seqs.items():
        for win in windows(seq, h):
            if len(win) < 2:
                continue
            c = index.codes_of(win).cpu().numpy().astype(np.int64)  # [n + 1, L]
            pos = layout.offset + layout.stride * np.arange(1, len(win))  # [n]
            toks = fmt.encode(c.tolist())[: int(pos[-1]) + layout.L - 1]
            users.append(u)
            tokens.append(toks)
            starts.append(pos)
            codes.append(c[1:])
    return Sequences(np.array(users, dtype=np.int64), tokens, starts, codes)


# ---------------------------------------------------------------------------- batches
@dataclass
class SequenceBatch:
    """B right-padded windows; I target items in all; Q kept logit positions."""

    input_ids: Tensor  # [B, T]
    keep: Tensor  # [Q] positions whose logits are computed (union over rows)
    row: Tensor  # [I] batch row of each target item
    qidx: Tensor  # [I, L] index into the Q kept positions of the logits predicting code j
    codes: Tensor  # [I, L] target code tokens

    @property
    def size(self) -> int:
        """Training samples in the batch: target items, as in the per-prefix loop."""
        return self.codes.shape[0]

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(*(getattr(self, f.name).to(device) for f in fields(self)))


def collate_sequences(seqs: Sequences, idx: Sequence[int] | np.ndarray, pad_id: int) -> SequenceBatch:
    """Windows ``idx`` -> a right-padded batch (pads come after every real token, so causal
    attention alone keeps them out of every logit that is read)."""
    idx = np.asarray(idx, dtype=np.int64)
    T = max(len(seqs.tokens[i]) for i in idx)
    input_ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
    rows, pos, codes = [], [], []
    for b, i in enumerate(idx):
        input_ids[b, :len(seqs.tokens[i])] = torch.as_tensor(seqs.tokens[i], dtype=torch.long)
        starts = torch.as_tensor(seqs.starts[i], dtype=torch.long)  # [n]
        L = seqs.codes[i].shape[1]
        pos.append(starts[:, None] - 1 + torch.arange(L))  # [n, L] logits predicting code j
        rows.append(torch.full((len(starts),), b, dtype=torch.long))
        codes.append(torch.as_tensor(seqs.codes[i], dtype=torch.long))
    pos_all = torch.cat(pos)  # [I, L]
    keep, qidx = torch.unique(pos_all, return_inverse=True)  # sorted union, [I, L] into it
    return SequenceBatch(input_ids, keep, torch.cat(rows), qidx, torch.cat(codes))


def forward_sequences(model: torch.nn.Module, batch: SequenceBatch) -> Tensor:
    """Logits predicting every code of every target item: [I, L, V] (one causal forward)."""
    T = batch.input_ids.shape[1]
    position_ids = torch.arange(T, device=batch.input_ids.device).expand_as(batch.input_ids)
    out = model(input_ids=batch.input_ids, position_ids=position_ids, logits_to_keep=batch.keep,
                use_cache=False)
    return out.logits[batch.row[:, None], batch.qidx]  # [B, Q, V] -> [I, L, V]


def sequence_loss(model: torch.nn.Module, batch: SequenceBatch) -> Tensor:
    """Mean next-item cross-entropy over the L codes of every target item of the batch."""
    logits = forward_sequences(model, batch)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch.codes.flatten())
