from __future__ import annotations

import pytest

from ray_app.cli import main
from ray_app.config import ConfigError, load_config
from ray_app.data.config import PrepareConfig
from ray_app.times import parse_time

BASE = ["input.interactions=a.csv", "input.items=b.csv", "output=out"]


def test_yaml_and_overrides_merge(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "input: {interactions: x.parquet, items: y.parquet}\noutput: o\nsplit: {max_history: 20}\n"
    )
    cfg = load_config(PrepareConfig, f, ["split.max_history=7", "negatives.sampler=uniform"])
    assert cfg.split.max_history == 7
    assert cfg.negatives.sampler == "uniform"
    assert cfg.input.interactions == "x.parquet"
    assert cfg.split.min_interactions == 5  # default kept


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("split.max_histroy=5", "split.max_histroy: unknown key"),
        ("split.max_history=abc", "split.max_history"),
        ("negatives.sampler=zipf", "negatives.sampler"),
        ("validation.max_rejected_fraction=1.5", "validation.max_rejected_fraction"),
        ("nonsense=1", "nonsense: unknown key"),
    ],
)
def test_bad_key_or_type_names_the_key(override, names):
    with pytest.raises(ConfigError) as e:
        load_config(PrepareConfig, None, [*BASE, override])
    assert names in str(e.value)


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match="output: required key is missing"):
        load_config(PrepareConfig, None, BASE[:2])


def test_time_split_needs_cutoffs():
    with pytest.raises(ConfigError, match="valid_start and test_start"):
        load_config(PrepareConfig, None, [*BASE, "split.method=time"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="must look like"):
        load_config(PrepareConfig, None, ["output"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(PrepareConfig, None, [*BASE, "output.x=1"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(PrepareConfig, tmp_path / "nope.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(PrepareConfig, f)


def test_cli_stops_before_work_on_bad_config(capsys, tmp_path):
    out = tmp_path / "never"
    rc = main(
        [
            "prepare",
            "--set",
            "input.interactions=a",
            "--set",
            "input.items=b",
            "--set",
            f"output={out}",
            "--set",
            "split.bogus=1",
        ]
    )
    assert rc == 2
    assert "split.bogus: unknown key" in capsys.readouterr().err
    assert not out.exists()


def test_parse_time():
    assert parse_time(0) == 0
    assert parse_time("1700000000") == 1_700_000_000
    assert parse_time("2024-01-01T00:00:00Z") == 1_704_067_200
    assert parse_time("2024-01-01") == 1_704_067_200  # naive means UTC
    with pytest.raises(ValueError, match="not an ISO-8601"):
        parse_time("yesterday")


def test_presplit_needs_both_the_method_and_the_files():
    with pytest.raises(ConfigError, match=r"presplit' and input\.splits go together"):
        load_config(PrepareConfig, None, [*BASE, "split.method=presplit"])
    with pytest.raises(ConfigError, match="either `interactions` or `splits`"):
        load_config(PrepareConfig, None, [*BASE, "input.splits.train=t.csv"])
    with pytest.raises(ConfigError, match="needs train, valid and test"):
        load_config(
            PrepareConfig,
            None,
            [
                "input.items=b.csv",
                "output=o",
                "split.method=presplit",
                "input.splits.train=t.csv",
            ],
        )


def test_nightly_date_from_cli_yaml_or_quoted(tmp_path):
    """`--date 2026-11-24` and an unquoted YAML date both arrive as YAML dates; the
    scheduled job must accept them, and reject a day that does not exist."""
    from ray_app.batch.config import NightlyConfig

    base = ["model=m", "prepared=p", "output=o"]
    assert load_config(NightlyConfig, None, [*base, "date=2026-11-24"]).date == "2026-11-24"
    f = tmp_path / "n.yaml"
    f.write_text("model: m\nprepared: p\noutput: o\ndate: 2026-02-28\n")
    assert load_config(NightlyConfig, f).date == "2026-02-28"
    assert load_config(NightlyConfig, None, [*base, "date='2026-01-05'"]).date == "2026-01-05"
    for bad in ("date=2026-02-30", "date=20261124", "date=yesterday"):
        with pytest.raises(ConfigError, match="date"):
            load_config(NightlyConfig, None, [*base, bad])


@pytest.mark.parametrize(
    "override, key",
    [
        ("input.interactions=s3://AKIAX:s3cr3t@bucket/logs/*.parquet", "input.interactions"),
        ("input.items=[gs://bucket/a.jsonl, s3://k:s@bucket/b.jsonl]", "input.items"),
        ("output=s3://k:s@bucket/prepared", "output"),
    ],
)
def test_a_key_in_a_path_is_refused_before_it_reaches_a_manifest(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(
            PrepareConfig,
            None,
            ["input.interactions=/logs", "input.items=/items", "output=/o", override],
        )
    assert key in str(e.value) and "credentials do not go in paths" in str(e.value)


def test_object_store_paths_without_keys_are_accepted():
    cfg = load_config(
        PrepareConfig,
        None,
        [
            "input.interactions=s3://bucket/logs?endpoint_override=127.0.0.1:9000",
            "input.items=s3://bucket/items.jsonl",
            "output=gs://b/p",
        ],
    )
    assert cfg.output == "gs://b/p"
