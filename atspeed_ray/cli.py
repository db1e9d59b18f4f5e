"""The ``atspeed-ray`` command. Each feature module registers its own subcommands; handlers
import heavy packages (torch, ray) lazily so that ``--help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# modules with a ``register(subparsers)`` function
COMMAND_MODULES = [
    "atspeed_ray.base_model",
    "atspeed_ray.data.commands",
    "atspeed_ray.bench",
    "atspeed_ray.evaluate",
    "atspeed_ray.training.commands",
    "atspeed_ray.serving.commands",
    "atspeed_ray.tune",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atspeed-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from atspeed_ray.data.errors import DataError
    from atspeed_ray.training.ray_utils import AuthOff, check_auth, permit_no_auth

    try:
        if getattr(args, "allow_no_auth", None) is not None:  # a command that starts or joins Ray
            if args.allow_no_auth:
                permit_no_auth()
            check_auth()  # before any work, not minutes later in init_ray
        return int(args.func(args) or 0)
    except (DataError, FileNotFoundError, AuthOff) as e:  # bad input: one clear line, no stack trace
        print(f"atspeed-ray {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
