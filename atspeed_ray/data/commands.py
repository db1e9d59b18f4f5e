"""``atspeed-ray prepare``."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="write Parquet splits, item index and tokenizer")
    p.add_argument("--data", required=True, help='"synthetic" or a release folder (e.g. ../shared/data/beauty)')
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--history-len", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    p.add_argument("--num-users", type=int, default=None, help="synthetic data: number of users")
    p.add_argument("--num-items", type=int, default=None, help="synthetic data: number of items")
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from atspeed_ray.data.prepare import prepare
    from atspeed_ray.data.synthetic import SyntheticConfig

    overrides = {k: v for k, v in {"seed": args.seed, "num_users": args.num_users,
                                   "num_items": args.num_items}.items() if v is not None}
    synthetic = SyntheticConfig(**overrides) if args.data == "synthetic" else None
    summary = prepare(args.data, args.out, history_len=args.history_len, synthetic=synthetic)
    keys = ("users", "items", "L", "vocab_size", "samples", "skipped", "collision_groups")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
    return 0
