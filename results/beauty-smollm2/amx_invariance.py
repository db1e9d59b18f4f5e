"""Which bf16 GEMM calls agree bit for bit on an AMX CPU, and what cutting calls into those sizes
costs (RUN.md, "Strict bf16 made exact on AMX"; ``fast_llama.linear``).

1. Per SmolLM2 projection shape: the same 4,096 rows run through calls of a fixed row count
   M0 each (``PackedWeight``, oneDNN, random weights); row counts whose outputs are bit-identical
   form one class.
2. Per call size M: rows of calls of M rows that differ from the same rows in one 300-row call,
   for plain oneDNN calls and for ``linear`` (which cuts calls into ``amx_calls`` on AMX).
3. The four projections of 30 layers, M rows, plain calls against ``linear``, best of R.

    PYTHONPATH=$PWD python results/beauty-smollm2/amx_invariance.py --out results/beauty-smollm2/amx_invariance.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import atspeed_ray.decoding.fast_llama as fl

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
FIXED = (16, 32, 48, 64, 96, 128, 256)
CALLS = (1, 2, 10, 32, 33, 46, 130, 200)


def classes(w: fl.PackedWeight, x: torch.Tensor) -> list[list[int]]:
    outs = {m: torch.cat([w(x[i:i + m]) for i in range(0, x.shape[0], m)]) for m in FIXED}
    found: list[list[int]] = []
    for m in FIXED:
        same = next((c for c in found if torch.equal(outs[m], outs[c[0]])), None)
        (same.append(m) if same else found.append([m]))
    return found


def differing(call, x: torch.Tensor) -> dict[int, int]:
    ref = call(x)
    return {m: sum(int((call(x[o:o + m]) != ref[o:o + m]).any(1).sum())
                   for o in range(0, 300 - m, max(1, (300 - m) // 20))) for m in CALLS}


def stack_ms(ws: dict, m: int, call, repeat: int) -> float:
    xs = {n: torch.randn(m, w.weight.shape[1]).bfloat16() for n, w in ws.items()}
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(30):
            for n, w in ws.items():
                call(xs[n], w)
        best = min(best, time.perf_counter() - t)
    return round(best * 1e3, 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not fl.cpu_has_amx():
        raise SystemExit("this CPU has no AMX: nothing to measure")
    g = torch.Generator().manual_seed(0)
    rec: dict = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                 "threads": args.threads, "classes": {}, "plain_differing": {},
                 "linear_differing": {}}
    ws = {}
    for name, (O, I) in SHAPES.items():
        w = ws[name] = fl.PackedWeight((torch.randn(O, I, generator=g) * 0.05).bfloat16())
        rec["classes"][name] = classes(w, torch.randn(4096, I, generator=g).bfloat16())
        x = torch.randn(300, I, generator=g).bfloat16()
        rec["plain_differing"][name] = differing(w, x)
        rec["linear_differing"][name] = differing(lambda r, w=w: fl.linear(r, w), x)
        print(name, "classes of fixed call sizes:", rec["classes"][name],
              "| rows differing from a 300-row call, plain:", rec["plain_differing"][name],
              "linear:", rec["linear_differing"][name], flush=True)
    rec["ms_30_layers"] = {m: {"plain": stack_ms(ws, m, lambda x, w: w(x), args.repeat),
                               "linear": stack_ms(ws, m, fl.linear, args.repeat)}
                           for m in (1, 10, 40, 130, 200)}
    print("ms for the 4 projections of 30 layers, by rows:", rec["ms_30_layers"])
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
