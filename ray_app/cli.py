"""`rerank`: one console script, a subcommand per stage.

Examples::

    rerank generate --set output=runs/demo/raw --set num_events=200000
    rerank prepare --config cluster/configs/prepare-movielens.yaml
    rerank prepare --set input.adapter=movielens --set input.path=data/ml-latest-small \\
                   --set output=runs/ml/prepared
    rerank train --set prepared=runs/ml/prepared --set output=runs/ml/model
    rerank evaluate --config cluster/configs/evaluate-movielens.yaml
    rerank nightly --set model=runs/demo/model --set prepared=runs/demo/prepared \\
                   --set output=runs/demo/topk --date 2026-11-23
    rerank serve --set model=runs/demo/model --set topk=runs/demo/topk --set port=8000
    rerank pipeline --config cluster/configs/pipeline-demo.yaml --set workdir=runs/pipeline
    rerank demo --workdir runs/demo
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Sequence

from ray_app.config import (
    ConfigError,
    EvaluateConfig,
    GenerateConfig,
    NightlyConfig,
    PipelineConfig,
    PrepareConfig,
    ServeConfig,
    TrainConfig,
    load_config,
)

logger = logging.getLogger("ray_app")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _add_config_args(p: argparse.ArgumentParser, with_file: bool = True) -> None:
    if with_file:
        p.add_argument("--config", "-c", help="YAML config file for this stage")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set split.max_history=100 (repeatable)",
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    from ray_app.data.synthetic import generate

    cfg = load_config(GenerateConfig, args.config, args.overrides)
    summary = generate(cfg)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from ray_app.data.prepare import run_prepare

    cfg = load_config(PrepareConfig, args.config, args.overrides)
    manifest = run_prepare(cfg)
    print(
        json.dumps(
            {"output": cfg.output, "counts": manifest["counts"], "timings": manifest["timings"]},
            indent=2,
        )
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ray_app.training.trainer import run_train

    cfg = load_config(TrainConfig, args.config, args.overrides)
    metrics = run_train(cfg)
    last = metrics["history"][-1] if metrics["history"] else {}
    print(
        json.dumps(
            {
                "output": cfg.output,
                **{k: v for k, v in metrics.items() if k != "history"},
                "last_epoch": last,
            },
            indent=2,
        )
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ray_app.evaluation.evaluate import run_evaluate
    from ray_app.evaluation.report import markdown

    cfg = load_config(EvaluateConfig, args.config, args.overrides)
    metrics = run_evaluate(cfg)
    print(markdown(metrics))
    return 0


def _cmd_nightly(args: argparse.Namespace) -> int:
    from ray_app.batch.nightly import run_nightly

    overrides = [*args.overrides, *([f"date={args.date}"] if args.date else [])]
    cfg = load_config(NightlyConfig, args.config, overrides)
    out = run_nightly(cfg)
    keep = ("output", "date", "as_of", "model_version", "counts", "latest", "timings")
    print(json.dumps({k: out[k] for k in keep}, indent=2))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ray_app.serving.run import start

    cfg = load_config(ServeConfig, args.config, args.overrides)
    url = start(cfg)
    print(f"serving {cfg.model} on {url} (OpenAPI at {url}/docs); Ctrl-C stops", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    from ray import serve

    serve.shutdown()
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from ray_app.pipeline import run_pipeline

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    cfg.stage_configs()  # every stage's keys checked before the first stage starts
    run_pipeline(cfg)
    return 0


def demo_config(args: argparse.Namespace) -> PipelineConfig:
    """The pipeline on the embedded defaults: generated sample data, the bundled
    encoder, a training time budget and a short SASRec so it takes minutes."""
    base = {
        "workdir": args.workdir,
        "generate": {"num_events": args.events},
        "train": {
            "model": {"encoder": args.encoder},
            "epochs": 2,
            "max_minutes": args.train_minutes,
            "resume": False,
        },
        "evaluate": {"sasrec_epochs": args.sasrec_epochs},
    }
    cfg = load_config(PipelineConfig, None, args.overrides, base=base)
    cfg.stage_configs()
    return cfg


def _cmd_demo(args: argparse.Namespace) -> int:
    from ray_app.pipeline import run_pipeline

    cfg = demo_config(args)
    run_pipeline(cfg)
    paths = cfg.paths()
    print(f"report and plots: {paths['evaluation']}\ntop-K lists: {paths['topk']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rerank",
        description="LM re-ranking for recommenders on Ray: prepare data, train, evaluate, "
        "precompute nightly top-K lists, serve.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1],
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stages = (
        (
            "generate",
            _cmd_generate,
            "write synthetic interaction logs and a catalogue",
            "Synthetic logs with topic-driven users, Zipf popularity and text that carries "
            "signal. Example: rerank generate --set output=runs/raw --set num_events=1000000",
        ),
        (
            "prepare",
            _cmd_prepare,
            "validate logs and build sequences/examples (Ray Data)",
            "Read, validate, dedupe, split and build training examples. Example: rerank "
            "prepare --set input.adapter=movielens --set input.path=ml-latest-small "
            "--set output=runs/ml/prepared",
        ),
        (
            "train",
            _cmd_train,
            "fine-tune the re-ranker with Ray Train and publish a model artifact",
            "Train the text + behaviour re-ranker on a prepared output across Ray Train "
            "workers, checkpointing every epoch; a re-run with the same output resumes. "
            "Example: rerank train --config cluster/configs/train-movielens.yaml",
        ),
        (
            "evaluate",
            _cmd_evaluate,
            "score baselines on a prepared split: both protocols, report and plots",
            "Fit popularity, item-kNN, EASE and a SASRec-style model on train, tune on valid, "
            "score valid and test (sampled and full ranking). Example: rerank evaluate "
            "--set prepared=runs/ml/prepared --set output=runs/ml/eval",
        ),
        (
            "nightly",
            _cmd_nightly,
            "precompute every user's top-K to Parquet and publish it (Ray Data)",
            "Retrieve candidates for every user with the user vector against the item table, "
            "re-rank them with the model, keep the top K and publish "
            "<output>/dt=<date>/part-*.parquet atomically, then point <output>/LATEST at it. "
            "Schedule it daily. Example: rerank nightly --set model=runs/demo/model "
            "--set prepared=runs/demo/prepared --set output=runs/demo/topk --date 2026-11-23",
        ),
        (
            "pipeline",
            _cmd_pipeline,
            "run prepare -> train -> evaluate -> nightly as one job",
            "Each stage's keys under its name, the paths between stages under --set workdir "
            "(or generate: to start from sample data). For ray job submit: "
            "ray job submit --working-dir . -- python jobs/pipeline.py --config "
            "cluster/configs/pipeline-demo.yaml. "
            "Example: rerank pipeline --config cluster/configs/pipeline-demo.yaml "
            "--set workdir=runs/pipeline --set train.max_minutes=2",
        ),
        (
            "serve",
            _cmd_serve,
            "serve the re-ranker over HTTP with Ray Serve (autoscaling, batching)",
            "Deploy the model artifact as a Ray Serve app on 127.0.0.1 (host/port to change): "
            "POST /v1/rerank, POST /v1/events, GET /v1/users/{id}/recommendations, /docs. "
            "Example: rerank serve --set model=runs/demo/model --set topk=runs/demo/topk",
        ),
    )
    for name, func, help_text, description in stages:
        p = sub.add_parser(name, help=help_text, description=description)
        _add_config_args(p)
        p.set_defaults(func=func)
        if name == "nightly":
            p.add_argument("--date", help="YYYY-MM-DD (UTC) the lists are for; default: today")

    p = sub.add_parser(
        "demo",
        help="the whole pipeline on generated sample data, local Ray",
        description="Generate sample data and run every stage on a local Ray. "
        "Example: rerank demo --workdir runs/demo",
    )
    p.add_argument("--workdir", default="runs/demo", help="where data and outputs go")
    p.add_argument("--events", type=int, default=200_000, help="events to generate")
    p.add_argument("--sasrec-epochs", type=int, default=40, help="epochs for the SASRec baseline")
    p.add_argument(
        "--train-minutes", type=float, default=6.0, help="training time budget of the re-ranker"
    )
    p.add_argument(
        "--encoder", default="default", help="text encoder (default: bundled all-MiniLM-L6-v2)"
    )
    _add_config_args(p, with_file=False)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from ray_app.errors import describe
        from ray_app.pipeline import StageFailed

        print(f"error: {e if isinstance(e, StageFailed) else describe(e)}", file=sys.stderr)
        if args.verbose:
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
