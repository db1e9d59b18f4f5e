"""Teacher data: the target's top-K beam sequences and its next-token distributions along them.

``atspeed-ray teacher --data DIR --target DIR --out DIR --k 20`` (:func:`generate_teacher` with
a ``TeacherConfig``) runs the target's constrained beam search over the train and valid prompts,
in chunks spread over a pool of Ray actors (or in-process with ``--workers 0``), and writes
``OUT/{train,valid}.parquet`` plus ``OUT/teacher.json`` (K, L, row counts, bytes per sample,
timings).

The files' schema, why the distributions are stored in that form, and their reader are in
``training.teacher_data``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from atspeed_ray.training.config import TeacherConfig
from atspeed_ray.training.teacher_data import META, SCHEMA, subsample


# ---------------------------------------------------------------------------- compute
@torch.no_grad()
def teacher_rows(target: torch.nn.Module, prepared, split: str, rows: Sequence[int], k: int,
                 batch_size: int = 64, with_dist: bool = True) -> pa.Table:
    """Beam search + target distributions for ``rows`` of ``split`` -> an Arrow table (SCHEMA)."""
    from atspeed_ray.decoding import beam_search
    from atspeed_ray.training.core import Examples, collate, target_p_cols

    index = prepared.index
    rows = np.asarray(rows, dtype=np.int64)
    table = prepared.table(split).take(pa.array(rows))
    prompts = table.column("prompt").to_pylist()
    truth = np.asarray(table.column("target_codes").to_pylist(), dtype=np.int64).reshape(len(rows), -1)
    pad = prepared.prompt_format.pad_id
    device = next(target.parameters()).device
    n = len(rows)
    seq_col: list = [None] * n
    score_col: list = [None] * n
    node_col: list = [[] for _ in range(n)]
    logp_col: list = [[] for _ in range(n)]
    # batches of similar prompt length: left padding to the longest prompt of a batch is wasted
    order = np.argsort([len(x) for x in prompts], kind="stable")
    for s in range(0, n, batch_size):
        sel = order[s:s + batch_size]
        res = beam_search(target, [prompts[i] for i in sel], index, k)
        seqs = res.sequences.cpu()  # [b, K, L]
        scores = res.scores.float().cpu()  # [b, K]
        for j, i in enumerate(sel):
            seq_col[i] = seqs[j].flatten().int().tolist()
            score_col[i] = scores[j].tolist()
        if not with_dist:
            continue
        ex = Examples(rows[sel], [prompts[i] for i in sel], truth[sel], seqs.numpy(),
                      torch.isfinite(scores).numpy())
        batch = collate(ex, np.arange(len(ex)), index.to("cpu"), pad, teacher_k=seqs.shape[1])
        p = target_p_cols(target, batch.to(device), index.to(device)).cpu()  # [b, S, L, C]
        kids = index.child_table(batch.nodes) >= 0  # [b, S, L, C]
        for j, i in enumerate(sel):
            nodes = batch.nodes[j].flatten()  # [S * L]
            keep = nodes >= 0
            uniq, first = np.unique(nodes[keep].numpy(), return_index=True)
            at = torch.as_tensor(np.flatnonzero(keep.numpy())[first])  # first position of each node
            node_col[i] = uniq.astype(np.int32).tolist()
            logp_col[i] = p[j].flatten(0, 1)[at][kids[j].flatten(0, 1)[at]].tolist()
    out = {"row": rows.tolist(), "user": table.column("user").to_pylist(), "sequences": seq_col,
           "scores": score_col, "dist_nodes": node_col, "dist_logp": logp_col}
    return pa.table(out, schema=SCHEMA)


class TeacherWorker:
    """Holds the target and the prepared data; one per Ray actor (or in-process)."""

    def __init__(self, data: str, target: str, k: int, batch_size: int, threads: int | None = None,
                 with_dist: bool = True, use_gpu: bool = False):
        from atspeed_ray.data.prepare import load_prepared
        from atspeed_ray.models import DeviceConfig, load_decoder

        if threads:
            torch.set_num_threads(threads)
        self.prepared = load_prepared(data)
        device = DeviceConfig(device="cuda" if use_gpu else "cpu",
                              dtype="auto" if use_gpu else "float32")
        self.target = load_decoder(target, device)  # beam search + distributions: no grads
        self.k, self.batch_size, self.with_dist = k, batch_size, with_dist

    def run(self, split: str, rows: list[int]) -> pa.Table:
        return teacher_rows(self.target, self.prepared, split, rows, self.k, self.batch_size,
                            self.with_dist)


def generate_teacher(cfg: TeacherConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write teacher data for the train and valid splits; return the summary (teacher.json)."""
    from atspeed_ray.data.prepare import check_base_model
    from atspeed_ray.data.prepare import load_prepared

    data, target, out = (Path(p).resolve() for p in (cfg.data, cfg.target, cfg.out))
    prepared = load_prepared(data)
    if not (target / "config.json").is_file():
        raise FileNotFoundError(f"{target}: not a trained model folder (no config.json)")
    check_base_model(prepared, target)
    out.mkdir(parents=True, exist_ok=True)
    limits = {"train": cfg.max_samples, "valid": cfg.max_valid}
    plan = {s: subsample(prepared.table(s).num_rows, limits[s], cfg.seed) for s in ("train", "valid")}
    run_chunks = chunk_runner(cfg.model_copy(update={"data": str(data), "target": str(target)}))
    summary: dict[str, Any] = {"k": cfg.k, "L": prepared.index.L,
                               "vocab_size": len(prepared.tokenizer), "data": str(data),
                               "target": str(target), "with_dist": cfg.with_dist,
                               "workers": cfg.workers, "splits": {}}
    for split, rows in plan.items():
        chunks = [rows[i:i + cfg.chunk_size].tolist() for i in range(0, len(rows), cfg.chunk_size)]
        path = out / f"{split}.parquet"
        t0 = time.time()
        write_split(path, run_chunks(split, chunks), len(rows), f"teacher {split}", log)
        secs = time.time() - t0
        size = path.stat().st_size
        summary["splits"][split] = {
            "rows": len(rows), "of": prepared.table(split).num_rows, "seconds": round(secs, 2),
            "samples_per_s": round(len(rows) / max(secs, 1e-9), 2), "file_bytes": size,
            "bytes_per_sample": round(size / max(len(rows), 1), 1),
        }
    V, L = summary["vocab_size"], summary["L"]
    summary["dense_bytes_per_sample"] = (cfg.k + 1) * L * V * 4
    (out / META).write_text(json.dumps(summary, indent=2))
    return summary


