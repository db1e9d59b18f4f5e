#!/bin/bash
# teacher data from the target, then every draft aligned with the same budget, then the table
set -e
cd /tmp/drafts
export PYTHONPATH=/work/wt/drafts
P="nice -n 10 /work/main/.venv/bin/python -m atspeed_ray.cli"
# the target: SmolLM2 fine-tuned on whole sequences in bf16 (--max-samples 192: 24 steps; drop it
# for the full 217 steps of one epoch); data and smollm2 as in RUN.md
[ -f target/config.json ] || $P train-target --data data --out target --init smollm2 --samples sequence --precision bf16 --workers 0 --threads 2 --epochs 1 --micro-batch 8 --max-samples 192 --lr 3e-4 --val-samples 8 --val-k 10 > target.log 2> target.err
[ -d teacher ] || $P teacher --data data --target target --out teacher --k 10 --workers 0 --max-samples 256 --max-valid 16 --batch-size 32 > teacher.log 2> teacher.err
COMMON="--data data --target target --teacher teacher --loss atspeed-s --workers 0 --threads 2 --epochs 2 --micro-batch 16 --max-samples 256 --teacher-k 10 --val-samples 8 --val-k 10 --val-draft-beams 20 --precision bf16 --lr 1e-3"
align() { name=$1; shift; [ -f d_$name/config.json ] || $P align $COMMON --out d_$name "$@" > a_$name.log 2> a_$name.err; }
align compact_1x64 --draft-size 1x64 --compact-vocab
align compact_1x128 --draft-size 1x128 --compact-vocab
align compact_2x128 --draft-size 2x128 --compact-vocab
align compact_2x256 --draft-size 2x256 --compact-vocab
align full_1x64 --draft-size 1x64
align codehead_1x64 --draft-size 1x64 --code-head
align cut1_codehead --init-layers 1 --code-head
align cut2_codehead --init-layers 2 --code-head
align cut1_full --init-layers 1
align cut1_compact --init-layers 1 --compact-vocab
