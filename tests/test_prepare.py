"""The prepare stage end to end on a local Ray: counts, quarantine, publication."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import pytest

from ray_app.config import load_config
from ray_app.data import schema as S
from ray_app.data.config import GenerateConfig, PrepareConfig
from ray_app.data.prepare import RejectedShareError, run_prepare
from ray_app.data.synthetic import generate
from ray_app.storage import SUCCESS

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ITEMS = "item_id,title,genres\n" + "".join(f"i{i},Title {i},g{i % 3}\n" for i in range(1, 21))


def good_rows(users=("u1", "u2", "u3"), n=6) -> list[str]:
    return [f"{u},i{j + 1},{1_700_000_000 + 60 * j},view,1" for u in users for j in range(n)]


def prepare(tmp_path, inter, items=None, *overrides) -> dict:
    cfg = load_config(
        PrepareConfig,
        None,
        [
            *([f"input.interactions={inter}"] if inter else []),
            f"input.items={items or tmp_path / 'items.csv'}",
            f"output={tmp_path / 'out'}",
            *overrides,
        ],
    )
    return run_prepare(cfg)


def rejected(out, kind="interactions") -> pd.DataFrame:
    return pads.dataset(str(out / "rejected" / kind)).to_table().to_pandas()


def test_every_bad_row_is_kept_counted_and_named(ray_local, tmp_path, write):
    write("items.csv", ITEMS + ",no id,g\ni3,Duplicate of i3,g\n" + f"i99,{'x' * 300},g\n")
    bad = [
        ",i1,1700000000,view,1",  # missing_user_id
        "u1,,1700000000,view,1",  # missing_item_id
        "u1,i1,,view,1",  # missing_timestamp
        "u1,i1,next tuesday,view,1",  # bad_timestamp
        "u1,i1,12,view,1",  # timestamp_out_of_range
        "u1,i1,1700000000,teleport,1",  # unknown_event_type
        "u1,i1,1700000000,view,much",  # bad_value
        "u1,i404,1700000000,view,1",  # unknown_item
        "u1,i99,1700000000,view,1",  # unknown_item (its catalogue row was rejected)
        "u1,i1,1700000000,view",  # malformed_row
        "u1,i1,1700000000,view,1",  # duplicate_event (of the first good row)
    ]
    body = "user_id,item_id,timestamp,event_type,value\n" + "\n".join(good_rows() + bad) + "\n"
    write("logs/part-0.csv", body.encode() + b"u2,i\xff,1700000000,view,1\n")  # invalid_utf8
    write(
        "logs/part-1.csv", "user_id,item_id,timestamp,event_type,value\nu9,i1,1700000000,view,1\n"
    )
    m = prepare(
        tmp_path,
        tmp_path / "logs",
        None,
        "validation.max_rejected_fraction=0.5",
        "validation.max_text_chars=200",
    )
    c = m["counts"]["interactions"]
    assert c["read"] == 18 + len(bad) + 2
    assert c["rejected_by_reason"] == {
        "missing_user_id": 1,
        "missing_item_id": 1,
        "missing_timestamp": 1,
        "bad_timestamp": 1,
        "timestamp_out_of_range": 1,
        "unknown_event_type": 1,
        "bad_value": 1,
        "unknown_item": 2,
        "malformed_row": 1,
        "invalid_utf8:item_id": 1,
        "duplicate_event": 1,
    }
    assert c["filtered_by_reason"] == {"user_below_min_interactions": 1}  # u9 has one event
    assert c["kept"] == 18
    assert c["read"] == c["kept"] + c["rejected"] + c["filtered"]
    out = tmp_path / "out"
    rej = rejected(out)
    assert sorted(rej["reason"]) == sorted(
        k for k, v in c["rejected_by_reason"].items() for _ in range(v)
    )
    row = rej[rej["reason"] == "bad_timestamp"].iloc[0]
    assert row["source_file"].endswith("part-0.csv")
    assert json.loads(row["record"])["timestamp"] == "next tuesday"
    items = m["counts"]["items"]
    assert items["rejected_by_reason"] == {
        "missing_item_id": 1,
        "duplicate_item": 1,
        "text_too_long": 1,
    }
    assert items["valid"] == 20
    assert set(rejected(out, "items")["reason"]) == {
        "missing_item_id",
        "duplicate_item",
        "text_too_long",
    }
    filtered = pads.dataset(str(out / "filtered")).to_table().to_pandas()
    assert filtered["reason"].tolist() == ["user_below_min_interactions"]
    assert (out / SUCCESS).exists()


def test_too_many_rejects_fail_clearly_and_publish_nothing(ray_local, tmp_path, write):
    write("items.csv", ITEMS)
    rows = good_rows() + [f"u1,i404,{1_700_000_000 + k},view,1" for k in range(5)]
    write("logs.csv", "user_id,item_id,timestamp,event_type,value\n" + "\n".join(rows) + "\n")
    with pytest.raises(RejectedShareError) as e:
        prepare(tmp_path, tmp_path / "logs.csv")
    msg = str(e.value)
    assert "5 of 23 interactions rows rejected" in msg
    assert "unknown_item=5" in msg and "max_rejected_fraction" in msg
    assert not (tmp_path / "out").exists()
    staged = list(tmp_path.glob(".out.staging-*/rejected/interactions/*.parquet"))
    assert staged, "rejected rows must be kept for inspection"


def test_corrupt_file_error_names_the_file(ray_local, tmp_path, write):
    write("items.csv", ITEMS)
    write(
        "logs/a.csv",
        "user_id,item_id,timestamp\n"
        + "\n".join(f"u1,i{j},{1_700_000_000 + j}" for j in range(1, 7))
        + "\n",
    )
    write("logs/b.csv", "user_id,item_id,timestamp\nu2,i1,1700000000\nu2,i2")
    with pytest.raises(Exception, match=r"b\.csv: file is truncated"):
        prepare(tmp_path, tmp_path / "logs")


def test_missing_column_is_a_clear_error(ray_local, tmp_path, write):
    write("items.csv", ITEMS)
    write("logs.csv", "uid,item_id,timestamp\nu1,i1,1700000000\n")
    with pytest.raises(Exception, match=r"no column for 'user_id'.*interaction_columns"):
        prepare(tmp_path, tmp_path / "logs.csv")
    m = prepare(
        tmp_path,
        tmp_path / "logs.csv",
        None,
        "input.interaction_columns.user_id=uid",
        "split.min_interactions=3",
    )
    assert m["counts"]["interactions"]["read"] == 1


def test_a_failed_stage_leaves_no_cpus_reserved_for_the_next_one(ray_local, tmp_path, write):
    """A stage that fails in a long-lived process (a notebook, a pipeline driver,
    this test session) must not keep its Ray Data actors, and their CPUs, for the
    next stage: its traceback holds them in a reference cycle. With automatic
    garbage collection off, only the next stage's start can release them."""
    import gc
    import logging
    import time

    from ray_app.runtime import RayConfig, ensure_ray

    write("items.csv", ITEMS)
    write("logs.csv", "uid,item_id,timestamp\nu1,i1,1700000000\n")
    total = ray_local.cluster_resources()["CPU"]
    # pytest's log capture keeps every record of a test, and Ray Data logs the
    # failure with the exception as an argument; a process without that capture
    # holds nothing but the garbage cycle, so Ray Data's log is off here.
    ray_data_log = logging.getLogger("ray.data")
    level = ray_data_log.level
    ray_data_log.setLevel(logging.CRITICAL + 1)
    gc.disable()
    try:
        with pytest.raises(Exception, match=r"no column for 'user_id'"):
            prepare(tmp_path, tmp_path / "logs.csv")
        ensure_ray(RayConfig())  # what every stage does first
        deadline = time.time() + 30
        while ray_local.available_resources().get("CPU", 0) < total and time.time() < deadline:
            time.sleep(0.2)
    finally:
        gc.enable()
        ray_data_log.setLevel(level)
    assert ray_local.available_resources().get("CPU", 0) == total


