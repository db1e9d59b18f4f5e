"""The cost and acceptance of several drafts for one target, in one table.

``python -m atspeed_ray.draft_tradeoff --data D --target T --draft NAME=DIR ... --out OUT``
loads the target once and, for every draft and every draft width N, runs ``bench``'s
measurement (``benchmarking.measure_speculative``: the target's beam search and strict
speculative beam search on the same prompts, alternating, best of ``--repeat``) at one K. Per
draft it reports its size (parameters, embedding rows), the draft round cost (its first round,
prefill included, ``draft_round_ms``, and the mean drafting time per round inside the search),
acceptance (target calls per request, accepted steps per round), the walltime speedup (WS) and
the identical-top-K rate. Without ``--target`` it times the draft rounds only (cost needs no
trained weights; acceptance does). Writes ``tradeoff.json`` and ``tradeoff.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from atspeed_ray.benchmarking import SpeedFlags, search_params
from atspeed_ray.flags import options
from atspeed_ray.width_policy import WidthPolicy


def named_dir(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=DIR")
    return name, path


def draft_size(draft) -> dict[str, Any]:
    """Layers, width, parameters (a tied matrix once) and table rows of a decoding draft."""
    if hasattr(draft, "embed"):  # FastLlama
        emb, head = draft.embed, draft.lm_head
    else:
        emb, head = draft.get_input_embeddings().weight, draft.get_output_embeddings().weight
    params = {id(p): p.numel() for p in draft.parameters()}
    cfg = draft.config
    return {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "params": sum(params.values()), "embedding_rows": int(emb.shape[0]),
            "head_rows": int(head.shape[0]), "tied": head is emb}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from atspeed_ray.data.prepare import open_data
    from atspeed_ray.models import DeviceConfig, decoding_dtype, load_decoder

    drafts = dict(args.draft)
    models = tuple(drafts.values()) + (() if args.target is None else (args.target,))
    data = open_data(args.data, models=models)
    dev = DeviceConfig(device=args.device)
    dtype, why = decoding_dtype(args.precision, dev.torch_device())
    dev = dev.model_copy(update={"dtype": dtype})
    print(f"precision: {why}", flush=True)
    target = None if args.target is None else load_decoder(args.target, dev)
    index = data.index.to(dev.torch_device())
    prompts = data.prompts(args.split, limit=args.num_prompts)
    rows = []
    for name, path in drafts.items():
        draft = load_decoder(path, dev)
        row: dict[str, Any] = {"draft": name, "path": path, **draft_size(draft), "by_n": {}}
        for n in args.draft_beams:
            params = search_params(args.k, WidthPolicy.parse(str(n)), args.gamma, "strict", 0,
                                   index.device, args.expand_last)
            row["by_n"][n] = measure_one(target, draft, index, prompts, params, args.repeat)
            print(f"{name:16s} N={n:<3d} {line(row['by_n'][n])}", flush=True)
        rows.append(row)
    return {"data": args.data, "target": args.target, "k": args.k, "gamma": args.gamma,
            "mode": "strict", "prompts": len(prompts), "split": args.split, "repeat": args.repeat,
            "dtype": dtype, "device": str(dev.torch_device()), "rows": rows}


def measure_one(target, draft, index, prompts: list[list[int]], params, repeat: int
                ) -> dict[str, float]:
    """One draft at one width: bench's measurements with a target, else the draft round only."""
    import torch

    from atspeed_ray.benchmarking import batches, draft_round_time, measure_speculative

    if target is None:
        with torch.no_grad():
            draft_round_time(None, draft, index, batches(prompts[:1], 1), params)  # warm-up
            t = draft_round_time(None, draft, index, batches(prompts, 1), params, repeat)
        return {"draft_round_ms": 1e3 * t / len(prompts)}
    r, _, _ = measure_speculative(target, draft, index, prompts, params, 1, repeat)
    rounds = sum(r["rounds_per_request"]) / len(prompts)
    keys = ("draft_round_ms", "target_calls_per_request", "accepted_steps_per_round",
            "walltime_speedup", "identical_rate", "beam_search_ms", "total_ms", "verify_ms")
    return {**{k: r[k] for k in keys}, "draft_ms_per_round": r["draft_ms"] / rounds}


def fmt(m: dict[str, float], key: str, spec: str) -> str:
    return format(m[key], spec) if key in m else "-"


def line(m: dict[str, float]) -> str:
    return (f"round {m['draft_round_ms']:7.1f} ms  in-search {fmt(m, 'draft_ms_per_round', '7.1f')}"
            f" ms/round  calls {fmt(m, 'target_calls_per_request', '.2f')}  accepted "
            f"{fmt(m, 'accepted_steps_per_round', '.2f')}  WS {fmt(m, 'walltime_speedup', '.2f')}"
            f"  identical {fmt(m, 'identical_rate', '.2f')}")


def markdown(result: dict[str, Any]) -> str:
    ns = list(result["rows"][0]["by_n"]) if result["rows"] else []
    head = ["draft", "layers x hidden", "params", "emb rows", "head rows"]
    for n in ns:
        head += [f"round ms N={n}", f"calls/req N={n}", f"acc/round N={n}", f"WS N={n}"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["draft"], f"{r['layers']} x {r['hidden']}", f"{r['params'] / 1e6:.2f}M",
                 str(r["embedding_rows"]), str(r["head_rows"])]
        for n in ns:
            m = r["by_n"][n]
            cells += [fmt(m, "draft_round_ms", ".1f"), fmt(m, "target_calls_per_request", ".2f"),
                      fmt(m, "accepted_steps_per_round", ".2f"), fmt(m, "walltime_speedup", ".2f")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m atspeed_ray.draft_tradeoff", description=__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--target", default=None,
                   help="the target (without one: the draft round cost only, no acceptance)")
    p.add_argument("--draft", type=named_dir, action="append", required=True, help="NAME=DIR")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--draft-beams", type=lambda s: [int(x) for x in s.split(",")], default=[10, 20])
    p.add_argument("--num-prompts", type=int, default=20)
    p.add_argument("--device", default="cpu")
    options(p, SpeedFlags, ("gamma", "split", "repeat", "precision", "expand_last"))
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    result = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tradeoff.json").write_text(json.dumps(result, indent=1))
    (out / "tradeoff.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
