"""Seconds per training step of ``train-target --init`` on whole-sequence windows, and seconds per
beam-search request, for planning the Beauty run with an LLM target (RUN.md). It builds the
model exactly as train-target does (``training.setup.build_model``: embeddings grown to the
prepared tokenizer, LoRA when --lora-r is set) and runs the same loss (``sequence_loss``) with
AdamW, fp32 or bf16 autocast; it skips Ray, checkpoints and validation so that a few steps
suffice. Wall and process CPU seconds are both reported: on a shared machine CPU seconds / cores
is the better guess of the time on an idle one.

    PYTHONPATH=$PWD python results/beauty-llm/measure.py --data PREP --init MODEL_DIR \
        --precision bf16 --lora-r 8 --steps 5 --beam-requests 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--init", required=True)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--lora-r", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--beam-requests", type=int, default=0, help="K=10 beam searches on FastLlama")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from atspeed_ray.data.prepare import load_prepared
    from atspeed_ray.training.config import TrainConfig
    from atspeed_ray.training.sequences import build_sequences, collate_sequences, sequence_loss
    from atspeed_ray.training.setup import build_model, make_optimizer

    cfg = TrainConfig(task="target", runner="local", data=args.data, out="unused", init=args.init,
                      lora_r=args.lora_r, micro_batch=args.micro_batch, lr=1e-4)
    prepared = load_prepared(args.data)
    t0 = time.perf_counter()
    model = build_model(cfg, prepared, torch.device("cpu"))
    load_s = time.perf_counter() - t0
    seqs = build_sequences(prepared)
    opt = make_optimizer(model, cfg)
    rng = np.random.default_rng(0)
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16"
           else contextlib.nullcontext())
    steps = []
    for step in range(args.steps + 1):  # step 0: warm-up, not counted
        batch = collate_sequences(seqs, rng.choice(len(seqs), args.micro_batch, replace=False),
                                  prepared.prompt_format.pad_id)
        w, c = time.perf_counter(), time.process_time()
        with amp:
            loss = sequence_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        row = {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c,
               "items": batch.size, "tokens": int(batch.input_ids.numel()), "loss": float(loss)}
        print(json.dumps({"step": step, **row}), flush=True)
        if step:
            steps.append(row)
    wall = float(np.mean([s["wall_s"] for s in steps]))
    cpu = float(np.mean([s["cpu_s"] for s in steps]))
    items = float(np.mean([s["items"] for s in steps]))
    windows, total_items = len(seqs), seqs.num_items()
    result = {"precision": args.precision, "lora_r": args.lora_r, "micro_batch": args.micro_batch,
              "steps": len(steps), "load_s": round(load_s, 1), "wall_s_per_step": round(wall, 2),
              "cpu_s_per_step": round(cpu, 2), "items_per_step": items,
              "items_per_s_wall": round(items / wall, 2), "windows": windows, "items": total_items,
              "epoch_h_wall": round(windows / args.micro_batch * wall / 3600, 2),
              "epoch_h_cpu_over_cores": round(windows / args.micro_batch * cpu / os.cpu_count() / 3600, 2),
              "loadavg": os.getloadavg()}
    if args.beam_requests:
        result |= beam_timing(model, prepared, args.beam_requests)
    print("RESULT " + json.dumps(result), flush=True)


def beam_timing(model, prepared, n: int) -> dict:
    """Seconds per K=10 beam-search request (one prompt per call) on FastLlama, fp32."""
    from atspeed_ray.decoding import beam_search
    from atspeed_ray.decoding.fast_llama import fast_forward

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    fast = fast_forward(model.eval())
    index = prepared.index
    prompts = prepared.prompts("test", limit=n + 1)
    walls, cpus = [], []
    with torch.no_grad():
        beam_search(fast, prompts[:1], index, 10)  # warm-up
        for pr in prompts[1:]:
            w, c = time.perf_counter(), time.process_time()
            beam_search(fast, [pr], index, 10)
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
    return {"beam_k10_forward": type(fast).__name__, "beam_k10_requests": len(walls),
            "beam_k10_wall_s": round(float(np.mean(walls)), 3),
            "beam_k10_cpu_s": round(float(np.mean(cpus)), 3),
            "prompt_tokens": [len(p) for p in prompts[1:]]}


if __name__ == "__main__":
    main()
