"""Benchmarks: ``bench-beam`` (our beam search vs HF generate) and ``bench`` (speculative vs plain).

Both time the two methods on the same model(s) and prompts in one process, and print ratios
measured in that one run (these machines are noisy: compare ratios, not absolute times).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from atspeed_ray.settings import DEFAULT_FORWARD, DEFAULT_MODE, FORWARDS, MODES


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def _ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k must be comma-separated integers, got {text!r}")
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--k values must be >= 1, got {text!r}")
    return ks


class DraftWidth:
    """``--draft-beams``: a fixed width N ("20") or a multiple of K ("2k"); never below K."""

    def __init__(self, text: str):
        t = text.strip().lower()
        try:
            self.factor = float(t[:-1]) if t.endswith("k") else None
            self.fixed = None if t.endswith("k") else int(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--draft-beams must be N or a multiple of K like 2k, got {text!r}")
        if (self.factor is not None and self.factor < 1) or (self.fixed is not None and self.fixed < 1):
            raise argparse.ArgumentTypeError(f"--draft-beams must be >= 1 (or >= 1k), got {text!r}")
        self.text = text

    def of(self, k: int) -> int:
        """N for ``k``: the fixed width, or ceil(factor * k) as the serve configs'
        draft_beams_factor; at least k."""
        from atspeed_ray.serving.config import draft_width

        return max(self.fixed, k) if self.fixed is not None else draft_width(k, self.factor)

    def __repr__(self) -> str:
        return self.text


def add_forward_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--forward", choices=FORWARDS, default=DEFAULT_FORWARD,
                   help="decoding forward: compact FastLlama (Llama checkpoints) or the HF model's")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-beam", help="our beam_search vs HF generate(prefix_allowed_tokens_fn)")
    p.add_argument("--data", required=True, help="prepared folder, release folder or 'synthetic'")
    p.add_argument("--model", default=None, help="HF model dir (default: random model of --preset)")
    p.add_argument("--preset", default="cpu", help="preset of the random target if no --model")
    p.add_argument("--k", type=_ks, default=[1, 5, 10, 20])
    p.add_argument("--num-prompts", type=int, default=30)
    p.add_argument("--split", default="test")
    p.add_argument("--device", default="auto")
    add_forward_arg(p)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=run_bench_beam)

    p = sub.add_parser("bench", help="speculative beam search vs the target's beam search")
    p.add_argument("--data", required=True, help="prepared folder, release folder or 'synthetic'")
    p.add_argument("--target", required=True, help="HF model dir of the target")
    p.add_argument("--draft", required=True, help="HF model dir of the draft")
    p.add_argument("--k", type=_ks, default=[1, 3, 5, 10, 20])
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE)
    p.add_argument("--draft-beams", type=DraftWidth, default=DraftWidth("1k"),
                   help="draft width: N, or a multiple of K such as 2k (default: K; raised to K where smaller)")
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=1, help="requests decoded together")
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=_positive, default=3,
                   help="time each side this many times (alternating) and keep the best")
    p.add_argument("--device", default="auto")
    add_forward_arg(p)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=run_bench)


def _timed(fn, repeat: int = 1) -> tuple[float, Any]:
    import torch

    best, out = float("inf"), None
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _time_per_batch(one, batches: list[list[list[int]]], repeat: int) -> float:
    """Sum over batches of the best of ``repeat`` timings of ``one(batch)``."""
    return sum(_timed(lambda b=b: one(b), repeat=repeat)[0] for b in batches)


def _batches(xs: list, size: int) -> list[list]:
    return [xs[i:i + size] for i in range(0, len(xs), size)]


def _write(out: str | None, result: dict) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")


def run_bench_beam(args: argparse.Namespace) -> int:
    import torch

    from atspeed_ray.data.prepare import open_data
    from atspeed_ray.decoding import beam_search
    from atspeed_ray.decoding.fast_llama import fast_forward
    from atspeed_ray.models import DeviceConfig, build_llama, get_preset, load_weights

    data = open_data(args.data)
    dev = DeviceConfig(device=args.device)
    if args.model:
        model = load_weights(args.model, dev)
        name = args.model
    else:
        size = get_preset(args.preset).target
        model = build_llama(size, len(data.tokenizer), data.tokenizer.pad_token_id, seed=0)
        model.to(dev.torch_device(), dev.torch_dtype())
        name = f"random {args.preset} target"
    # HF generate always runs the HF model; ours runs the forward chosen by --forward
    ours_model = fast_forward(model) if args.forward == "fast" else model
    index = data.index.to(dev.torch_device())
    prompts = data.prompts(args.split, limit=args.num_prompts)
    V = model.config.vocab_size

    def hf(prompt: list[int], k: int) -> list[int]:
        plen = len(prompt)

        def allowed(_b: int, ids: torch.Tensor) -> list[int]:
            gen = ids[plen:]
            node = index.prefix_nodes(gen[None])
            return index.allowed_mask(node, len(gen), V)[0].nonzero().flatten().tolist()

        ids = torch.tensor([prompt], device=index.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=k,
                             num_return_sequences=k, max_new_tokens=index.L,
                             min_new_tokens=index.L, prefix_allowed_tokens_fn=allowed,
                             do_sample=False, pad_token_id=data.tokenizer.pad_token_id,
                             eos_token_id=None)
        return index.items_of(out[:, plen:]).tolist()

    rows = []
    print(f"model: {name}; {len(prompts)} prompts of {args.split}; one prompt per call for both; "
          f"ours on the {args.forward} forward, HF generate on the HF model")
    print(f"{'K':>4} {'ours s':>9} {'HF s':>9} {'speedup':>8} {'ours batched s':>15}  identical top-K")
    with torch.no_grad():
        for k in args.k:
            beam_search(ours_model, prompts[:1], index, k), hf(prompts[0], k)  # warm-up
            t_ours, ours = _timed(lambda: [beam_search(ours_model, [p], index, k).items[0] for p in prompts])
            t_hf, ref = _timed(lambda: [hf(p, k) for p in prompts])
            t_batch, _ = _timed(lambda: [r for b in _batches(prompts, 32)
                                         for r in beam_search(ours_model, b, index, k).items])
            same = sum(a == b for a, b in zip(ours, ref))
            rows.append({"k": k, "ours_s": t_ours, "hf_s": t_hf, "speedup": t_hf / t_ours,
                         "ours_batched_s": t_batch, "identical": same, "prompts": len(prompts)})
            print(f"{k:>4} {t_ours:>9.3f} {t_hf:>9.3f} {t_hf / t_ours:>7.2f}x {t_batch:>15.3f}  "
                  f"{'yes' if same == len(prompts) else 'no'} ({same}/{len(prompts)})")
    _write(args.out, {"model": name, "split": args.split, "forward": args.forward, "rows": rows})
    return 0


def oracle_pass_time(target, batches: list[list[list[int]]], width: int, gamma: int,
                     repeat: int = 1) -> float:
    """Time of ONE target forward over each batch's prompts + width*gamma tree tokens (width K:
    the oracle pass; width N: a verification pass over a full N-beam draft tree)."""
    import torch

    from atspeed_ray.decoding.beam import prefill
    from atspeed_ray.decoding.tree import Nodes

    def one(batch: list[list[int]]) -> None:
        B, T = len(batch), width * gamma
        dev = next(target.parameters()).device
        tok = torch.ones(B, T, dtype=torch.long, device=dev)
        idx = torch.arange(T, device=dev)
        depth = (idx // width).expand(B, T)  # gamma levels of width nodes below each other
        parent = torch.where(idx >= width, idx - width, -1).expand(B, T)
        nodes = Nodes(tok, depth, parent, torch.full((B, T, 1), -1, device=dev),
                      torch.ones(B, T, dtype=torch.bool, device=dev))
        prefill(target, batch, nodes)

    return _time_per_batch(one, batches, repeat)


def draft_round_time(draft, index, batches: list[list[list[int]]], k: int, n: int, gamma: int,
                     repeat: int = 1) -> float:
    """Time of the draft's first round for each batch: its prefill and min(gamma, L - 1)
    width-n drafting steps from the root (top-n drafting), as ``draft_phase`` runs them."""
    import torch

    from atspeed_ray.decoding.beam import root_beams, score_dtype
    from atspeed_ray.decoding.speculative import draft_phase

    G = min(gamma, index.L - 1)

    def one(batch: list[list[int]]) -> None:
        B, dev = len(batch), index.device
        beams = root_beams(B, k, index.L, ["target", "draft"], dev, score_dtype(draft))
        t = torch.zeros(B, dtype=torch.long, device=dev)
        draft_phase(draft, None, beams, t, torch.full_like(t, G), G, batch, index, n, False, None)

    return _time_per_batch(one, batches, repeat)


def measure_speculative(target, draft, index, prompts: list[list[int]], k: int, n: int, gamma: int,
                        mode: str, batch_size: int, seed: int = 0, repeat: int = 1
                        ) -> tuple[dict, list, list]:
    """Time the target's beam search and speculative beam search on the same prompts (same
    process, warm-up first; with ``repeat`` > 1 the two alternate and each keeps its best time).
    Returns (row of measurements, plain items, speculative items)."""
    import torch

    from atspeed_ray.decoding import beam_search, speculative_beam_search

    batches = _batches(prompts, batch_size)
    gen = torch.Generator(device=index.device).manual_seed(seed)

    def plain() -> list:
        return [beam_search(target, b, index, k) for b in batches]

    def spec() -> list:
        return [speculative_beam_search(target, draft, b, index, k, draft_beams=n, gamma=gamma,
                                        mode=mode, generator=gen) for b in batches]

    with torch.no_grad():
        beam_search(target, batches[0], index, k)  # warm-up
        speculative_beam_search(target, draft, batches[0], index, k, draft_beams=n, gamma=gamma,
                                mode=mode, generator=gen)
        t_plain = t_spec = float("inf")
        for _ in range(repeat):  # alternating, so that a slow spell of the machine hits both
            t, ref = _timed(plain)
            t_plain = min(t_plain, t)
            t, out = _timed(spec)
            t_spec = min(t_spec, t)
        t_pass = oracle_pass_time(target, batches, k, gamma, repeat)
        t_tree = t_pass if n == k else oracle_pass_time(target, batches, n, gamma, repeat)
        t_draft = draft_round_time(draft, index, batches, k, n, gamma, repeat)
    ref_items = [i for r in ref for i in r.items]
    out_items = [i for r in out for i in r.items]
    stats = {key: [v for r in out for v in r.stats[key]]
             for key in ("target_calls", "draft_calls", "rounds", "accepted_steps")}
    row = {
        "k": k, "draft_beams": n, "mode": mode, "beam_search_s": t_plain, "speculative_s": t_spec,
        "walltime_speedup": t_plain / t_spec, "oracle_speedup": t_plain / t_pass,
        "fraction_of_oracle": (t_plain / t_spec) / (t_plain / t_pass),
        # WS if every round were fully accepted and drafting were free, at this N: the verify
        # pass carries N*gamma drafted tokens, not K*gamma, so fraction_of_oracle is at most
        # t_pass / t_tree whatever the draft
        "tree_bound_speedup": t_plain / t_tree,
        # ... and with the draft's cost counted: every request done in ONE fully accepted round
        # (one draft round + one verify pass), no bookkeeping
        "one_round_bound_speedup": t_plain / (t_tree + t_draft),
        "target_calls_per_request": sum(stats["target_calls"]) / len(prompts),
        "draft_calls_per_request": sum(stats["draft_calls"]) / len(prompts),
        "accepted_steps_per_round": sum(stats["accepted_steps"]) / sum(stats["rounds"]),
        "accepted_steps_per_request": stats["accepted_steps"],
        "rounds_per_request": stats["rounds"],
    }
    if mode == "strict":
        row["identical_rate"] = sum(a == b for a, b in zip(out_items, ref_items)) / len(prompts)
    return row, ref_items, out_items


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from atspeed_ray.data.prepare import open_data
    from atspeed_ray.metrics import ndcg_at_k, recall_at_k
    from atspeed_ray.models import DeviceConfig, load_decoder

    data = open_data(args.data)
    dev = DeviceConfig(device=args.device, forward=args.forward)
    target = load_decoder(args.target, dev)
    draft = load_decoder(args.draft, dev)
    index = data.index.to(dev.torch_device())
    prompts = data.prompts(args.split, limit=args.num_prompts)
    targets = data.targets(args.split, limit=args.num_prompts)
    print(f"target {args.target}, draft {args.draft}, {len(prompts)} prompts of {args.split}, "
          f"batch {args.batch_size}, mode {args.mode}, gamma {args.gamma}, device {dev.torch_device()}, "
          f"{args.forward} forward, best of {args.repeat} timings")
    header = (f"{'K':>3} {'N':>3} {'beam s':>8} {'spec s':>8} {'WS':>6} {'oracle':>7} {'%orcl':>6} "
              f"{'N-tree':>7} {'1-round':>7} "
              f"{'tgt calls/req':>13} {'acc steps/rnd':>13} ")
    header += "identical" if args.mode == "strict" else "recall@K beam/spec  ndcg@K beam/spec"
    print(header)
    rows = []
    for k in args.k:
        n = args.draft_beams.of(k)
        row, ref_items, out_items = measure_speculative(
            target, draft, index, prompts, k, n, args.gamma, args.mode, args.batch_size, args.seed,
            args.repeat)
        line = (f"{k:>3} {n:>3} {row['beam_search_s']:>8.3f} {row['speculative_s']:>8.3f} "
                f"{row['walltime_speedup']:>5.2f}x {row['oracle_speedup']:>6.2f}x "
                f"{100 * row['fraction_of_oracle']:>5.0f}% {row['tree_bound_speedup']:>6.2f}x "
                f"{row['one_round_bound_speedup']:>6.2f}x "
                f"{row['target_calls_per_request']:>13.2f} "
                f"{row['accepted_steps_per_round']:>13.2f} ")
        if args.mode == "strict":
            line += f"{100 * row['identical_rate']:.1f}%"
        else:
            for name, items in (("beam", ref_items), ("spec", out_items)):
                row[f"recall@{k}_{name}"] = recall_at_k(items, targets, k)
                row[f"ndcg@{k}_{name}"] = ndcg_at_k(items, targets, k)
            line += (f"{row[f'recall@{k}_beam']:.4f}/{row[f'recall@{k}_spec']:.4f}  "
                     f"{row[f'ndcg@{k}_beam']:.4f}/{row[f'ndcg@{k}_spec']:.4f}")
        print(line, flush=True)
        rows.append(row)
    result = {"target": args.target, "draft": args.draft, "mode": args.mode, "gamma": args.gamma,
              "split": args.split, "prompts": len(prompts), "batch_size": args.batch_size,
              "repeat": args.repeat,
              "device": str(dev.torch_device()), "forward": args.forward, "rows": rows}
    _write(args.out, result)
    return 0
