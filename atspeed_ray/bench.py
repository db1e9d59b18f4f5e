"""Benchmarks: ``bench-beam`` (our beam search vs HF generate) and ``bench`` (speculative vs plain).

Both time the two methods on the same model(s) and prompts in one process, and print ratios
measured in that one run (these machines are noisy: compare ratios, not absolute times).
"""

from __future__ import annotations

import argparse

from pydantic import Field

from atspeed_ray.benchmarking import (
    SWITCHES, SpeedFlags, batches, measure_speculative, search_params, timed, write_json, ws_text,
)
from atspeed_ray.flags import options, validated
from atspeed_ray.settings import DEFAULT_DRAFT_BEAMS
from atspeed_ray.width_policy import Widths, WidthPolicy


class BenchBeamFlags(SpeedFlags):
    """``bench-beam``'s own flags (the others: ``SpeedFlags``)."""

    target: str | None = None  # type: ignore[assignment]  # bench-beam has no --target: --model
    model: str | None = Field(None, description="HF model dir (default: random model of --preset)")
    preset: str = Field("cpu", description="preset of the random target if no --model")
    num_prompts: int = Field(30, ge=1, description="prompts decoded")


class BenchFlags(SpeedFlags):
    """``bench``'s own flags (the others: ``SpeedFlags``)."""

    draft: str = Field(description="draft folder, any kind (atspeed_ray.drafts)")
    draft_beams: Widths = Field(
        default_factory=lambda: [WidthPolicy.parse(DEFAULT_DRAFT_BEAMS)],
        description=SpeedFlags.model_fields["draft_beams"].description + "; several, "
        "comma-separated, are each timed (a sweep beside auto)")
    num_prompts: int = Field(100, ge=1, description="prompts timed")
    batch_size: list[int] = Field(default_factory=lambda: [1], description=(
        "requests decoded together; several (1,8,32) are each timed"))
    repeat: int = Field(3, ge=1, description=SpeedFlags.model_fields["repeat"].description)


BENCH_BEAM_FIELDS = ("data", "model", "preset", "k", "num_prompts", "split", "device", "forward",
                     "out")
BENCH_FIELDS = ("data", "target", "draft", "k", "mode", "draft_beams", "calibration_prompts",
                "gamma", "num_prompts", "batch_size", "split", "seed", "repeat", "device",
                "forward", "compile", "pack", "precision", "expand_last", "relaxed_keep", "out")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-beam", help="our beam_search vs HF generate(prefix_allowed_tokens_fn)")
    options(p, BenchBeamFlags, BENCH_BEAM_FIELDS)
    p.set_defaults(func=run_bench_beam)

    p = sub.add_parser("bench", help="speculative beam search vs the target's beam search")
    options(p, BenchFlags, BENCH_FIELDS, **SWITCHES)
    p.set_defaults(func=run_bench)


def hf_constrained_topk(model, prompt: list[int], index, k: int, pad_id: int) -> list[int]:
    """The reference: HF ``generate`` beam search with the trie as ``prefix_allowed_tokens_fn``
    (top-``k`` item ids, best first)."""
    import torch

    plen, V = len(prompt), model.config.vocab_size

    def allowed(_b: int, ids: torch.Tensor) -> list[int]:
        gen = ids[plen:]
        node = index.prefix_nodes(gen[None])
        return index.allowed_mask(node, len(gen), V)[0].nonzero().flatten().tolist()

    ids = torch.tensor([prompt], device=index.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=k,
                         num_return_sequences=k, max_new_tokens=index.L,
                         min_new_tokens=index.L, prefix_allowed_tokens_fn=allowed,
                         do_sample=False, pad_token_id=pad_id, eos_token_id=None)
    return index.items_of(out[:, plen:]).tolist()


