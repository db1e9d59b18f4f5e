"""``atspeed-ray prepare``."""

from __future__ import annotations

import argparse

from atspeed_ray.data.templates import DEFAULT_TEMPLATE, TEMPLATE_NAMES
from atspeed_ray.report import print_summary


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="write Parquet splits, item index and tokenizer")
    p.add_argument("--data", required=True, help='"synthetic" or a release folder (e.g. ../shared/data/beauty)')
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--history-len", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    p.add_argument("--num-users", type=int, default=None, help="synthetic data: number of users")
    p.add_argument("--num-items", type=int, default=None, help="synthetic data: number of items")
    p.add_argument("--base-model", default=None,
                   help="a pretrained LLM folder (e.g. from `atspeed-ray base-model`): tokenize with "
                        "its tokenizer plus the code tokens (default: a word-level tokenizer)")
    p.add_argument("--prompt-template", default=DEFAULT_TEMPLATE, choices=TEMPLATE_NAMES,
                   help="text around the history (history: none; instruction: LC-Rec style; "
                        "chat: the model's chat template); text needs --base-model")
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from atspeed_ray.data.prepare import prepare
    from atspeed_ray.data.synthetic import SyntheticConfig

    overrides = {k: v for k, v in {"seed": args.seed, "num_users": args.num_users,
                                   "num_items": args.num_items}.items() if v is not None}
    synthetic = SyntheticConfig(**overrides) if args.data == "synthetic" else None
    summary = prepare(args.data, args.out, history_len=args.history_len, synthetic=synthetic,
                      base_model=args.base_model, prompt_template=args.prompt_template)
    keys = ("users", "items", "L", "vocab_size", "samples", "skipped", "collision_groups",
            "prompt_template", "prompt_tokens")
    print_summary(f"prepared {args.out} (summary.json):", {k: summary[k] for k in keys if k in summary})
    return 0
