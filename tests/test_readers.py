"""Readers: per-record quarantine, per-file errors that name the file, path expansion."""

from __future__ import annotations

import gzip

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_app.data.readers import ReadSpec, detect_format, read_file
from ray_app.data.schema import REASON, SOURCE_FILE, SOURCE_ROW
from ray_app.storage import InputError, expand_paths


def read_all(path, spec: ReadSpec | None = None) -> pa.Table:
    fs, files = expand_paths(str(path))
    blocks = [b for f in files for b in read_file(fs, f.path, 3, spec or ReadSpec())]
    return pa.concat_tables(blocks, promote_options="default")


def test_csv_values_are_text_and_rows_carry_provenance(write):
    p = write("a.csv", "user,item,ts\nu1,i1,10\nu2,i2,oops\n")
    t = read_all(p)
    assert t.column("ts").to_pylist() == ["10", "oops"]  # no type inference to trip over
    assert t.column(SOURCE_FILE).to_pylist() == [3, 3]
    assert t.column(SOURCE_ROW).to_pylist() == [0, 1]
    assert t.column(REASON).to_pylist() == [None, None]


def test_csv_bad_rows_are_kept_with_a_reason(write):
    p = write("a.csv", b"user,item,ts\nu1,i1,10\nu2,i2\nu3,\xff\xfeX,30\nu4,i4,40\n")
    rows = read_all(p).to_pylist()
    by_reason = {r[REASON]: r for r in rows}
    assert by_reason["malformed_row"]["user"] == "u2,i2"  # raw line kept
    assert by_reason["invalid_utf8:item"]["user"] == "u3"
    assert [r["user"] for r in rows if r[REASON] is None] == ["u1", "u4"]


def test_truncated_csv_names_the_file(write):
    p = write("cut.csv", "user,item,ts\nu1,i1,10\nu2,i")
    with pytest.raises(InputError, match=r"cut\.csv: file is truncated"):
        read_all(p)


def test_unterminated_quote_is_quarantined_not_lost(write):
    # An open quote swallows the rest of the file: the text is kept as one bad record.
    p = write("q.csv", 'user,item,ts\nu0,i0,5\nu1,"i1,10\nu2,i2,20\n')
    rows = read_all(p).to_pylist()
    assert [(r["user"], r[REASON]) for r in rows] == [
        ("u0", None),
        ('u1,"i1,10\nu2,i2,20', "malformed_row"),
    ]


def test_jsonl_bad_lines_and_truncation(write):
    p = write("r.jsonl", b'{"u": 1, "tags": ["a", "b"]}\nnot json\n[1]\n{"u": "\xff"}\n{"u": 2}\n')
    rows = read_all(p).to_pylist()
    assert [r[REASON] for r in rows] == [
        None,
        "malformed_json",
        "malformed_json",
        "invalid_utf8",
        None,
    ]
    assert rows[0]["u"] == "1" and rows[0]["tags"] == '["a", "b"]'
    cut = write("cut.jsonl", '{"u": 1}\n{"u": 2, "i')
    with pytest.raises(InputError, match=r"cut\.jsonl: file is truncated"):
        read_all(cut)


def test_corrupt_gzip_and_parquet_name_the_file(write, tmp_path):
    good = gzip.compress(b"user,item,ts\n" + b"u1,i1,10\n" * 2000)
    p = write("bad.csv.gz", good[: len(good) // 2])
    with pytest.raises(InputError, match=r"bad\.csv\.gz"):
        read_all(p)
    pq.write_table(pa.table({"a": list(range(100))}), tmp_path / "ok.parquet")
    data = (tmp_path / "ok.parquet").read_bytes()
    p = write("broken.parquet", data[: len(data) - 20])
    with pytest.raises(InputError, match=r"broken\.parquet: not a readable Parquet file"):
        read_all(p)


def test_gzip_csv_and_parquet_read(write, tmp_path):
    p = write("a.csv.gz", gzip.compress(b"user,item\nu1,i1\n"))
    assert read_all(p).column("item").to_pylist() == ["i1"]
    pq.write_table(pa.table({"user": ["u"], "ts": [5]}), tmp_path / "x.parquet")
    t = read_all(tmp_path / "x.parquet")
    assert t.column("ts").to_pylist() == [5]


def test_expand_dir_glob_and_missing(write, tmp_path):
    write("d/a.csv", "x\n1\n")
    write("d/sub/b.csv", "x\n2\n")
    write("d/_SUCCESS", "")
    write("d/.hidden.csv", "x\n3\n")
    _, files = expand_paths(str(tmp_path / "d"))
    assert [f.path.rsplit("/", 1)[1] for f in files] == ["a.csv", "b.csv"]
    _, files = expand_paths(str(tmp_path / "d" / "*.csv"))
    assert [f.path.rsplit("/", 1)[1] for f in files] == ["a.csv"]
    _, files = expand_paths(f"file://{tmp_path}/d/sub")
    assert len(files) == 1
    with pytest.raises(InputError, match="matched no files"):
        expand_paths(str(tmp_path / "nothing*.csv"))


def test_format_detection():
    assert detect_format("x/ratings.csv.gz") == "csv"
    assert detect_format("r.jsonl") == "jsonl"
    assert detect_format("r.anything", "parquet") == "parquet"
    with pytest.raises(InputError, match="cannot tell the format"):
        detect_format("data.bin")


def test_fsspec_only_scheme_is_read_through_fsspec():
    import fsspec

    mem = fsspec.filesystem("memory")
    with mem.open("/bucket/logs/a.csv", "wb") as f:
        f.write(b"user,item\nu1,i1\n")
    fs, files = expand_paths("memory://bucket/logs/*.csv")
    assert [f.path.rsplit("/", 1)[1] for f in files] == ["a.csv"]
    (block,) = read_file(fs, files[0].path, 0, ReadSpec())
    assert block.column("item").to_pylist() == ["i1"]