def run_bench_beam(args: argparse.Namespace) -> int:
    validated(args, BenchBeamFlags, BENCH_BEAM_FIELDS)
    import torch

    from atspeed_ray.data.prepare import open_data
    from atspeed_ray.decoding import beam_search
    from atspeed_ray.decoding.fast_llama import fast_forward
    from atspeed_ray.models import DeviceConfig, build_llama, get_preset, load_weights

    data = open_data(args.data, models=(args.model,))
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

    def hf(prompt: list[int], k: int) -> list[int]:
        return hf_constrained_topk(model, prompt, index, k, data.tokenizer.pad_token_id)

    rows = []
    print(f"model: {name}; {len(prompts)} prompts of {args.split}; one prompt per call for both; "
          f"ours on the {args.forward} forward, HF generate on the HF model")
    print(f"{'K':>4} {'ours s':>9} {'HF s':>9} {'speedup':>8} {'ours batched s':>15}  identical top-K")
    with torch.no_grad():
        for k in args.k:
            beam_search(ours_model, prompts[:1], index, k), hf(prompts[0], k)  # warm-up
            t_ours, ours = timed(lambda: [beam_search(ours_model, [p], index, k).items[0] for p in prompts])
            t_hf, ref = timed(lambda: [hf(p, k) for p in prompts])
            t_batch, _ = timed(lambda: [r for b in batches(prompts, 32)
                                         for r in beam_search(ours_model, b, index, k).items])
            same = sum(a == b for a, b in zip(ours, ref))
            rows.append({"k": k, "ours_s": t_ours, "hf_s": t_hf, "speedup": t_hf / t_ours,
                         "ours_batched_s": t_batch, "identical": same, "prompts": len(prompts)})
            print(f"{k:>4} {t_ours:>9.3f} {t_hf:>9.3f} {t_hf / t_ours:>7.2f}x {t_batch:>15.3f}  "
                  f"{'yes' if same == len(prompts) else 'no'} ({same}/{len(prompts)})")
    write_json(args.out, {"model": name, "split": args.split, "forward": args.forward, "rows": rows})
    return 0


BENCH_HEADER = (f"{'B':>3} {'K':>3} {'N':>3} {'beam s':>8} {'spec s':>8} {'WS [q1-q3]':>18} "
                f"{'%orcl':>6} {'oracle':>7} "
                f"{'N-tree':>7} {'1-round':>7} {'tgt calls/req':>13} {'acc steps/rnd':>13} ")


def bench_line(row: dict, ref_items: list, out_items: list, targets: list[list[int]]) -> str:
    """The printed line of one row; relaxed mode adds recall/NDCG of both methods to ``row``;
    an unstable row (``benchmarking.Speedup``) ends with ``unstable``."""
    from atspeed_ray.metrics import ndcg_at_k, recall_at_k

    k = row["k"]
    flag = "  unstable" if row["unstable"] else ""
    line = (f"{row['batch_size']:>3} {k:>3} {row['draft_beams']:>3} {row['beam_search_s']:>8.3f} "
            f"{row['speculative_s']:>8.3f} {ws_text(row, flag=False):>18} "
            f"{100 * row['fraction_of_oracle']:>5.0f}% {row['oracle_speedup']:>6.2f}x "
            f"{row['tree_bound_speedup']:>6.2f}x "
            f"{row['one_round_bound_speedup']:>6.2f}x "
            f"{row['target_calls_per_request']:>13.2f} "
            f"{row['accepted_steps_per_round']:>13.2f} ")
    if row["mode"] == "strict":
        return line + f"{100 * row['identical_rate']:.1f}%" + flag
    for name, items in (("beam", ref_items), ("spec", out_items)):
        row[f"recall@{k}_{name}"] = recall_at_k(items, targets, k)
        row[f"ndcg@{k}_{name}"] = ndcg_at_k(items, targets, k)
    return line + (f"{row[f'recall@{k}_beam']:.4f}/{row[f'recall@{k}_spec']:.4f}  "
                   f"{row[f'ndcg@{k}_beam']:.4f}/{row[f'ndcg@{k}_spec']:.4f}") + flag


def breakdown_line(row: dict) -> str:
    """The per-request time split of one row (ms): where the speculative search's time goes,
    beside the target's beam search and the parts of the bounds."""
    return ("    ms/request: draft {draft_ms:.2f} + verify {verify_ms:.2f} + accept {accept_ms:.2f} "
            "+ bookkeeping {bookkeeping_ms:.2f} + rest {rest_ms:.2f} = {total_ms:.2f} "
            "(beam search {beam_search_ms:.2f}; bounds: oracle pass {oracle_pass_ms:.2f}, "
            "N-tree pass {tree_pass_ms:.2f}, draft round {draft_round_ms:.2f})").format(**row)


