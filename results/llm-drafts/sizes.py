import json, sys
from atspeed_ray.models import DeviceConfig, load_decoder
from atspeed_ray.draft_tradeoff import draft_size
names = sys.argv[1:]
rows = []
for n in names:
    d = load_decoder(f"/tmp/drafts/cost/{n}", DeviceConfig(device="cpu", dtype="float32"))
    s = draft_size(d)
    emb = s["embedding_rows"] * s["hidden"]
    body = s["params"] - emb - (0 if s["tied"] else s["head_rows"] * s["hidden"])
    s.update(draft=n, layer_macs_per_token=body, head_macs_per_token=s["head_rows"] * s["hidden"])
    rows.append(s)
    print(n, s, flush=True)
json.dump(rows, open("/tmp/drafts/sizes.json", "w"), indent=1)
