"""`atspeed-ray align` as a Ray job (same flags as the CLI; use absolute paths)::

    ray job submit --working-dir . -- python jobs/align.py --help

Inside a job ``RAY_ADDRESS`` is set, so the command joins the submitting cluster.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working dir

from atspeed_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["align", *sys.argv[1:]]))