def position_line(row: dict) -> str:
    """Accepted / verified drafted steps per code position: where acceptance is lost."""
    return ("    accepted/verified drafted steps by code position: " + row["accepted_by_position"]
            + "; width N each code needs for the draft's top N to hold the target's top K "
              "(median/max): " + row["code_width_by_position"])


def bench_row(args: argparse.Namespace, target, draft, index, prompts: list[list[int]],
              targets: list[list[int]], calibration: list[list[int]], k: int,
              width: WidthPolicy, batch_size: int) -> dict:
    """Time one row (batch size, K, width spec) and print it; ``auto`` is chosen first."""
    from atspeed_ray.width import row_params

    params = search_params(k, width, args.gamma, args.mode, args.seed, index.device,
                           args.expand_last, args.relaxed_keep)
    params, choice = row_params(params, width, target, draft, index, calibration, batch_size,
                                args.repeat)
    row, ref_items, out_items = measure_speculative(target, draft, index, prompts, params,
                                                    batch_size, args.repeat)
    row["draft_beams_spec"] = str(width)
    if choice is not None:
        row["width_choice"] = choice.record()
    print(bench_line(row, ref_items, out_items, targets) + ("  (auto)" if choice else ""))
    print(breakdown_line(row))
    print(position_line(row), flush=True)
    return row


def run_bench(args: argparse.Namespace) -> int:
    validated(args, BenchFlags, BENCH_FIELDS)
    from atspeed_ray.data.prepare import open_data
    from atspeed_ray.decoding.drafting import LMDrafter
    from atspeed_ray.drafts import check_draft, draft_kind, load_drafter
    from atspeed_ray.models import DeviceConfig, decoding_dtype, load_decoder

    data = open_data(args.data, models=(args.target,))
    check_draft(data, args.draft)
    dev = DeviceConfig(device=args.device, forward=args.forward, compile=args.compile,
                       pack=args.pack)
    dtype, why = decoding_dtype(args.precision, dev.torch_device())
    dev = dev.model_copy(update={"dtype": dtype})
    print(f"precision: {why}")
    target = load_decoder(args.target, dev)
    draft, kind = load_drafter(args.draft, dev), draft_kind(args.draft).name
    models = [("target", target)] + ([("draft", draft.model)] if isinstance(draft, LMDrafter) else [])
    packed = [name for name, m in models if getattr(m, "packed", None) is not None]
    print(f"packed weights: {', '.join(packed) or 'none'}")
    index = data.index.to(dev.torch_device())
    prompts = data.prompts(args.split, limit=args.num_prompts)
    targets = data.targets(args.split, limit=args.num_prompts)
    calibration = data.prompts("valid", limit=args.calibration_prompts)
    print(f"target {args.target}, draft {args.draft} ({kind}), "
          f"{len(prompts)} prompts of {args.split}, "
          f"batch {','.join(map(str, args.batch_size))}, mode {args.mode}, gamma {args.gamma}, "
          f"device {dev.torch_device()}, {args.forward} forward, {args.repeat} paired timings "
          f"per {'batch' if args.batch_size != [1] else 'prompt'}; WS = median of their ratios "
          f"[interquartile range]")
    print(BENCH_HEADER + ("identical" if args.mode == "strict"
                          else "recall@K beam/spec  ndcg@K beam/spec"))
    rows = []
    for batch_size in args.batch_size:
        for k in args.k:
            for width in args.draft_beams:
                rows.append(bench_row(args, target, draft, index, prompts, targets, calibration,
                                      k, width, batch_size))
    result = {"target": args.target, "draft": args.draft,
              "draft_kind": kind, "mode": args.mode, "gamma": args.gamma,
              "split": args.split, "prompts": len(prompts), "batch_sizes": args.batch_size,
              "draft_beams": [str(w) for w in args.draft_beams],
              "repeat": args.repeat,
              "device": str(dev.torch_device()), "forward": args.forward, "compile": args.compile,
              "pack": args.pack,
              "precision": args.precision, "dtype": dtype, "rows": rows}
    write_json(args.out, result)
    return 0
