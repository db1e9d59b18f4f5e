"""The target's cost per forward as a function of the tokens it feeds, for the cost model in
RUN.md ("Why strict WS >= 1.5 is out of reach here"): one tree-attention chunk of T nodes below
a cached P-token prompt (as a verification pass or a beam step feeds them), on FastLlama, in fp32
and bf16 (bf16 only where the CPU has native bf16), with packed and plain weights, best of R.

    PYTHONPATH=$PWD python results/beauty-llm/pass_costs.py --target MODEL_DIR \
        --out results/beauty-llm/pass_costs.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from atspeed_ray.decoding.beam import empty_nodes, prefill
from atspeed_ray.decoding.tree import Nodes, tree_forward
from atspeed_ray.models import DeviceConfig, decoding_dtype, load_decoder

TOKENS = (1, 10, 20, 40, 80, 130, 200)


def chunk_ms(model: torch.nn.Module, prompt_len: int, n: int, repeat: int) -> float:
    """Best of ``repeat`` times of one n-node chunk (3 levels of n / 3 chains) below a prompt."""
    best = float("inf")
    idx = torch.arange(n)
    nodes = Nodes(torch.ones(1, n, dtype=torch.long), (idx % 3)[None], torch.full((1, n), -1),
                  torch.full((1, n, 1), -1), torch.ones(1, n, dtype=torch.bool))
    for _ in range(repeat + 1):  # the first one warms up
        _, cache, _, _ = prefill(model, [[5] * prompt_len], empty_nodes(1, torch.device("cpu")))
        t0 = time.perf_counter()
        tree_forward(model, cache, nodes, max_chain=3)
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--prompt-len", type=int, default=46)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for precision in ("fp32", "bf16"):
        dtype, why = decoding_dtype(precision, torch.device("cpu"))
        if precision == "bf16" and dtype != "bfloat16":
            print(f"bf16 skipped: {why}")
            continue
        for pack in (True, False):
            model = load_decoder(args.target, DeviceConfig(device="cpu", dtype=dtype, pack=pack))
            ms = {n: round(chunk_ms(model, args.prompt_len, n, args.repeat), 1) for n in TOKENS}
            rows.append({"dtype": dtype, "pack": pack, "prompt_len": args.prompt_len, "ms": ms})
            print(dtype, "packed" if pack else "plain ", "  ".join(f"{n}:{v}" for n, v in ms.items()))
    with open(args.out, "w") as f:
        json.dump({"target": args.target, "threads": args.threads, "repeat": args.repeat,
                   "tokens": list(TOKENS), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
