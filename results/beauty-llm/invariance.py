"""Batch invariance of the bf16 decoding forward on this CPU, for RUN.md ("bf16 made exact"):
what strict speculative decoding in bf16 needs is that a token's logits do not depend on how many
tokens share its forward, nor on where the keys it sees sit in the cache.

1. GEMMs: for each SmolLM2 projection shape, how many rows of a call of M rows differ from the
   same rows in one call of 300 (``fast_llama.linear`` on oneDNN's packed bf16 weights,
   ``PackedWeight``, random weights; "1 unpadded": 20 single rows fed to oneDNN as they are,
   which ``linear`` avoids).
2. The forward: a target's logits for 10 nodes fed as a beam-search step (below the cached
   prompt) against the same nodes inside one chunk with the prompt and with J junk sibling
   nodes before them (as a verification pass holds them), with SDPA and with
   ``invariant_attention``.
3. The cost of ``invariant_attention`` against SDPA: one chunk of T nodes below a cached
   46-token prompt, best of R, the two alternating.

    PYTHONPATH=$PWD python results/beauty-llm/invariance.py --target MODEL_DIR \\
        --out results/beauty-llm/invariance_amd.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

import atspeed_ray.decoding.fast_llama as fl
from atspeed_ray.decoding.beam import prefill
from atspeed_ray.decoding.tree import Nodes, tree_forward
from atspeed_ray.models import DeviceConfig, cpu_bf16_flags, load_decoder

sys.path.insert(0, str(Path(__file__).parent))
from pass_costs import chunk_ms  # noqa: E402  (the pass-cost timing, beside this script)

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
          "head": (49152, 576)}
ROWS = (1, 2, 3, 10, 16, 33, 46, 130)
JUNK = (0, 5, 40, 150)
TOKENS = (10, 40, 130)


def gemm_rows(seed: int = 0) -> dict[str, dict[int, int]]:
    """Per shape, per call size M: rows (of every offset tried) whose bits differ from one
    300-row call."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (O, I) in SHAPES.items():
        w = fl.PackedWeight((torch.randn(O, I, generator=g) * 0.05).bfloat16())
        x = torch.randn(300, I, generator=g).bfloat16()
        ref = fl.linear(x, w)
        out[name] = {M: sum(int((fl.linear(x[o:o + M], w) != ref[o:o + M]).any(1).sum())
                            for o in range(0, 300 - M, max(1, (300 - M) // 20))) for M in ROWS}
        # single rows straight into oneDNN, without the two-row padding of ``linear``
        out[name]["1 unpadded"] = sum(int((w(x[o:o + 1]) != ref[o:o + 1]).any())
                                      for o in range(0, 300, 15))
    return out


def nodes(tokens: torch.Tensor, depth: torch.Tensor, parent: torch.Tensor) -> Nodes:
    n = tokens.shape[1]
    return Nodes(tokens, depth, parent, torch.full((1, n, 1), -1), torch.ones(1, n, dtype=torch.bool))


def forward_rows(model: torch.nn.Module, prompt_len: int, seed: int = 0) -> dict[int, int]:
    """Per junk width J: of 10 depth-0 nodes, how many have logits whose bits differ between a
    beam-search step and a chunk [prompt | J junk nodes | the 10 nodes]."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(100, 40000, (prompt_len,), generator=g).tolist()
    tok = torch.randint(100, 40000, (1, 10), generator=g)
    zeros, none = torch.zeros(1, 10, dtype=torch.long), torch.full((1, 10), -1)
    _, cache, _, _ = prefill(model, [prompt])
    step, _, _ = tree_forward(model, cache, nodes(tok, zeros, none), max_chain=0)
    out = {}
    for J in JUNK:
        junk = torch.randint(100, 40000, (1, J), generator=g)
        chunk = nodes(torch.cat([junk, tok], 1), torch.zeros(1, J + 10, dtype=torch.long),
                      torch.full((1, J + 10), -1))
        _, _, logits, _ = prefill(model, [prompt], chunk)
        out[J] = int((logits[:, J:] != step).any(-1).sum())
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_bf16_flags():
        raise SystemExit("this CPU has no native bf16 matmuls: nothing to measure")
    record: dict = {"target": args.target, "cpu_bf16_flags": cpu_bf16_flags(),
                    "machine": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "gemm_rows_differing": gemm_rows()}
    print("GEMM rows differing from a 300-row call, by call size:", record["gemm_rows_differing"])
    model = load_decoder(args.target, DeviceConfig(device="cpu", dtype="bfloat16", pack=True))
    invariant = fl.uses_invariant_attention
    kinds = {"sdpa": lambda x: False, "invariant": invariant}
    record["forward_rows_differing"], ms = {}, {k: {} for k in kinds}
    for kind, rule in kinds.items():
        fl.uses_invariant_attention = rule
        record["forward_rows_differing"][kind] = {P: forward_rows(model, P) for P in (46, 101)}
        print(f"{kind}: of 10 nodes, logits differing between a beam step and a verification "
              f"chunk with J junk nodes, by prompt length and J:",
              record["forward_rows_differing"][kind], flush=True)
    for n in TOKENS:
        for _ in range(2):  # alternate the two, keep each one's best
            for kind, rule in kinds.items():
                fl.uses_invariant_attention = rule
                ms[kind][n] = min(ms[kind].get(n, float("inf")),
                                  round(chunk_ms(model, 46, n, args.repeat), 1))
    fl.uses_invariant_attention = invariant
    record["chunk_ms"] = ms
    print("ms per chunk below a 46-token prompt, by nodes fed:", ms)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
