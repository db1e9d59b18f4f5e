"""Strict speculative beam search with a feature draft on the shared Beauty SmolLM2 target,
timed paired against the target's own beam search (``benchmarking.paired_speedup``), with the
oracle bound paired the same way, target calls per request, identical top-K, the phase
breakdown, and the width each code needs (``training.feature.width_needed``).

    python results/beauty-smollm2/feature_bench.py --data DATA --target TARGET --draft DRAFT \
        --out OUT.json [--k 1,3,5,10,20] [--num-prompts 16] [--repeat 2] [--gamma 3] [--threads 1]

This script measured the feature draft before ``bench`` and ``evaluate`` loaded feature drafts
(they do now, with the same columns); it is kept as the record of how the numbers here were made.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from atspeed_ray.benchmarking import batches, oracle_pass, paired_speedup
from atspeed_ray.data.prepare import load_prepared
from atspeed_ray.decoding import beam_search, speculative_search
from atspeed_ray.decoding.search import SearchParams
from atspeed_ray.decoding.timing import Timings
from atspeed_ray.drafts import load_drafter
from atspeed_ray.flags import parse_ks
from atspeed_ray.models import DeviceConfig, load_decoder
from atspeed_ray.training.feature import target_tree, width_needed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--draft", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=parse_ks, default=[1, 3, 5, 10, 20])
    p.add_argument("--widths", default="1k,2k", help="draft widths as multiples of K")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 beside other work: see results/trust/RUN.md)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = DeviceConfig(device="cpu", dtype="float32")
    data = load_prepared(args.data)
    target = load_decoder(args.target, dev)
    drafter = load_drafter(args.draft, dev)
    index = data.index
    prompts = data.prompts("test", limit=args.num_prompts)
    units = batches(prompts, 1)
    rows = []
    print(f"{'K':>3} {'N':>4} {'WS [IQR]':>20} {'oracle':>7} {'share':>6} {'calls/req':>9} "
          f"{'identical':>9} {'draft ms':>8} {'verify ms':>9}  widths code2/3/4 (median)", flush=True)
    with torch.no_grad():
        for k in args.k:
            tree = target_tree(target, prompts, index, k)
            widths = width_needed(drafter.model, tree, index, k)
            for mult in args.widths.split(","):
                n = k * int(mult.rstrip("k"))
                params = SearchParams(k, n, args.gamma)
                outs: dict[int, tuple] = {}

                def plain(u: int):
                    return beam_search(target, units[u], index, k)

                def spec(u: int):
                    t = Timings(index.device)
                    out = speculative_search(target, drafter, units[u], index, params, timings=t)
                    outs[u] = (out, t)
                    return out

                oracle = oracle_pass(target, k, args.gamma)
                plain(0), spec(0), oracle(units[0])  # warm-up
                t0 = time.perf_counter()
                run = paired_speedup(plain, spec, len(units), len(prompts), args.repeat,
                                     beside=[lambda u: oracle(units[u])])
                ws, bound = run.speedup, run.times.bound([0])
                ref = [i for u in range(len(units)) for i in run.plain[u][0].items]
                got = [i for u in range(len(units)) for i in run.spec[u][0].items]
                calls = statistics.mean(c for u in range(len(units))
                                        for c in run.spec[u][0].stats["target_calls"])
                ms = {name: 1e3 * sum(outs[u][1].seconds[name] for u in outs) / len(outs)
                      for name in ("draft", "verify")}
                med = {name: statistics.median(v) for name, v in widths.items()}
                row = {"k": k, "draft_beams": n, "gamma": args.gamma, "ws": ws.ws, "ws_q1": ws.q1,
                       "ws_q3": ws.q3, "unstable": ws.unstable, "oracle_bound": bound,
                       "oracle_share": ws.ws / bound, "target_calls_per_request": calls,
                       "identical_rate": sum(a == b for a, b in zip(got, ref)) / len(prompts),
                       "draft_ms_per_request": ms["draft"], "verify_ms_per_request": ms["verify"],
                       "widths_median": med, "prompts": len(prompts), "repeat": args.repeat,
                       "seconds": time.perf_counter() - t0}
                rows.append(row)
                print(f"{k:>3} {n:>4} {ws.ws:>7.2f} [{ws.q1:.2f}-{ws.q3:.2f}]{'!' if ws.unstable else ' '}"
                      f" {bound:>7.2f} {row['oracle_share']:>6.0%} {calls:>9.2f} "
                      f"{row['identical_rate']:>9.0%} {ms['draft']:>8.1f} {ms['verify']:>9.1f}  "
                      + ", ".join(f"{name} {v:g}" for name, v in med.items()), flush=True)
                Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
