"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", 2018): a reference method.

A small causal transformer over item ids: item embedding (shared with the output layer) plus a
learned position embedding, ``blocks`` pre-norm blocks of causal self-attention and a point-wise
feed-forward layer, a final layer norm. The hidden state at position t scores every item by a dot
product with its embedding; the score at the last history position ranks the next item.

Loss: softmax cross-entropy over the catalogue at every position, not the paper's binary
cross-entropy with one sampled negative. Evaluation here ranks the *whole* catalogue (12k items
on Beauty), and a softmax trains exactly that ranking, while one random negative per positive
mostly teaches the model to beat random items and needs hundreds of epochs. For catalogues
larger than ``negatives`` + 1 items the softmax is sampled: the label against ``negatives``
items drawn uniformly per batch, their logits corrected by log((I - 1) / negatives) so that they
stand for all I - 1 other items. On Beauty that makes an epoch about 4x cheaper than the full
[positions, 12k] product (with length-bucketed batches: 22 s against about 100 s on one thread
of a busy 2-core CPU). Smaller catalogues use the full softmax.

Training rows: each train sequence s gives inputs s[:-1] and next-item labels s[1:], in windows
of ``max_len`` items (the prompts' history length) that tile the sequence from its end, left
padded. Model selection: after every epoch, NDCG@10 on the first ``val_rows`` valid rows
(history -> first valid item); the best epoch is kept and training stops after ``patience``
epochs without a better one. Seeded; runs with ``threads`` torch threads.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atspeed_ray.metrics import ndcg_at_k
from atspeed_ray.reference.config import SASRecConfig


class Block(nn.Module):
    """Pre-norm causal self-attention + point-wise feed-forward, both residual."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"sasrec dim {cfg.dim} is not a multiple of heads {cfg.heads}")
        self.heads, self.p = cfg.heads, cfg.dropout
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.qkv, self.proj = nn.Linear(cfg.dim, 3 * cfg.dim), nn.Linear(cfg.dim, cfg.dim)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.ReLU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.dim, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # x [B, T, D], mask [B, 1, T, T]
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,  # [B, H, T, D/H]
                                           dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, D)))
        return x + self.drop(self.ffn(self.norm2(x)))


class SASRec(nn.Module):
    """Input ids are item + 1 (0 = padding); ``scores`` are over items 0..num_items-1."""

    def __init__(self, num_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item = nn.Embedding(num_items + 1, cfg.dim, padding_idx=0)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.blocks))
        self.norm, self.drop = nn.LayerNorm(cfg.dim), nn.Dropout(cfg.dropout)
        nn.init.normal_(self.item.weight, std=cfg.dim ** -0.5)

    def hidden(self, seq: Tensor) -> Tensor:
        """[B, T] ids (left padded, T <= max_len) -> [B, T, D] hidden states."""
        T = seq.shape[1]
        valid = seq > 0  # [B, T]
        pos = torch.arange(self.cfg.max_len - T, self.cfg.max_len, device=seq.device)
        x = self.drop(self.item(seq) * math.sqrt(self.cfg.dim) + self.pos(pos)) * valid[..., None]
        causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=seq.device)  # padding attends to itself only
        mask = ((causal & valid[:, None, :]) | eye)[:, None]  # [B, 1, T, T]
        for block in self.blocks:
            x = block(x, mask) * valid[..., None]
        return self.norm(x)

    def scores(self, h: Tensor) -> Tensor:
        """[..., D] hidden states -> [..., I] item scores."""
        return h @ self.item.weight[1:].T


def left_pad(rows: Sequence[Sequence[int]], length: int, fill: int, shift: int = 0) -> Tensor:
    """[N, length] long: the last ``length`` entries of each row (+ shift), left padded."""
    out = torch.full((len(rows), length), fill, dtype=torch.long)
    for r, row in enumerate(rows):
        tail = list(row)[-length:]
        if tail:
            out[r, length - len(tail):] = torch.tensor(tail, dtype=torch.long) + shift
    return out


def training_windows(sequences: Sequence[Sequence[int]], max_len: int) -> tuple[Tensor, Tensor]:
    """Inputs [N, max_len] (item + 1, 0 = pad) and next-item labels [N, max_len] (-1 = none)."""
    xs, ys = [], []
    for s in sequences:
        for end in range(len(s) - 1, 0, -max_len):  # windows tile s[:-1] from its end
            start = max(0, end - max_len)
            xs.append(s[start:end])
            ys.append(s[start + 1:end + 1])
    return left_pad(xs, max_len, 0, shift=1), left_pad(ys, max_len, -1)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op torch threads, then restore the previous number."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rank_sasrec(model: SASRec, histories: Sequence[Sequence[int]], k: int, allowed: Tensor,
                skip_history: bool = True, batch_size: int = 512) -> list[list[int]]:
    """Top-``k`` item ids for each history (``allowed`` [I] bool: items that may be returned)."""
    model.eval()
    out: list[list[int]] = []
    with torch.no_grad(), torch_threads(model.cfg.threads):
        for lo in range(0, len(histories), batch_size):
            chunk = histories[lo:lo + batch_size]
            seq = left_pad(chunk, model.cfg.max_len, 0, shift=1)  # [B, T]
            s = model.scores(model.hidden(seq)[:, -1]).masked_fill(~allowed, -math.inf)  # [B, I]
            if skip_history:  # every history item, padded with an extra column I
                hist = left_pad(chunk, max(map(len, chunk)), s.shape[1])  # [B, H]
                ban = torch.zeros(len(chunk), s.shape[1] + 1, dtype=torch.bool).scatter_(1, hist, True)
                s = s.masked_fill(ban[:, :-1], -math.inf)
            top = s.topk(min(k, s.shape[1]), dim=1)
            out += [[i for i, v in zip(ids, vals) if v > -math.inf]
                    for ids, vals in zip(top.indices.tolist(), top.values.tolist())]
    return out


def _batches(y: Tensor, batch_size: int, gen: torch.Generator) -> list[tuple[Tensor, int]]:
    """Seeded random batches of windows of similar length: (row ids, length of the longest)."""
    length = (y >= 0).sum(1)  # [N] labels per window (= its items)
    order = torch.randperm(len(y), generator=gen)
    order = order[length[order].argsort(stable=True)]  # by length, random within one length
    chunks = order.split(batch_size)
    return [(chunks[i], int(length[chunks[i]].max())) for i in torch.randperm(len(chunks), generator=gen)]


def _loss(model: SASRec, h: Tensor, labels: Tensor, pool: Tensor, gen: torch.Generator) -> Tensor:
    """Softmax cross-entropy of ``labels`` [P] given hidden states ``h`` [P, D]: over every item of
    ``pool`` when it has at most ``negatives`` + 1 items, else over the label and ``negatives``
    items drawn uniformly from ``pool`` (shared by the batch), whose logits get + log((|pool| - 1)
    / negatives) so that they stand for all the other items (sampled softmax)."""
    w = model.item.weight[1:]  # [I, D]
    m = model.cfg.negatives
    if len(pool) <= m + 1:
        return F.cross_entropy(h @ w.T, labels)
    neg = pool[torch.randint(len(pool), (m,), generator=gen)]  # [M]
    pos = (h * w[labels]).sum(-1, keepdim=True)  # [P, 1]
    other = (h @ w[neg].T + math.log((len(pool) - 1) / m)).masked_fill(neg == labels[:, None], -math.inf)
    return F.cross_entropy(torch.cat([pos, other], 1), torch.zeros_like(labels))  # [P, 1 + M]


def _epoch(model: SASRec, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, pool: Tensor,
           gen: torch.Generator) -> float:
    """One pass over the windows (left padding trimmed per batch); mean loss."""
    model.train()
    total, n = 0.0, 0
    for idx, T in _batches(y, model.cfg.batch_size, gen):
        labels = y[idx, -T:]  # [B, T]
        keep = labels >= 0
        h = model.hidden(x[idx, -T:])[keep]  # [P, D] positions with a label
        loss = _loss(model, h, labels[keep], pool, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total, n = total + loss.item() * len(h), n + len(h)
    return total / max(n, 1)


def train_sasrec(sequences: Sequence[Sequence[int]], allowed: Tensor, cfg: SASRecConfig,
                 valid: tuple[list[list[int]], list[list[int]]] | None = None,
                 skip_history: bool = True) -> tuple[SASRec, dict]:
    """Train on ``sequences`` (item ids < len(allowed)); ``valid`` = (histories, targets) for model
    selection. Returns the model (best valid epoch) and a log."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = training_windows(sequences, cfg.max_len)
    if not len(x):
        raise ValueError("SASRec needs at least one train sequence with two items")
    log: dict = {"windows": len(x), "epochs": []}
    t0 = time.perf_counter()
    with torch_threads(cfg.threads):
        model = SASRec(len(allowed), cfg)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        best, best_state, stale = -1.0, None, 0
        for epoch in range(cfg.epochs):
            loss = _epoch(model, opt, x, y, allowed.nonzero().flatten(), gen)
            row = {"epoch": epoch + 1, "loss": loss, "s": time.perf_counter() - t0}
            if valid is not None and cfg.val_rows and valid[0]:
                hist, tgt = valid[0][: cfg.val_rows], valid[1][: cfg.val_rows]
                row["valid_ndcg@10"] = ndcg_at_k(rank_sasrec(model, hist, 10, allowed, skip_history), tgt, 10)
                if row["valid_ndcg@10"] > best:
                    best, stale = row["valid_ndcg@10"], 0
                    best_state = {n: t.clone() for n, t in model.state_dict().items()}
                else:
                    stale += 1
            log["epochs"].append(row)
            if stale >= cfg.patience:
                break
        if best_state is not None:
            model.load_state_dict(best_state)
    log.update(seconds=time.perf_counter() - t0, best_valid_ndcg10=best if best >= 0 else None)
    return model.eval(), log
