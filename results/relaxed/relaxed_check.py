"""Relaxed SD with the target as its own draft (a perfect draft: its output is the target's own
sampling) against beam search, Recall@10, on the demo's tiny target."""
import torch
from atspeed_ray.data.prepare import load_prepared
from atspeed_ray.models import DeviceConfig, load_decoder
from atspeed_ray.decoding import SearchParams, beam_search, speculative_search
from atspeed_ray.drafts import load_drafter
from atspeed_ray.metrics import recall_at_k
torch.set_num_threads(1)
import sys
root = sys.argv[1]  # a demo output folder (make demo OUT=...)
data = load_prepared(f"{root}/data"); index = data.index
target = load_decoder(f"{root}/target", DeviceConfig(device="cpu"))
n = 300
prompts = data.prompts("test", limit=n)
targets = [index.canonical(t).tolist() for t in data.targets("test", limit=n)]
def ranked(fn):
    with torch.no_grad():
        return [i for s in range(0, n, 32) for i in fn(prompts[s:s + 32]).items]
k = 10
print("beam", recall_at_k(ranked(lambda b: beam_search(target, b, index, k)), targets, k))
for name, draft in (("target-as-draft", target),
                    ("atspeed-r", load_drafter(f"{root}/drafts/atspeed-r", DeviceConfig(device="cpu")))):
    for seed in (0, 1):
        p = SearchParams(k, 2 * k, 3, "relaxed", seed=seed)
        print(name, seed, recall_at_k(ranked(lambda b: speculative_search(target, draft, b, index, p)), targets, k))
