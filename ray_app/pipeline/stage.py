"""`pipeline` and what `rerank demo` runs: the pipeline stages as one job."""

from __future__ import annotations

from typing import Any

from ray_app.config import load_config
from ray_app.pipeline.config import PipelineConfig
from ray_app.runtime import local_cpus
from ray_app.stage import Stage

PIPELINE = Stage(
    name="pipeline",
    config=PipelineConfig,
    run_path="ray_app.pipeline.run:run_pipeline",
    summarize=lambda cfg, summary: summary,
    show=lambda cfg, summary: "",  # run_pipeline prints its summary as it goes
    help="run generate? -> prepare -> train -> evaluate -> nightly as one job",
    description="Each stage's keys under its name (or `config: <stage file>`), the paths "
    "between stages under workdir. Every key is checked before the first stage starts. On a "
    "cluster: ray job submit --working-dir . -- python jobs/pipeline.py --config ...",
    examples=(
        "rerank pipeline --config cluster/configs/pipeline-demo.yaml --set workdir=runs/pipeline",
        "rerank pipeline --config cluster/configs/pipeline-demo.yaml "
        "--set workdir=runs/p --set train.max_minutes=2 --set stages=[train,evaluate]",
    ),
)


DEMO_BASELINES = ("popularity", "item_knn", "ease", "sasrec_ce", "text_tfidf")


def demo_config(
    workdir: str,
    events: int,
    encoder: str,
    train_minutes: float,
    sasrec_epochs: int,
    overrides: list[str],
) -> PipelineConfig:
    """The pipeline on the embedded defaults: generated sample data, the bundled
    encoder, a training time budget and a short SASRec so it takes minutes."""
    base: dict[str, Any] = {
        "workdir": workdir,
        "generate": {"num_events": events},
        "train": {
            # A frozen encoder: on CPUs its steps are cheaper, and in a budget of minutes
            # more epochs beat fine-tuning its top layer (the README has the figures).
            # No dropout: a budget of minutes ends before the model could overfit, and
            # without it a step is about 1.4x faster.
            "model": {"encoder": encoder, "trainable_layers": 0, "dropout": 0.0},
            # One worker on a local Ray: its threads may use every core (Ray Data's feed
            # needs little), which steps about 1.2x faster than one thread on 2 cores.
            "torch_threads": local_cpus(),
            "epochs": 3,
            "max_minutes": train_minutes,
            "resume": False,
        },
        # The light evaluate the demo's time allows: SASRec in its stronger full-softmax
        # variant only (the BCE one scores below it on this data; the README has both).
        "evaluate": {"sasrec_epochs": sasrec_epochs, "baselines": list(DEMO_BASELINES)},
    }
    cfg = load_config(PipelineConfig, None, overrides, base=base)
    split = dict(cfg.prepare.get("split") or {})
    if split.get("method", "time") == "time":
        cfg.prepare["split"] = {**time_split(cfg.generate or {}), **split}
    return cfg


def time_split(generate: dict[str, Any], valid: float = 0.78, test: float = 0.89) -> dict[str, Any]:
    """A global time split of the generated period: valid from `valid` of the way
    through it, test from `test`. Items keep arriving, so the test period holds items
    no training event has met, and users come back to it after gaps of any length:
    the moments a nightly list and a returning user's request are scored at."""
    from ray_app.data.config import GenerateConfig
    from ray_app.times import parse_time

    defaults = GenerateConfig.model_fields
    start = parse_time(generate.get("start", defaults["start"].default))
    days = float(generate.get("days", defaults["days"].default))
    return {
        "method": "time",
        "valid_start": int(start + valid * days * 86_400),
        "test_start": int(start + test * days * 86_400),
    }
