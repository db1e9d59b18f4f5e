"""``python -m atspeed_ray.reference``: the reference rows alone, without a target.

Writes OUT/accuracy.{json,csv,md} in ``evaluate``'s format (method, mode ``-``, k, recall, ndcg)
for popularity and the reference recommenders on the first ``--num-prompts`` test prompts, the
same prompts and item ids ``evaluate`` uses, so that the rows can stand beside a target's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from atspeed_ray.reference.config import add_reference_args, reference_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from atspeed_ray.flags import parse_ks
    from atspeed_ray.settings import DEFAULT_KS

    p = argparse.ArgumentParser(prog="python -m atspeed_ray.reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared folder, release folder or 'synthetic'")
    p.add_argument("--out", required=True, help="output folder for accuracy.{json,csv,md}")
    p.add_argument("--k", type=parse_ks, default=list(DEFAULT_KS))
    p.add_argument("--num-prompts", type=int, default=None, help="test prompts (default: all)")
    p.add_argument("--seed", type=int, default=0)
    add_reference_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from atspeed_ray.data.prepare import open_data, popularity_topk
    from atspeed_ray.report import write_table
    from atspeed_ray.metrics import ndcg_at_k, recall_at_k
    from atspeed_ray.reference.data import canonical_lists, reference_rankings

    args = parse_args(argv)
    t0 = time.perf_counter()
    data = open_data(args.data)
    targets = canonical_lists(data.index, data.targets("test", limit=args.num_prompts))
    kmax = max(args.k)
    print(f"references: {len(targets)} test prompts, K={args.k}", flush=True)
    popular = data.index.canonical(popularity_topk(data, kmax)).tolist()
    ranked = {"popularity": [popular] * len(targets)}
    ranked.update(reference_rankings(data, data.histories("test", limit=args.num_prompts), kmax,
                                     reference_config(args)))
    rows = [{"method": m, "mode": "-", "k": k, "recall": recall_at_k([r[:k] for r in ranks], targets, k),
             "ndcg": ndcg_at_k([r[:k] for r in ranks], targets, k)}
            for m, ranks in ranked.items() for k in args.k]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_table(rows, out, "accuracy", ["method", "mode", "k", "recall", "ndcg"])
    print((out / "accuracy.md").read_text())
    print(f"wrote {out}/accuracy.{{json,csv,md}} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