def test_kill_midway_keeps_previous_output_and_rerun_succeeds(
    ray_local, tmp_path, write, monkeypatch
):
    write("items.csv", ITEMS)
    write(
        "logs.csv",
        "user_id,item_id,timestamp\n" + "\n".join(r.rsplit(",", 2)[0] for r in good_rows()) + "\n",
    )
    first = prepare(tmp_path, tmp_path / "logs.csv")
    out = tmp_path / "out"
    from ray_app.data import prepare as P

    def boom(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(P, "_examples", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, tmp_path / "logs.csv")
    assert json.loads((out / "manifest.json").read_text())["run_id"] == first["run_id"]
    assert (out / SUCCESS).exists()
    monkeypatch.undo()
    second = prepare(tmp_path, tmp_path / "logs.csv")
    assert second["run_id"] != first["run_id"]
    assert second["counts"] == first["counts"]
    assert not list(tmp_path.glob(".out.staging-*")), "stale staging removed after success"


def test_synthetic_end_to_end_is_deterministic_across_bucket_counts(ray_local, tmp_path):
    raw = tmp_path / "raw"
    generate(GenerateConfig(output=str(raw), num_events=20_000, events_per_file=6_000))
    outs = []
    for b in (1, 3):
        cfg = load_config(
            PrepareConfig,
            None,
            [
                f"input.interactions={raw / 'interactions'}",
                f"input.items={raw / 'items'}",
                f"output={tmp_path / f'out{b}'}",
                f"num_buckets={b}",
            ],
        )
        m = run_prepare(cfg)
        ex = pads.dataset(str(tmp_path / f"out{b}" / "examples" / "train")).to_table().to_pandas()
        outs.append(
            (
                m,
                ex.sort_values([S.USER_ID, S.TARGET_TIMESTAMP, S.TARGET_ITEM_IDX]).reset_index(
                    drop=True
                ),
            )
        )
    (m1, ex1), (m3, ex3) = outs
    assert m1["counts"] == m3["counts"]
    assert m1["counts"]["interactions"]["read"] == 20_000
    assert len(ex1) == m1["counts"]["examples"]["train"] > 0
    pd.testing.assert_frame_equal(ex1, ex3)
    items = pads.dataset(str(tmp_path / "out1" / "items")).to_table().to_pandas()
    assert items[S.INPUT_IDS].map(len).max() <= 32
    assert items[S.ITEM_IDX].min() == 1 and items[S.ITEM_IDX].is_unique


def test_presplit_files_keep_their_split(ray_local, tmp_path, write):
    write("items.csv", ITEMS)
    head = "user_id,item_id,timestamp\n"
    train = [f"u{u},i{j},{1_700_000_000 + j}" for u in range(3) for j in range(1, 6)]
    valid = [f"u{u},i10,{1_700_000_100}" for u in range(3)]
    test = [f"u{u},i11,{1_700_000_200}" for u in range(3)] + ["u0,i12,1700000300"]
    write("split/train.csv", head + "\n".join(train) + "\n")
    write("split/valid.csv", head + "\n".join(valid) + "\n")
    write("split/test.csv", head + "\n".join(test) + "\n")
    m = prepare(
        tmp_path,
        None,
        None,
        "split.method=presplit",
        *(
            f"input.splits.{s}={tmp_path / 'split' / f'{s}.csv'}"
            for s in ("train", "valid", "test")
        ),
    )
    c = m["counts"]["interactions"]
    assert c["by_split"] == {"train": 15, "valid": 3, "test": 4}
    assert m["counts"]["examples"]["test"] == 3  # first test event per user
    ex = pads.dataset(str(tmp_path / "out" / "examples" / "test")).to_table().to_pandas()
    assert set(ex[S.TARGET_ITEM_ID]) == {"i11"}
    assert ex[S.HIST_LEN].tolist() == [6, 6, 6]  # 5 train + the valid event before it
    # Evaluation runs on exactly this split: the test targets are the test file's events.
    from ray_app.evaluation.config import EvaluateConfig
    from ray_app.evaluation.evaluate import run_evaluate

    ecfg = load_config(
        EvaluateConfig,
        None,
        [
            f"prepared={tmp_path / 'out'}",
            f"output={tmp_path / 'eval'}",
            "num_negatives=5",
            "baselines=[popularity, ease]",
            "ease_lambdas=[10]",
        ],
    )
    metrics = run_evaluate(ecfg)
    cand = pads.dataset(str(tmp_path / "eval" / "candidates" / "test.parquet")).to_table()
    assert set(cand.column(S.TARGET_ITEM_IDX).to_pylist()) == {11}  # i11 is item_idx 11
    assert metrics["results"]["test"]["ease"]["users"] == 3


def _catalogue(genres):
    import pyarrow as pa

    ids = [f"i{i}" for i in range(1, 21)]
    return pa.table(
        {"item_id": ids, "title": [f"Title {i}" for i in range(1, 21)], "genres": genres}
    )


def test_list_typed_genres_read_like_their_delimited_form(ray_local, tmp_path, write):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lists = [[f"g{i % 3}", "Drama"] if i % 4 else [f"g{i % 3}"] for i in range(1, 21)]
    lists[4] = []  # an item without genres
    lists[5] = None
    write("logs.csv", "user_id,item_id,timestamp,event_type,value\n" + "\n".join(good_rows()))
    outputs = {}
    for name, genres in (
        ("list", pa.array(lists, pa.list_(pa.string()))),
        ("joined", pa.array([("|".join(g) or None) if g is not None else None for g in lists])),
    ):
        pq.write_table(_catalogue(genres), tmp_path / f"{name}.parquet")
        prepare(tmp_path, tmp_path / "logs.csv", tmp_path / f"{name}.parquet")
        out = tmp_path / "out"
        outputs[name] = {
            part: pads.dataset(str(out / part)).to_table().to_pandas()
            for part in ("items", "examples/train", "examples/valid", "examples/test")
        }
    items = outputs["list"]["items"]
    assert "Drama" in items.loc[items[S.ITEM_ID] == "i1", S.TEXT].iloc[0]
    for part, frame in outputs["list"].items():
        pd.testing.assert_frame_equal(frame, outputs["joined"][part], obj=part)


def test_a_failing_udf_shows_its_root_cause_and_file_on_the_cli(
    ray_local, tmp_path, write, capsys, monkeypatch
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_app.cli import main

    monkeypatch.setenv("RERANK_LOG_DIR", str(tmp_path / "logs"))
    genres = pa.array([{"name": f"g{i}"} for i in range(20)])  # a struct: no text form
    pq.write_table(_catalogue(genres), tmp_path / "items.parquet")
    write(
        "logs.csv",
        "user_id,item_id,timestamp\n" + "\n".join(r.rsplit(",", 2)[0] for r in good_rows()),
    )
    rc = main(
        [
            "prepare",
            "--set", f"input.interactions={tmp_path / 'logs.csv'}",
            "--set", f"input.items={tmp_path / 'items.parquet'}",
            "--set", f"output={tmp_path / 'out'}",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    assert rc == 1
    assert "ArrowNotImplementedError: Unsupported cast from struct" in line, line
    assert re.search(r"items\.parquet rows \d+\.\.\d+: ", line) and "UDF failed" not in line, line
    # where it was raised, not the wrapper that named the batch
    assert re.search(r"\(at \S+validation\.py:\d+ in _clean_str\)$", line), line
    trace = next(x for x in err.splitlines() if x.startswith("full traceback: "))
    assert "ArrowNotImplementedError" in Path(trace.split(": ", 1)[1]).read_text()


def test_the_cli_ends_with_a_one_line_json_summary_and_can_log_json(
    ray_local, tmp_path, write, capsys
):
    from ray_app.cli import main

    write(
        "logs.csv", "user_id,item_id,timestamp,event_type,value\n" + "\n".join(good_rows()) + "\n"
    )
    write("items.csv", ITEMS)
    rc = main(
        [
            "--log-format", "json",
            "prepare",
            "--set", f"input.interactions={tmp_path / 'logs.csv'}",
            "--set", f"input.items={tmp_path / 'items.csv'}",
            "--set", f"output={tmp_path / 'out'}",
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["output"] == str(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert summary["counts"] == manifest["counts"]
    ours = [json.loads(x) for x in err.splitlines() if x.startswith('{"time"')]
    assert any(r["logger"].startswith("ray_app.") and r["level"] == "INFO" for r in ours), err
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in ours)
    assert not re.search(r" INFO ray_app\.", err), "a text log line from the app"
