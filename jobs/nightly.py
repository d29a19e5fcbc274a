"""`ray job submit --working-dir . -- python jobs/nightly.py --config cfg.yaml [--date YYYY-MM-DD]`

Thin entrypoint, ready to be scheduled (cron, a KubeRay RayJob on a CronJob):
the same code as `rerank nightly`. Without `--date` the lists are for today
(UTC); re-running a date replaces its lists atomically.
"""

import sys

from ray_app.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
