"""Untrained drafts of every kind for the SmolLM2 target (cost needs no training), built by
align's own build_model and saved as align exports them."""
import sys
import torch
from atspeed_ray.data.prepare import load_prepared
from atspeed_ray.models import load_weights, save_model, DeviceConfig
from atspeed_ray.training.config import TrainConfig
from atspeed_ray.training.init_model import resize_to_tokenizer
from atspeed_ray.training.setup import build_model

root = "/tmp/drafts"
p = load_prepared(f"{root}/data")
import os
if not os.path.exists(f"{root}/target0/config.json"):
    m = load_weights(f"{root}/smollm2", DeviceConfig(device="cpu", dtype="float32"))
    resize_to_tokenizer(m, p.tokenizer, "mean")
    save_model(m, p.tokenizer, f"{root}/target0")
kinds = {
    "compact_1x64": dict(draft_size="1x64", compact_vocab=True),
    "compact_1x128": dict(draft_size="1x128", compact_vocab=True),
    "compact_2x128": dict(draft_size="2x128", compact_vocab=True),
    "compact_2x256": dict(draft_size="2x256", compact_vocab=True),
    "full_1x64": dict(draft_size="1x64"),
    "codehead_1x64": dict(draft_size="1x64", code_head=True),
    "full_2x256": dict(draft_size="2x256"),
    "codehead_2x256": dict(draft_size="2x256", code_head=True),
    "cut1_full": dict(init_layers=1),
    "cut1_codehead": dict(init_layers=1, code_head=True),
    "cut2_codehead": dict(init_layers=2, code_head=True),
    "cut1_compact": dict(init_layers=1, compact_vocab=True),
    "cut2_compact": dict(init_layers=2, compact_vocab=True),
}
for name, kw in kinds.items():
    out = f"{root}/cost/{name}"
    if os.path.exists(f"{out}/config.json"):
        continue
    cfg = TrainConfig(task="align", data=f"{root}/data", target=f"{root}/target0", out=out,
                      loss="sft", **kw)
    save_model(build_model(cfg, p, torch.device("cpu")).eval(), p.tokenizer, out)
    print(name, flush=True)
