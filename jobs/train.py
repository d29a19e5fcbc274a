"""`ray job submit --working-dir . -- python jobs/train.py --config cfg.yaml [--set k=v ...]`

Thin entrypoint: the same code as `rerank train`. Inside a Ray job,
RAY_ADDRESS is set, so the stage connects to the cluster instead of starting
a local Ray.
"""

import sys

from ray_app.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