def chunk_runner(cfg: TeacherConfig) -> Callable[[str, list[list[int]]], Iterator[pa.Table]]:
    """``(split, chunks) -> tables in chunk order``: over a pool of ``cfg.workers`` Ray actors,
    or in this process with ``workers = 0``."""
    args = (cfg.data, cfg.target, cfg.k, cfg.batch_size)
    if cfg.workers == 0:
        local = TeacherWorker(*args, None, cfg.with_dist, cfg.use_gpu)
        return lambda split, chunks: (local.run(split, c) for c in chunks)
    import ray
    from ray.util import ActorPool

    from atspeed_ray.training.ray_utils import init_ray

    init_ray()
    actor = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=1 if cfg.use_gpu else 0)(TeacherWorker)
    threads = max(1, int(cfg.cpus_per_worker))
    pool = ActorPool([actor.remote(*args, threads, cfg.with_dist, cfg.use_gpu)
                      for _ in range(cfg.workers)])
    return lambda split, chunks: pool.map(lambda a, c: a.run.remote(split, c), chunks)


def write_split(path: Path, tables: Iterable[pa.Table], total: int, what: str,
                log: Callable[[str], None]) -> None:
    """Write ``tables`` (in order: rows stay sorted) to one Parquet file, logging progress."""
    t0 = last = time.time()
    done = 0
    with pq.ParquetWriter(path, SCHEMA, compression="zstd") as writer:
        for table in tables:
            writer.write_table(table)
            done += table.num_rows
            now = time.time()
            if now - last > 10 or done == total:
                rate = done / max(now - t0, 1e-9)
                log(f"{what}: {done}/{total} samples ({100 * done / total:.0f}%)"
                    f", {rate:.1f} samples/s, eta {(total - done) / max(rate, 1e-9):.0f} s")
                last = now
