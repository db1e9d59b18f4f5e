"""`make demo`: the whole pipeline on built-in synthetic data, then the recommendation endpoint.

    python jobs/demo.py [--out demo_out] [--no-serve] [--verbose] [--llm]

The terminal shows each stage's command, its progress lines and, at the end, the results in
one screen (``report.results_screen``: Recall@K per method, then per verification mode WS with
its spread, the oracle fraction, target calls per request and identical top-K or Recall@K; the
full tables are in OUT/eval) and, when the target is below the reference recommenders, a note
saying why; then the serving example. The logs of Ray, DeepSpeed and the other libraries go to
OUT/logs/<command>.log without colour codes (--verbose, or ATSPEED_VERBOSE=1, prints them here
too).

The default target is the `deep` preset, trained from scratch: 24 Llama layers of width 32
(0.4M parameters). A pass of a target that narrow costs what its layers' ops cost, nearly
whatever its tokens (prompt + 30 tree tokens 20 ms, + 90 tokens 25 ms on 2 cores), as a large
target's pass does on a GPU: it shows what speculation buys where the passes are the cost.
The `tiny` preset (2 layers) could not: its pass is cheaper than a round's drafting, acceptance
and bookkeeping (about 12 ms on 2 cores), and its feature draft ran at 0.49x at K = 10 with
3.07 target calls per request. On a fresh clone on a 2-core AMD EPYC `make demo` took 15 min
in all: install 2 min, the pipeline 630 s (the target's one epoch 247 s, evaluate 179 s), the
endpoint's start, example and stop 2 min; its feature draft ran at 1.30x [1.24-1.37] at K = 10
(2.00 target calls per request), strict and exact (results/demo/RUN.md, with the targets
measured before choosing this one).
``--llm`` fine-tunes the bundled SmolLM2-135M instead (the regime where the target's pass
dominates), with drafts cut from its first layers; it took 24 min on 2 cores (see
results/demo-llm/RUN.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `ray job submit --working-dir .`

from atspeed_ray.pipeline import (  # noqa: E402
    PipelineConfig, StageSettings, env_verbose, run_pipeline, serve_demo,
)


def deep_config(out: str, verbose: bool) -> PipelineConfig:
    """The deep, narrow from-scratch target (``deep`` preset: 24 layers of width 32) and a
    1-layer atspeed-s LM draft, on Ray Train + DeepSpeed, and a feature draft trained in process
    (an sft draft beside them took 62 s to train and 60 s to evaluate: past the 15 minutes)."""
    return PipelineConfig(
        data="synthetic", out=out, preset="deep",
        target=StageSettings(epochs=1, micro_batch=64, lr=3e-3, max_samples=13000),
        align=StageSettings(epochs=2, micro_batch=64, lr=3e-3),
        teacher_k=10, teacher_samples=2500, losses=["atspeed-s"],
        # a feature draft on the target's own top 10, in process: Ray Train's start would add
        # about 40 s here (`align --draft-kind feature --workers 2` trains it there)
        feature=StageSettings(epochs=5, micro_batch=32, lr=3e-3, max_samples=4000, workers=0,
                              extra=["--val-samples", "32"]),
        eval_k=[1, 10], eval_prompts=300, timing_prompts=30, draft_beams="3k", verbose=verbose,
    )


def llm_config(out: str, verbose: bool) -> PipelineConfig:
    """The bundled SmolLM2-135M fine-tuned as the target (in process), drafts of its first 2
    layers with a code head: sft on the training data, then atspeed-s / atspeed-r aligned from
    it on the target's top-10; strict decoding in fp32 (exact), short prompts (10 items)."""
    val = ["--val-samples", "32"]
    return PipelineConfig(
        data="synthetic", out=out, history_len=10, base_model="smollm2",
        target=StageSettings(epochs=1, micro_batch=8, lr=5e-4, max_samples=480, workers=0,
                             extra=["--samples", "sequence", *val]),
        draft_init_layers=2, draft_recipe="sft-then-align",
        sft=StageSettings(epochs=1, micro_batch=32, lr=1e-3, max_samples=3000, workers=0,
                          extra=["--code-head", *val]),
        align=StageSettings(epochs=3, micro_batch=32, lr=3e-4, workers=0, extra=["--code-head", *val]),
        teacher_k=10, teacher_samples=200, teacher_workers=0, teacher_extra=["--max-valid", "32"],
        losses=["sft", "atspeed-s", "atspeed-r"],
        eval_k=[1, 10], eval_prompts=100, timing_prompts=10, draft_beams="2k", verbose=verbose,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--no-serve", action="store_true", help="skip starting the endpoint")
    p.add_argument("--llm", action="store_true",
                   help="fine-tune the bundled SmolLM2-135M as the target (about 25 min on 2 cores)")
    p.add_argument("--verbose", action="store_true", default=env_verbose(),
                   help="also print Ray's, DeepSpeed's and the libraries' logs (default: ATSPEED_VERBOSE)")
    args = p.parse_args()
    cfg = (llm_config if args.llm else deep_config)(args.out, args.verbose)
    out = run_pipeline(cfg)
    if not args.no_serve:
        serve_demo(out, verbose=cfg.verbose)


if __name__ == "__main__":
    main()
