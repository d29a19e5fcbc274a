"""`rerank`: one console script, a subcommand per stage (`ray_app/registry.py`), plus
`demo` and `config`.

Each stage's help text and examples live with the stage (`<package>/stage.py`;
the tests run every example through the parser and the config models, so they
stay valid); `rerank <command> --help` shows them, `rerank config <stage>`
lists every key.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray_app.config import ConfigError, load_config
from ray_app.pipeline import stage as pipeline_stage
from ray_app.pipeline.config import PipelineConfig
from ray_app.pipeline.run import StageFailed, run_pipeline, stage_configs
from ray_app.registry import COMMANDS
from ray_app.stage import json_line

if TYPE_CHECKING:
    from pydantic import BaseModel

logger = logging.getLogger("ray_app")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record (time, level, logger, message, exception), the line
    format log collectors (Loki, Fluent Bit, Cloud Logging) parse without a pattern."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json_line(out)


def _setup_logging(verbose: bool, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLogFormatter())
        handler.formatter.converter = time.gmtime
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True
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
    stage = COMMANDS[args.command]
    overrides = [*args.overrides]
    for option in stage.options:
        value = getattr(args, option.key, None)
        if value:
            overrides.append(f"{option.key}={value}")
    return load_config(stage.config, args.config, overrides)


def _run_stage(args: argparse.Namespace) -> int:
    stage = COMMANDS[args.command]
    cfg = command_config(args)
    result = stage.run(cfg)
    text = stage.show(cfg, result) if stage.show is not None else ""
    if text:
        print(text)
    print(stage.summary_line(cfg, result), flush=True)
    return 0


def demo_config(args: argparse.Namespace) -> PipelineConfig:
    """The demo's pipeline config from its flags, every stage's keys checked."""
    cfg = pipeline_stage.demo_config(
        args.workdir, args.events, args.encoder, args.train_minutes, args.sasrec_epochs,
        args.overrides,
    )  # fmt: skip
    stage_configs(cfg)
    return cfg


def _cmd_demo(args: argparse.Namespace) -> int:
    from ray_app.evaluation.report import headline_text
    from ray_app.storage import join, read_json

    cfg = demo_config(args)
    t0 = time.perf_counter()
    summary = run_pipeline(cfg)
    minutes = (time.perf_counter() - t0) / 60
    paths = cfg.paths()
    metrics = read_json(join(paths["evaluation"], "metrics.json"))
    found = headline_text(metrics)
    print(
        f"\n== What the demo found ({minutes:.1f} min) ==\n\n{found}\n\n"
        "Open next:\n"
        f"  {join(paths['evaluation'], 'report.md')}  every table, with the plots beside it\n"
        f"  {join(paths['model'], 'training_curves.png')}  the re-ranker's training\n"
        f"  {join(paths['topk'], '')}  the nightly top-K lists (Parquet)\n"
        f"  rerank serve --set model={paths['model']}  the model over HTTP (README: Serving)\n"
        "  make quickstart  the same story in a notebook, with its plots"
    )
    segments = (metrics.get("headline") or {}).get("segments", {})
    line = {
        "workdir": cfg.workdir,
        "minutes": round(minutes, 2),
        "stage_seconds": {k: v["seconds"] for k, v in summary["stages"].items()},
        "ndcg": {seg: v["ndcg"] for seg, v in segments.items()},
        "report": join(paths["evaluation"], "report.md"),
    }
    print(json_line(line), flush=True)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from ray_app.config_reference import reference_markdown, replace_section, stage_markdown

    if args.write:
        path = Path(args.write)
        path.write_text(replace_section(path.read_text(), reference_markdown(COMMANDS.values())))
        print(f"wrote the configuration reference into {path}")
    elif args.stage:
        print(stage_markdown(COMMANDS[args.stage]))
    else:
        print(reference_markdown(COMMANDS.values()))
    return 0


def _cmd_items(args: argparse.Namespace) -> int:
    from ray_app.serving.client import add_items

    token = os.environ.get(args.token_env) if args.token_env else None
    if args.token_env and not token:
        raise ConfigError(f"--token-env {args.token_env}: the variable is not set")
    summary = add_items(args.file, args.url, token, args.replace, args.batch_size, args.rejects)
    print(json_line(summary))
    return 0 if summary["rejected"] == 0 else 3


# Commands of the CLI alone, beside one per stage: (help, description, examples).
DEMO = (
    "the whole pipeline on generated sample data, local Ray (what `make demo` runs)",
    "Generate sample data and run prepare, train (bundled all-MiniLM-L6-v2, a time "
    "budget), evaluate and nightly on a local Ray. Outputs under --workdir; --set takes "
    "pipeline keys (stage-prefixed).",
    (
        "rerank demo --workdir runs/demo",
        "rerank demo --workdir runs/small --events 20000 --train-minutes 1 --encoder tiny",
        "rerank demo --set train.epochs=3 --set nightly.k=50",
    ),
)
CONFIG = (
    "print the configuration reference of a stage (every key, type, default)",
    "Every key a stage's YAML or --set accepts, generated from the config models: "
    "dotted key, type, default and description. --write README.md rewrites the README's copy.",
    ("rerank config train", "rerank config serve", "rerank config"),
)


ITEMS = (
    "register catalogue items with a running service (PUT /v1/items)",
    "`rerank items add FILE --url URL`: every row of a CSV, Parquet or JSON-lines file "
    "(item_id, and text or title/genres/description/...) is registered in batches; each "
    "item is encoded once and every replica scores it from then on. Rows the service "
    "refuses go to the rejects file with its reason (exit status 3).",
    (
        "rerank items add new_items.csv --url http://127.0.0.1:8000",
        "rerank items add catalogue.parquet --url http://rerank:8000 --token-env RERANK_TOKEN "
        "--replace",
    ),
)


def documented_commands() -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """Every command's (one-line help, description, examples), in `--help` order."""
    docs = {s.name: (s.help, s.description, s.examples) for s in COMMANDS.values()}
    return {**docs, "demo": DEMO, "config": CONFIG, "items": ITEMS}


