"""`make demo`: the whole pipeline on built-in synthetic data, then the recommendation endpoint.

    python jobs/demo.py [--out demo_out] [--no-serve] [--verbose]

The terminal shows each stage's command, its progress lines and the result tables; the logs of
Ray, DeepSpeed and the other libraries go to OUT/logs/<command>.log (--verbose, or
ATSPEED_VERBOSE=1, prints them here too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `ray job submit --working-dir .`

from atspeed_ray.pipeline import (  # noqa: E402
    PipelineConfig, StageSettings, env_verbose, run_pipeline, serve_demo,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--no-serve", action="store_true", help="skip starting the endpoint")
    p.add_argument("--verbose", action="store_true", default=env_verbose(),
                   help="also print Ray's, DeepSpeed's and the libraries' logs (default: ATSPEED_VERBOSE)")
    args = p.parse_args()
    cfg = PipelineConfig(
        data="synthetic", out=args.out, preset="tiny",
        target=StageSettings(epochs=4, micro_batch=64, lr=3e-3),
        align=StageSettings(epochs=2, micro_batch=64, lr=3e-3),
        teacher_k=10, teacher_samples=4000, losses=["sft", "atspeed-s", "atspeed-r"],
        eval_k=[1, 5, 10], timing_prompts=30, draft_beams="2k", verbose=args.verbose,
    )
    out = run_pipeline(cfg)
    if not args.no_serve:
        serve_demo(out, verbose=cfg.verbose)


if __name__ == "__main__":
    main()
