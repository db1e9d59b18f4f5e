"""Relaxed SD against beam search, Recall@10, on the demo's tiny target: with the target as its
own draft (a perfect draft) and with the atspeed-r draft; also the target's own sampled beam
search (relaxed with gamma = 0: every step is the target's, no draft) with --sbs.

    python results/relaxed/relaxed_check.py RUN_FOLDER [--n 300] [--seeds 0 1] [--keep sample|top]
        [--sbs] [--width 20]

RUN_FOLDER: a demo output folder (make demo OUT=...). One torch thread. Prints, per line:
the search, the seed, Recall@10, mean target calls and accepted steps per prompt.
"""
import argparse

import torch

from atspeed_ray.data.prepare import load_prepared
from atspeed_ray.decoding import SearchParams, beam_search, speculative_search
from atspeed_ray.drafts import load_drafter
from atspeed_ray.metrics import recall_at_k
from atspeed_ray.models import DeviceConfig, load_decoder

torch.set_num_threads(1)
ap = argparse.ArgumentParser()
ap.add_argument("root")
ap.add_argument("--n", type=int, default=300)
ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
ap.add_argument("--keep", choices=["sample", "top"], default="sample")
ap.add_argument("--sbs", action="store_true", help="the target's sampled beam search too")
ap.add_argument("--width", type=int, default=20, help="draft width N (default 2K)")
args = ap.parse_args()
root, n, k = args.root, args.n, 10
data = load_prepared(f"{root}/data")
index = data.index
target = load_decoder(f"{root}/target", DeviceConfig(device="cpu"))
prompts = data.prompts("test", limit=n)
targets = [index.canonical(t).tolist() for t in data.targets("test", limit=n)]


def run(fn) -> tuple[float, float, float]:
    """Recall@k, mean target calls, mean accepted steps over the prompts, in batches of 32."""
    items, calls, acc = [], [], []
    with torch.no_grad():
        for s in range(0, n, 32):
            out = fn(prompts[s:s + 32])
            items += out.items
            calls += out.stats.get("target_calls", [])
            acc += out.stats.get("accepted_steps", [0] * len(out.items))
    return recall_at_k(items, targets, k), sum(calls) / n, sum(acc) / n


def show(name: str, seed: object, r: tuple[float, float, float]) -> None:
    print(f"{name:>36} seed {seed}: Recall@{k} {r[0]:.4f}  target calls {r[1]:.2f}  "
          f"accepted steps {r[2]:.2f}", flush=True)


show("beam", "-", run(lambda b: beam_search(target, b, index, k)))
drafts = [("target-as-draft", target),
          ("atspeed-r", load_drafter(f"{root}/drafts/atspeed-r", DeviceConfig(device="cpu")))]
if args.sbs:
    for seed in args.seeds:
        p = SearchParams(k, k, 0, "relaxed", seed=seed)
        show("target sampled beam search", seed, run(lambda b: speculative_search(target, target, b, index, p)))
for name, draft in drafts:
    for seed in args.seeds:
        p = SearchParams(k, args.width, 3, "relaxed", seed=seed, relaxed_keep=args.keep)
        show(f"{name} ({args.keep})", seed, run(lambda b: speculative_search(target, draft, b, index, p)))
