"""Teacher data on disk: its Parquet schema and its reader (the Ray actor pool that writes it
is ``training.teacher``).

``OUT/{train,valid}.parquet`` plus ``OUT/teacher.json`` (K, L, row counts, bytes per sample,
timings). Parquet schema, one row per sample (``row`` = row of the sample in the prepared split):

* ``row`` int64, ``user`` int64
* ``sequences`` list<int32>: K x L code tokens, the target's top-K, best first (row-major)
* ``scores`` list<float32>: K cumulative log-probs (-inf: fewer than K items exist)
* ``dist_nodes`` list<int32>: the distinct trie nodes on the prefixes of the K sequences and of
  the ground-truth item (root included), sorted ascending
* ``dist_logp`` list<float32>: for each of those nodes in order, the target's log-probability
  (full-vocabulary log-softmax, the beam-search score) of each of the node's children, in the
  index's column order. Concatenated.

Why this form, and not dense logits or on-the-fly scoring
---------------------------------------------------------
Every alignment loss compares draft and target *over the valid codes at a position*
(losses.py), so the target's distribution over a trie node's children is all a loss can ever
read; storing exactly that is exact, not a top-m truncation. Positions share nodes: all K
sequences share the root, most share their first codes, and past depth 1 a Beauty node has 1.7
children on average. Measured on Beauty (cpu-preset target, K = 20, float32, zstd Parquet):
3.6 KB per sample (sequences, scores and distributions) against (K + 1) x L x V x 4 = 290 KB
for dense logits: 0.37 GB instead of 30 GB for the 103k training samples.

The alternative, scoring with the frozen target inside the training loop, needs no storage but
costs one target forward over prompt + (K + 1)(L - 1) tokens per sample *in every epoch*.
Measured with the cpu presets (K = 20, 32-sample AtSpeed-S step, 1 thread): 0.15 s per step
with stored distributions, 0.78 s with the online target forward (5.2x). In the teacher pass the
same forward costs about as much as the beam search itself (1.51 s vs 1.46 s for 128 prompts),
so storing doubles a pass that runs once, while online scoring adds it to each of the paper's
20 epochs; the gap grows with the target/draft size ratio (7B vs 68M in the paper). Hence the
default is stored; ``align --teacher-logits online`` (or a teacher made with ``--no-dist``)
scores on the fly, trading compute for disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from atspeed_ray.data.errors import DataError

SCHEMA = pa.schema([
    ("row", pa.int64()),
    ("user", pa.int64()),
    ("sequences", pa.list_(pa.int32())),
    ("scores", pa.list_(pa.float32())),
    ("dist_nodes", pa.list_(pa.int32())),
    ("dist_logp", pa.list_(pa.float32())),
])
META = "teacher.json"


def subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    """All of ``range(n)``, or a seeded random subset of ``limit`` rows, sorted."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


# ---------------------------------------------------------------------------- read
@dataclass
class TeacherData:
    root: Path
    meta: dict[str, Any]

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def has_dist(self) -> bool:
        return bool(self.meta.get("with_dist", True))

    def table(self, split: str) -> pa.Table:
        path = self.root / f"{split}.parquet"
        if not path.is_file():
            raise DataError(f"teacher data has no {split} split; run `atspeed-ray teacher` first", path)
        table = pq.read_table(path)
        missing = [n for n in SCHEMA.names if n not in table.column_names]
        if missing:
            raise DataError(f"not a teacher file: missing columns {missing}", path)
        return table.select(SCHEMA.names)


def load_teacher(path: str | Path) -> TeacherData:
    root = Path(path)
    meta_path = root / META
    if not meta_path.is_file():
        raise DataError(f"not a teacher data folder (no {META}); run `atspeed-ray teacher` first", root)
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"bad JSON: {e}", meta_path) from e
    for key in ("k", "L"):
        if key not in meta:
            raise DataError(f"missing field {key!r}", meta_path)
    return TeacherData(root, meta)


def _ragged(column: pa.ChunkedArray, dtype) -> list[np.ndarray]:
    """A list<...> column -> one numpy view per row (no Python lists of floats)."""
    arr = column.combine_chunks()
    values = np.asarray(arr.values.to_numpy(zero_copy_only=False), dtype=dtype)
    offsets = arr.offsets.to_numpy()
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(arr))]


def load_examples(prepared, split: str, teacher: TeacherData | None = None,
                  rows: Sequence[int] | None = None):
    """Samples of ``split`` as core.Examples: the teacher's rows (with its data) when given,
    else ``rows`` (default all)."""
    from atspeed_ray.training.core import Examples

    L = prepared.index.L
    if teacher is not None:
        t = teacher.table(split)
        trows = np.asarray(t.column("row").to_numpy(), dtype=np.int64)
        if rows is not None:
            keep = np.asarray(rows, dtype=np.int64)
            if keep.size and (keep.max() >= len(trows) or keep.min() < 0):
                raise ValueError(f"row selection out of range for {len(trows)} teacher rows")
            t, trows = t.take(pa.array(keep)), trows[keep]
        n_split = prepared.table(split).num_rows
        if trows.size and (trows.max() >= n_split or trows.min() < 0):
            raise DataError(f"teacher rows go up to {int(trows.max())} but the prepared {split} "
                            f"split has {n_split} rows: teacher data from another folder?",
                            teacher.root / f"{split}.parquet")
        K = teacher.k
        seqs = np.asarray(t.column("sequences").combine_chunks().flatten().to_numpy(), dtype=np.int64)
        if seqs.size != len(trows) * K * L:
            raise DataError(f"sequences must hold K x L = {K * L} codes per row",
                            teacher.root / f"{split}.parquet")
        scores = np.asarray(t.column("scores").combine_chunks().flatten().to_numpy(),
                            dtype=np.float32).reshape(len(trows), K)
        dist_nodes = dist_logp = None
        if teacher.has_dist:
            dist_nodes = _ragged(t.column("dist_nodes"), np.int32)
            dist_logp = _ragged(t.column("dist_logp"), np.float32)
        sel = trows
    else:
        sel = np.arange(prepared.table(split).num_rows) if rows is None else np.asarray(rows)
    pt = prepared.table(split).take(pa.array(sel))
    prompts = pt.column("prompt").to_pylist()
    truth = np.asarray(pt.column("target_codes").to_pylist(), dtype=np.int64).reshape(len(sel), L)
    if teacher is None:
        return Examples(sel, prompts, truth)
    return Examples(sel, prompts, truth, seqs.reshape(len(sel), K, L), np.isfinite(scores),
                    dist_nodes, dist_logp)
