"""The CLI a newcomer reads: every command documented with examples that work,
and a configuration reference that matches the code."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from ray_app import cli
from ray_app.config_reference import reference_markdown, rows
from ray_app.pipeline.config import PipelineConfig
from ray_app.pipeline.run import stage_configs
from ray_app.registry import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_every_command_has_a_description_and_examples(capsys):
    top = _help(["--help"], capsys)
    for name in cli.documented_commands():
        assert name in top
        text = _help([name, "--help"], capsys)
        description, _, examples = text.partition("examples:")
        assert len(description.split("options:")[0].split("\n\n", 1)[1]) > 80, name
        lines = [x.strip() for x in examples.strip().splitlines()]
        assert lines and all(x.startswith(f"rerank {name}") for x in lines), (name, lines)


@pytest.mark.parametrize(
    "example",
    [ex for _, _, exs in cli.documented_commands().values() for ex in exs],
    ids=lambda s: s[:60],
)
def test_every_example_parses_into_a_valid_config(example, monkeypatch):
    """Examples run through the real parser and config models (nothing is started)."""
    monkeypatch.chdir(ROOT)
    args = cli.build_parser().parse_args(shlex.split(example)[1:])
    if args.command in ("config", "items"):
        return
    if args.command == "demo":
        cli.demo_config(args)
        return
    cfg = cli.command_config(args)
    if isinstance(cfg, PipelineConfig):
        stage_configs(cfg)


def test_config_command_lists_every_key_with_type_and_default(capsys):
    assert cli.main(["config", "train"]) == 0
    out = capsys.readouterr().out
    for key, _typ, _, description in rows(COMMANDS["train"].config):
        assert f"`{key}`" in out and description, key
    assert "`model.trainable_layers` | int | `1` |" in out
    assert "fail_at_step" not in out  # testing hooks stay out of the reference


def test_readme_configuration_reference_is_generated_from_the_models():
    readme = (ROOT / "README.md").read_text()
    assert reference_markdown(COMMANDS.values()) in readme, (
        "README's configuration reference is stale: run `rerank config --write README.md`"
    )


def test_errors_name_the_innermost_cause_through_ray_train_wrappers():
    from ray_app.errors import describe

    class WorkerGroupError(RuntimeError):  # Ray Train's shape: failures by rank
        def __init__(self, msg: str, failures: dict) -> None:
            super().__init__(msg)
            self.worker_failures = failures

    try:
        try:
            raise ValueError("lr must be positive, got -1")
        except ValueError as e:
            raise RuntimeError("train_loop_per_worker failed") from e
    except RuntimeError as e:
        rank0 = e
    failed = WorkerGroupError("Training failed due to worker errors", {1: OSError("x"), 0: rank0})
    assert describe(failed) == "ValueError: lr must be positive, got -1"
