"""Ray Tune search of the alignment weights, for `ray job submit --working-dir . -- python
jobs/tune_alignment.py --data D --target T --teacher TD --space tuning/atspeed_s.yaml
--num-samples 8 --out runs/tune`. Takes the same options as `atspeed-ray tune`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, under ray job submit

from atspeed_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
