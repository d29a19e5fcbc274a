"""`ray job submit --working-dir . -- python jobs/evaluate.py --config cfg.yaml [--set k=v ...]`

Thin entrypoint: the same code as `rerank evaluate`.
"""

import sys

from ray_app.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
