"""Prepared data -> the references' inputs, and their rankings for ``evaluate``.

Same protocol as the target:

* train sequences: each user's train sequence exactly as the target's train rows hold it (the
  first row's history item, then every row's target; users with a single train item give no
  row, as for ``popularity_topk``). Nothing from valid or test is fitted on; SASRec selects its
  epoch on valid rows, as the target's training reports on them.
* item ids: every item is mapped to its canonical representative (``ItemIndex.canonical``)
  before fitting and ranking. The generative target only ever emits code tuples, so items that
  share one are one item to it; the references see the catalogue the same way and rank over
  representatives only, the ids ``evaluate`` compares against.
* prompts: the same test rows (history = last ``history_len`` train + valid items).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from atspeed_ray.data.index import ItemIndex
from atspeed_ray.data.prepare import PreparedData
from atspeed_ray.reference.config import ReferenceConfig
from atspeed_ray.reference.sasrec import rank_sasrec, train_sasrec
from atspeed_ray.reference.transition import fit_transitions, rank_transitions


def canonical_lists(index: ItemIndex, lists: Sequence[Sequence[int]]) -> list[list[int]]:
    """Map every item of every list to its representative (one index call for all of them)."""
    flat = [int(i) for row in lists for i in row]
    canon = index.canonical(torch.tensor(flat, dtype=torch.long)).tolist() if flat else []
    out, pos = [], 0
    for row in lists:
        out.append(canon[pos:pos + len(row)])
        pos += len(row)
    return out


def train_sequences(prepared: PreparedData) -> list[list[int]]:
    """Each user's train sequence (raw item ids, oldest first), rebuilt from the train rows."""
    t = prepared.table("train")
    users = t.column("user").to_pylist()
    histories = t.column("history").to_pylist()
    seqs: list[list[int]] = []
    for row, target in enumerate(t.column("targets").to_pylist()):
        if row == 0 or users[row] != users[row - 1]:
            seqs.append([histories[row][0]])
        seqs[-1].extend(target)
    return seqs


def allowed_items(index: ItemIndex) -> np.ndarray:
    """[max item id + 1] bool: the representatives, the only ids a reference may return."""
    allowed = np.zeros(int(index.item_ids.max()) + 1, dtype=bool)
    allowed[index.leaf_item.cpu().numpy()] = True
    return allowed


def reference_rankings(prepared: PreparedData, histories: Sequence[Sequence[int]], k: int,
                       cfg: ReferenceConfig) -> dict[str, list[list[int]]]:
    """``{method: top-k canonical item ids per history}`` for each method of ``cfg.methods``."""
    index = prepared.index.to("cpu")
    allowed = allowed_items(index)
    seqs = canonical_lists(index, train_sequences(prepared))
    hist = canonical_lists(index, histories)
    out: dict[str, list[list[int]]] = {}
    for method in cfg.methods:
        t0 = time.perf_counter()
        if method == "transition":
            model = fit_transitions(seqs, allowed, cfg.transition)
            out[method] = rank_transitions(model, hist, k, cfg.skip_history)
            note = f"{int(model.indptr[-1])} item pairs"
        elif method == "sasrec":
            valid = (canonical_lists(index, prepared.histories("valid", limit=cfg.sasrec.val_rows)),
                     canonical_lists(index, prepared.targets("valid", limit=cfg.sasrec.val_rows)))
            model, log = train_sasrec(seqs, torch.from_numpy(allowed), cfg.sasrec, valid, cfg.skip_history)
            out[method] = rank_sasrec(model, hist, k, torch.from_numpy(allowed), cfg.skip_history)
            best = log["best_valid_ndcg10"]
            note = (f"{len(log['epochs'])} epochs on {log['windows']} windows"
                    + (f", best valid NDCG@10 {best:.4f}" if best is not None else ""))
        else:
            raise ValueError(f"unknown reference method {method!r}")
        print(f"  reference {method}: {note}, {time.perf_counter() - t0:.1f} s "
              f"(skip_history={cfg.skip_history})", flush=True)
    return out
