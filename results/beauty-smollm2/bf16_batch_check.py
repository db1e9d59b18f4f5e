"""Does the target's own beam search give a prompt the same top-K alone and inside a batch?
(serving/RUN.md, sixth session: bf16 on the CPU: 19 of 32 test prompts differed at a batch of 8,
fp32: 0, until ``invariant_attention`` summed the left-padded prompt block in order; now 0.)

    PYTHONPATH=$PWD python results/beauty-smollm2/bf16_batch_check.py --data DATA --target TARGET --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch

from atspeed_ray.data.prepare import open_data
from atspeed_ray.decoding import beam_search
from atspeed_ray.models import DeviceConfig, load_decoder


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompts", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(2)
    data = open_data(args.data, models=(args.target,))
    target = load_decoder(args.target, DeviceConfig(device="cpu", dtype=args.dtype))
    prompts = data.prompts("test", limit=args.prompts)
    differ = 0
    with torch.no_grad():
        for s in range(0, len(prompts), args.batch):
            batch = prompts[s:s + args.batch]
            together = beam_search(target, batch, data.index, args.k).items
            differ += sum(beam_search(target, [q], data.index, args.k).items[0] != together[i]
                          for i, q in enumerate(batch))
    print(f"{args.dtype}: {differ} of {len(prompts)} prompts get another top {args.k} in a batch "
          f"of {args.batch} than alone")


if __name__ == "__main__":
    main()