def _subparser(
    sub: Any, name: str, help_text: str, description: str, examples: Sequence[str]
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help_text,
        description=textwrap.fill(description, 88),
        epilog="examples:\n" + "\n".join(f"  {ex}" for ex in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    examples = [exs[0] for _, _, exs in documented_commands().values()]
    parser = argparse.ArgumentParser(
        prog="rerank",
        description="LM re-ranking for recommenders on Ray: prepare data, train, evaluate, "
        "precompute nightly top-K lists, serve. `rerank <command> --help` shows each "
        "command's options and examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join(f"  {ex}" for ex in examples),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="stderr log lines as text, or as one JSON object each (for log collectors)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in COMMANDS.values():
        p = _subparser(sub, stage.name, stage.help, stage.description, stage.examples)
        p.set_defaults(func=_run_stage)
        _add_config_args(p)
        for option in stage.options:
            p.add_argument(option.flag, dest=option.key, help=option.help)
    p = _subparser(sub, "demo", *DEMO)
    p.set_defaults(func=_cmd_demo)
    p.add_argument("--workdir", default="runs/demo", help="where data and outputs go")
    p.add_argument("--events", type=int, default=150_000, help="events to generate")
    p.add_argument("--sasrec-epochs", type=int, default=40, help="epochs for the SASRec baseline")
    p.add_argument(
        "--train-minutes", type=float, default=4.0, help="training time budget of the re-ranker"
    )
    p.add_argument(
        "--encoder",
        default="default",
        help="text encoder (default: bundled all-MiniLM-L6-v2; tiny: random, for tests)",
    )
    _add_config_args(p, with_file=False)
    p = _subparser(sub, "config", *CONFIG)
    p.set_defaults(func=_cmd_config)
    p.add_argument("stage", nargs="?", choices=list(COMMANDS), help="default: all")
    p.add_argument("--write", metavar="README", help="rewrite the reference section there")
    p = _subparser(sub, "items", *ITEMS)
    items = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = items.add_parser("add", help="register the rows of a file")
    p.set_defaults(func=_cmd_items)
    p.add_argument("file", help="CSV, Parquet or JSON lines: item_id, text or text fields")
    p.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--token-env", default=None, help="environment variable holding the bearer token"
    )
    p.add_argument("--replace", action="store_true", help="replace the text of trained items")
    p.add_argument("--batch-size", type=int, default=500, help="items per request")
    p.add_argument("--rejects", default=None, help="default: FILE.rejected.jsonl")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.log_format)
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
