"""Ray Data readers for raw logs and catalogues: CSV/TSV, JSONL and Parquet.

One datasource reads every format and adds provenance to each row (file
index, record number in that file) and a reason column. Problems that concern
one record (a line with the wrong number of fields, invalid UTF-8, a JSON line
that does not parse) mark that record rejected and reading goes on; problems
that concern the file (truncated, corrupt compression, bad Parquet footer)
raise an `InputError` that names the file.

CSV columns are read as bytes and decoded here, so one bad value in row ten
million neither kills the read nor forces a type on the whole column.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ray_app.data.schema import REASON, SOURCE_FILE, SOURCE_ROW
from ray_app.storage import InputError, InputFile

logger = logging.getLogger(__name__)

MALFORMED_ROW = "malformed_row"
MALFORMED_JSON = "malformed_json"
INVALID_UTF8 = "invalid_utf8"

_FORMAT_BY_EXT = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".psv": "csv",
    ".dat": "csv",
    ".txt": "csv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_COMPRESSION_EXT = (".gz", ".bz2", ".zst", ".lz4", ".br")
BLOCK_ROWS = 262_144


def detect_format(path: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    name = path.lower()
    for ext in _COMPRESSION_EXT:
        if name.endswith(ext):
            name = name[: -len(ext)]
    for ext, fmt in _FORMAT_BY_EXT.items():
        if name.endswith(ext):
            return fmt
    raise InputError(
        f"cannot tell the format of {path!r} from its name; set input.format to csv, tsv, "
        "jsonl or parquet"
    )


@dataclass(frozen=True)
class ReadSpec:
    """How to read one group of files (e.g. a catalogue): format and CSV dialect."""

    format: str = "auto"
    delimiter: str | None = None
    header: bool = True
    column_names: tuple[str, ...] | None = None
    encoding: str = "utf-8"
    quoting: bool = True
    extra: dict[str, str] = field(default_factory=dict)


class _Prefixed(io.RawIOBase):
    """A readable stream that returns `head` and then the rest of `f`; remembers the tail."""

    def __init__(self, head: bytes, f: pa.NativeFile) -> None:
        self._head = memoryview(head)
        self._f = f
        self.last_chunk = head[-4096:]

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        if len(self._head):
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._f.read(len(b))
        if data:
            self.last_chunk = (self.last_chunk + data)[-4096:]
        n = len(data)
        b[:n] = data
        return n


def _decode_column(arr: pa.Array, encoding: str) -> tuple[pa.Array, np.ndarray]:
    """Binary column -> string column and a mask of values that failed to decode."""
    if encoding.lower().replace("-", "") in ("utf8",):
        try:
            return pc.cast(arr, pa.string()), np.zeros(len(arr), dtype=bool)
        except pa.ArrowInvalid:
            pass
    values = arr.to_pylist()
    bad = np.zeros(len(values), dtype=bool)
    out: list[str | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            out.append(v.decode(encoding))
        except UnicodeDecodeError:
            bad[i] = True
            out.append(v.decode(encoding, errors="backslashreplace"))
    return pa.array(out, type=pa.string()), bad


def _with_provenance(
    table: pa.Table, file_idx: int, first_row: int, reasons: list[str | None] | pa.Array
) -> pa.Table:
    n = table.num_rows
    table = table.append_column(SOURCE_FILE, pa.array(np.full(n, file_idx, dtype=np.int32)))
    table = table.append_column(
        SOURCE_ROW, pa.array(np.arange(first_row, first_row + n, dtype=np.int64))
    )
    reason_arr = reasons if isinstance(reasons, pa.Array) else pa.array(reasons, type=pa.string())
    return table.append_column(REASON, reason_arr)


def _first_line(f: pa.NativeFile, path: str) -> bytes:
    """Bytes read from the start of `f` up to and including its first newline (or all of
    a file without one)."""
    try:
        head = b""
        while b"\n" not in head:
            chunk = f.read(1 << 16)
            if not chunk:
                break
            head += chunk
    except OSError as e:
        raise InputError(f"{path}: cannot read (corrupt or truncated?): {e}") from e
    return head


def _header_names(head: bytes, path: str, spec: ReadSpec, delimiter: str) -> list[str]:
    if spec.column_names is not None:
        return list(spec.column_names)
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        text = line.decode(spec.encoding)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: header line is not valid {spec.encoding}: {e}") from e
    names = [n.strip() for n in next(csv.reader([text], delimiter=delimiter))]
    if len(set(names)) != len(names) or any(not n for n in names):
        raise InputError(f"{path}: header has empty or repeated column names: {names}")
    return names


def _open_csv(
    stream: Any, names: list[str], spec: ReadSpec, delimiter: str, on_invalid: Any
) -> Any:
    """Arrow's streaming CSV reader, every column as raw bytes (decoded by us, so that a
    bad byte rejects one row, not the file)."""
    from pyarrow import csv as pacsv

    return pacsv.open_csv(
        stream,
        read_options=pacsv.ReadOptions(
            column_names=names,
            skip_rows=1 if spec.header else 0,
            block_size=1 << 24,
            use_threads=False,
        ),
        parse_options=pacsv.ParseOptions(
            delimiter=delimiter,
            quote_char='"' if spec.quoting else False,
            newlines_in_values=False,
            invalid_row_handler=on_invalid,
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.binary() for n in names},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
            null_values=[],
        ),
    )


def _decoded(batch: pa.RecordBatch, names: list[str], encoding: str) -> tuple[pa.Table, pa.Array]:
    """A batch of raw columns as text, and per row the first column that did not decode."""
    table = pa.Table.from_batches([batch])
    reasons = np.full(table.num_rows, None, dtype=object)
    cols = []
    for name in names:
        col, bad = _decode_column(table.column(name).combine_chunks(), encoding)
        reasons[bad & (reasons == None)] = f"{INVALID_UTF8}:{name}"  # noqa: E711
        cols.append(col)
    return pa.table(dict(zip(names, cols, strict=True))), pa.array(reasons, type=pa.string())


def read_csv_stream(
    f: pa.NativeFile, path: str, file_idx: int, spec: ReadSpec, delimiter: str
) -> Iterator[pa.Table]:
    """Stream a delimited file as string columns with per-record rejection."""
    head = _first_line(f, path)
    if not head.strip():
        return
    names = _header_names(head, path, spec, delimiter)
    bad_rows: list[str] = []
    last_bad: str | None = None

    def on_invalid(row) -> str:
        bad_rows.append(row.text)
        return "skip"

    stream = _Prefixed(head, f)
    row = 0
    try:
        for batch in _open_csv(stream, names, spec, delimiter, on_invalid):
            table, reasons = _decoded(batch, names, spec.encoding)
            yield _with_provenance(table, file_idx, row, reasons)
            row += table.num_rows
            if bad_rows:
                last_bad = bad_rows[-1]
                yield _malformed_block(bad_rows, names, file_idx, row, MALFORMED_ROW)
                row += len(bad_rows)
                bad_rows.clear()
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(
            f"{path}: cannot read as delimited text (corrupt or truncated?): {e}"
        ) from e
    if bad_rows:
        last_bad = bad_rows[-1]
        yield _malformed_block(bad_rows, names, file_idx, row, MALFORMED_ROW)
    _check_not_truncated(stream.last_chunk, last_bad, path, spec.encoding)


def _check_not_truncated(tail: bytes, last_bad: str | None, path: str, encoding: str) -> None:
    """A file whose last line was rejected and has no newline was cut off mid-write: an
    error for the whole file, not one more bad row."""
    if last_bad is not None and tail and not tail.endswith(b"\n"):
        last_line = tail.rsplit(b"\n", 1)[-1].decode(encoding, errors="backslashreplace")
        if last_line.rstrip("\r") == last_bad.rstrip("\r"):
            raise InputError(
                f"{path}: file is truncated (last line incomplete: {last_line[:80]!r})"
            )


def _malformed_block(
    raw: list[str], names: list[str], file_idx: int, first_row: int, reason: str
) -> pa.Table:
    """Rows that could not be split into fields: raw text kept in the first column."""
    n = len(raw)
    cols = {name: pa.nulls(n, pa.string()) for name in names}
    cols[names[0]] = pa.array(raw, type=pa.string())
    return _with_provenance(pa.table(cols), file_idx, first_row, [reason] * n)


def _json_value(v: object) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v, ensure_ascii=False)


def read_jsonl_stream(f: pa.NativeFile, path: str, file_idx: int) -> Iterator[pa.Table]:
    """Stream JSON Lines; values become strings (lists/objects as JSON text)."""
    row = 0
    records: list[dict[str, str | None]] = []
    reasons: list[str | None] = []
    buf = b""

    def flush() -> pa.Table:
        keys: dict[str, None] = {}
        for r in records:
            keys.update(dict.fromkeys(r))
        table = pa.table({k: pa.array([r.get(k) for r in records], type=pa.string()) for k in keys})
        if not keys:
            table = pa.table({"_raw": pa.nulls(len(records), pa.string())})
        return _with_provenance(table, file_idx, row - len(records), list(reasons))

    try:
        while True:
            chunk = f.read(1 << 22)
            eof = not chunk
            buf += chunk
            lines = buf.split(b"\n")
            buf = b"" if eof else lines.pop()
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                last_unterminated = eof and i == len(lines) - 1 and lines[-1] == line
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    records.append({"_raw": line.decode("utf-8", errors="backslashreplace")})
                    reasons.append(INVALID_UTF8)
                else:
                    try:
                        obj = json.loads(text)
                        if not isinstance(obj, dict):
                            raise ValueError("not an object")
                        records.append({k: _json_value(v) for k, v in obj.items()})
                        reasons.append(None)
                    except ValueError:
                        if last_unterminated:
                            raise InputError(
                                f"{path}: file is truncated (last line is incomplete JSON: "
                                f"{text[:80]!r})"
                            ) from None
                        records.append({"_raw": text})
                        reasons.append(MALFORMED_JSON)
                row += 1
                if len(records) >= BLOCK_ROWS // 4:
                    yield flush()
                    records.clear()
                    reasons.clear()
            if eof:
                break
    except OSError as e:
        raise InputError(f"{path}: cannot read (corrupt or truncated?): {e}") from e
    if records:
        yield flush()


def read_parquet_file(f: pa.NativeFile, path: str, file_idx: int) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
        row = 0
        for batch in pf.iter_batches(batch_size=BLOCK_ROWS):
            table = pa.Table.from_batches([batch])
            yield _with_provenance(table, file_idx, row, pa.nulls(table.num_rows, pa.string()))
            row += table.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file (corrupt or truncated?): {e}") from e


def read_file(fs: pafs.FileSystem, path: str, file_idx: int, spec: ReadSpec) -> Iterator[pa.Table]:
    """Every block of one file, with provenance. Used by Ray read tasks and by tests."""
    fmt = detect_format(path, spec.format)
    if fmt == "parquet":
        with fs.open_input_file(path) as f:
            yield from read_parquet_file(f, path, file_idx)
        return
    try:
        stream = fs.open_input_stream(path, compression="detect")
    except OSError as e:
        raise InputError(f"{path}: cannot open: {e}") from e
    with stream as f:
        if fmt == "jsonl":
            yield from read_jsonl_stream(f, path, file_idx)
        else:
            delim = spec.delimiter or ("\t" if fmt == "tsv" else ",")
            yield from read_csv_stream(f, path, file_idx, spec, delim)


class RawDatasource(Datasource):
    """One read task per file; each streams its file in blocks with provenance.

    `file_offset` numbers the files globally when several groups are read.
    """

    def __init__(
        self, files: list[InputFile], fs: pafs.FileSystem, spec: ReadSpec, file_offset: int = 0
    ) -> None:
        super().__init__()
        self._files = files
        self._fs = fs
        self._spec = spec
        self._offset = file_offset

    def get_name(self) -> str:
        return "RawEvents"

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(fi.size for fi in self._files) * 2 or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        fs, spec = self._fs, self._spec
        tasks = []
        for i, fi in enumerate(self._files):

            def _read(fi: InputFile = fi, idx: int = self._offset + i) -> Iterator[pa.Table]:
                yield from read_file(fs, fi.path, idx, spec)

            meta = BlockMetadata(
                num_rows=None,
                size_bytes=fi.size * 2 or None,
                input_files=[fi.path],
                exec_stats=None,
            )
            tasks.append(ReadTask(_read, meta, per_task_row_limit=per_task_row_limit))
        return tasks


def read_raw(files: list[InputFile], fs: pafs.FileSystem, spec: ReadSpec, *, file_offset: int = 0):
    """A Ray Dataset over `files`, streamed."""
    import ray.data

    return ray.data.read_datasource(
        RawDatasource(files, fs, spec, file_offset), override_num_blocks=len(files)
    )
