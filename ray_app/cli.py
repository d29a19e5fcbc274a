"""`rerank`: one console script, a subcommand per stage.

Each subcommand's help text and examples live in COMMANDS below (the tests run
every example through the parser and the config models, so they stay valid);
`rerank <command> --help` shows them, `rerank config <stage>` lists every key.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ray_app.config import COMMAND_MODELS, ConfigError, PipelineConfig, load_config

if TYPE_CHECKING:
    from pydantic import BaseModel

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
        help="override a config key, e.g. --set split.max_history=100 (repeatable); "
        "`rerank config <command>` lists every key",
    )


def command_config(args: argparse.Namespace) -> BaseModel:
    """The validated config of a stage command: its --config file, then --set
    overrides, then its own flags (nightly's --date)."""
    overrides = [*args.overrides]
    if getattr(args, "date", None):
        overrides.append(f"date={args.date}")
    return load_config(COMMAND_MODELS[args.command], args.config, overrides)


def _cmd_generate(args: argparse.Namespace) -> int:
    from ray_app.data.synthetic import generate

    cfg = command_config(args)
    summary = generate(cfg)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from ray_app.data.prepare import run_prepare

    cfg = command_config(args)
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

    cfg = command_config(args)
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

    cfg = command_config(args)
    metrics = run_evaluate(cfg)
    print(markdown(metrics))
    return 0


def _cmd_nightly(args: argparse.Namespace) -> int:
    from ray_app.batch.nightly import run_nightly

    cfg = command_config(args)
    out = run_nightly(cfg)
    keep = ("output", "date", "as_of", "model_version", "counts", "latest", "timings")
    print(json.dumps({k: out[k] for k in keep}, indent=2))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ray_app.serving.run import start

    cfg = command_config(args)
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

    cfg = command_config(args)
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
            # A frozen encoder: on CPUs its steps are 2-3x cheaper, and in a budget of
            # minutes more epochs beat fine-tuning its top layer (generated data, 4 min:
            # full NDCG@10 0.239 vs 0.161).
            "model": {"encoder": args.encoder, "trainable_layers": 0},
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


COMMANDS: dict[str, tuple[str, str, list[str]]] = {
    # name: (one-line help, description, examples)
    "generate": (
        "write synthetic interaction logs and an item catalogue",
        "Synthetic logs for trying the project without data: users with a few interests, "
        "Zipf-like item popularity, several event types, and item titles, genres and "
        "descriptions that carry the signal the text encoder can learn from. Writes "
        "<output>/interactions/part-*.parquet and <output>/items/items.parquet.",
        [
            "rerank generate --set output=runs/raw --set num_events=1000000",
            "rerank generate --set output=runs/raw --set num_items=5000 --set seed=1",
        ],
    ),
    "prepare": (
        "validate logs and build sequences/examples (Ray Data)",
        "Read the logs and the catalogue (CSV/TSV/JSONL/Parquet, local or s3://, gs://...), "
        "validate every row (bad rows kept in rejected/ with a reason and counted), order "
        "each user's events in time, split train/valid/test and build training examples "
        "with sampled negatives. Publishes <output>/ atomically with a manifest.json.",
        [
            "rerank prepare --config cluster/configs/prepare-movielens.yaml",
            "rerank prepare --set input.adapter=movielens --set input.path=data/ml-latest-small "
            "--set output=runs/ml/prepared",
            "rerank prepare --set input.interactions='logs/*.parquet' --set input.items="
            "items.jsonl --set input.interaction_columns.user_id=uid --set output=runs/prepared",
        ],
    ),
    "train": (
        "fine-tune the re-ranker with Ray Train and publish a model artifact",
        "Train the text + behaviour re-ranker on a prepare output with Ray Train (one DDP "
        "process per worker; NCCL and mixed precision on GPUs), validate every epoch, keep the "
        "best epoch, checkpoint from rank 0 and publish <output>/ (safetensors weights, item "
        "table, encoder, metrics, training_curves.png). A re-run with the same output resumes "
        "from the last checkpoint.",
        [
            "rerank train --config cluster/configs/train-movielens.yaml",
            "rerank train --set prepared=runs/ml/prepared --set output=runs/ml/model "
            "--set max_minutes=10",
            "rerank train --config cluster/configs/train-cluster.yaml --set num_workers=4",
        ],
    ),
    "evaluate": (
        "score the model and baselines on a prepared split: both protocols, report and plots",
        "Fit popularity, item-kNN, EASE and SASRec (BCE and full-softmax CE) on train, tune "
        "them on valid, and score them and any trained models on valid and test, sampled (99 "
        "negatives) and full-ranking: at each target's time, at its history's last event + "
        "each of `deltas` (returning users), and as the nightly run of the day before listed "
        "it (backtest). Writes metrics.json, report.md and PNG plots to <output>/.",
        [
            "rerank evaluate --config cluster/configs/evaluate-movielens.yaml",
            "rerank evaluate --set prepared=runs/ml/prepared --set output=runs/ml/eval "
            "--set models.reranker=runs/ml/model",
            "rerank evaluate --set prepared=runs/ml/prepared --set output=runs/ml/eval "
            "--set baselines=[popularity,ease] --set deltas=[0s,1d,30d]",
            "rerank evaluate --config cluster/configs/evaluate-movielens.yaml "
            "--set models='{s0: runs/ml/m0, s1: runs/ml/m1}' --set groups='{reranker: [s0, s1]}'",
        ],
    ),
    "nightly": (
        "precompute every user's top-K to Parquet and publish it (Ray Data)",
        "For every user, from their events up to the end of the date: retrieve candidates "
        "with the user vector against the item table, "
        "re-rank them with the model (the serving Ranker), keep the top K and publish "
        "<output>/dt=<date>/part-*.parquet atomically, then point <output>/LATEST at it. "
        "Schedule it daily (cluster/kuberay/nightly-cronjob.yaml).",
        [
            "rerank nightly --set model=runs/demo/model --set prepared=runs/demo/prepared "
            "--set output=runs/demo/topk",
            "rerank nightly --config cluster/configs/nightly-cluster.yaml --date 2026-11-24",
            "rerank nightly --set model=runs/demo/model --set prepared=runs/demo/prepared "
            "--set output=runs/demo/backtest --set as_of=test",
        ],
    ),
    "pipeline": (
        "run generate? -> prepare -> train -> evaluate -> nightly as one job",
        "Each stage's keys under its name (or `config: <stage file>`), the paths between "
        "stages under workdir. Every key is checked before the first stage starts. On a "
        "cluster: ray job submit --working-dir . -- python jobs/pipeline.py --config ...",
        [
            "rerank pipeline --config cluster/configs/pipeline-demo.yaml "
            "--set workdir=runs/pipeline",
            "rerank pipeline --config cluster/configs/pipeline-demo.yaml "
            "--set workdir=runs/p --set train.max_minutes=2 --set stages=[train,evaluate]",
        ],
    ),
    "serve": (
        "serve the re-ranker over HTTP with Ray Serve (autoscaling, batching)",
        "Deploy the model artifact as a Ray Serve app on 127.0.0.1 (host/port to change): "
        "POST /v1/rerank, POST /v1/events, GET /v1/users/{id}/recommendations, /healthz, "
        "/readyz, OpenAPI at /docs. Ctrl-C stops it. On KubeRay: "
        "cluster/kuberay/rayservice.yaml.",
        [
            "rerank serve --set model=runs/demo/model --set topk=runs/demo/topk",
            "rerank serve --set model=runs/demo/model --set seed_histories=runs/demo/prepared "
            "--set port=8080",
            "rerank serve --set model=runs/demo/model --set events.kind=redis "
            "--set events.redis_url=redis://127.0.0.1:6379/0",
        ],
    ),
    "demo": (
        "the whole pipeline on generated sample data, local Ray (what `make demo` runs)",
        "Generate sample data and run prepare, train (bundled all-MiniLM-L6-v2, a time "
        "budget), evaluate and nightly on a local Ray. Outputs under --workdir; --set takes "
        "pipeline keys (stage-prefixed).",
        [
            "rerank demo --workdir runs/demo",
            "rerank demo --workdir runs/small --events 20000 --train-minutes 1 --encoder tiny",
            "rerank demo --set train.epochs=3 --set nightly.k=50",
        ],
    ),
    "config": (
        "print the configuration reference of a stage (every key, type, default)",
        "Every key a stage's YAML or --set accepts, generated from the config models: "
        "dotted key, type, default and description.",
        ["rerank config train", "rerank config serve", "rerank config"],
    ),
}


def _cmd_config(args: argparse.Namespace) -> int:
    from ray_app.config_reference import reference_markdown, stage_markdown

    print(stage_markdown(args.stage) if args.stage else reference_markdown())
    return 0


def build_parser() -> argparse.ArgumentParser:
    examples = "\n".join(f"  {ex[0]}" for _, _, ex in COMMANDS.values())
    parser = argparse.ArgumentParser(
        prog="rerank",
        description="LM re-ranking for recommenders on Ray: prepare data, train, evaluate, "
        "precompute nightly top-K lists, serve. `rerank <command> --help` shows each "
        "command's options and examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"examples:\n{examples}",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    funcs = {
        "generate": _cmd_generate,
        "prepare": _cmd_prepare,
        "train": _cmd_train,
        "evaluate": _cmd_evaluate,
        "nightly": _cmd_nightly,
        "pipeline": _cmd_pipeline,
        "serve": _cmd_serve,
        "demo": _cmd_demo,
        "config": _cmd_config,
    }
    for name, (help_text, description, command_examples) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=textwrap.fill(description, 88),
            epilog="examples:\n" + "\n".join(f"  {ex}" for ex in command_examples),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=funcs[name])
        if name == "demo":
            p.add_argument("--workdir", default="runs/demo", help="where data and outputs go")
            p.add_argument("--events", type=int, default=200_000, help="events to generate")
            p.add_argument(
                "--sasrec-epochs", type=int, default=40, help="epochs for the SASRec baseline"
            )
            p.add_argument(
                "--train-minutes",
                type=float,
                default=6.0,
                help="training time budget of the re-ranker",
            )
            p.add_argument(
                "--encoder",
                default="default",
                help="text encoder (default: bundled all-MiniLM-L6-v2; tiny: random, for tests)",
            )
            _add_config_args(p, with_file=False)
        elif name == "config":
            p.add_argument("stage", nargs="?", choices=list(COMMAND_MODELS), help="default: all")
        else:
            _add_config_args(p)
        if name == "nightly":
            p.add_argument("--date", help="YYYY-MM-DD (UTC) the lists are for; default: today")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `rerank config train | head`: the reader left, not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit
        return 0
    except Exception as e:
        from ray_app.errors import describe
        from ray_app.pipeline import StageFailed

        print(f"error: {e if isinstance(e, StageFailed) else describe(e)}", file=sys.stderr)
        if args.verbose:
            raise
        print(f"full traceback: {_write_traceback(e, args.command)}", file=sys.stderr)
        return 1


def _write_traceback(exc: BaseException, command: str) -> str:
    """The whole traceback (Ray's task tracebacks included) in a log file, so the
    one-line error stays readable and nothing is lost (`RERANK_LOG_DIR`, default
    the temp folder)."""
    import tempfile
    import time
    import traceback

    folder = os.environ.get("RERANK_LOG_DIR") or os.path.join(tempfile.gettempdir(), "rerank-logs")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{command}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log")
    with open(path, "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write("".join(traceback.format_exception(exc)))
    return path


if __name__ == "__main__":
    sys.exit(main())
