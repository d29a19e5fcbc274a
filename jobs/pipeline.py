"""`ray job submit --working-dir . -- python jobs/pipeline.py --config <pipeline YAML>`

prepare -> train -> evaluate -> nightly in one Ray job (plus `generate` when the
config asks for sample data). Exit code 0 when every stage published its output,
2 for a config error (nothing ran), 1 when a stage failed: the log's last line
names the stage and the error, earlier lines say where.
"""

import sys

from ray_app.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
