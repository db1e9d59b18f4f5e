"""Recall@10 of relaxed search over 8 seeds (mean, sd, min, max), on the demo's tiny target:
the target's own sampled beam search (relaxed, gamma = 0: no draft), the target as its own
draft, the atspeed-r draft (N = 20, gamma = 3). One torch thread.

    python results/relaxed/seed_spread.py RUN_FOLDER [N_PROMPTS]
"""
import statistics
import sys

import torch

from atspeed_ray.data.prepare import load_prepared
from atspeed_ray.decoding import SearchParams, speculative_search
from atspeed_ray.drafts import load_drafter
from atspeed_ray.metrics import recall_at_k
from atspeed_ray.models import DeviceConfig, load_decoder

torch.set_num_threads(1)
root = sys.argv[1]
n, k = (int(sys.argv[2]) if len(sys.argv) > 2 else 300), 10
data = load_prepared(f"{root}/data")
index = data.index
target = load_decoder(f"{root}/target", DeviceConfig(device="cpu"))
ar = load_drafter(f"{root}/drafts/atspeed-r", DeviceConfig(device="cpu"))
prompts = data.prompts("test", limit=n)
targets = [index.canonical(t).tolist() for t in data.targets("test", limit=n)]
for name, draft, gamma in (("target sampled beam search (gamma=0)", target, 0),
                           ("target-as-draft", target, 3), ("atspeed-r", ar, 3)):
    r = []
    for seed in range(8):
        p = SearchParams(k, 2 * k, gamma, "relaxed", seed=seed)
        with torch.no_grad():
            items = [i for s in range(0, n, 32)
                     for i in speculative_search(target, draft, prompts[s:s + 32], index, p).items]
        r.append(recall_at_k(items, targets, k))
    print(f"{name}: mean {statistics.mean(r):.4f} sd {statistics.stdev(r):.4f} "
          f"min {min(r):.4f} max {max(r):.4f}", flush=True)
