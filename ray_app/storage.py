"""Paths, filesystems and atomic publication of stage outputs.

A stage output is published whole or not at all, and its address is the URI the
user gave. On a local disk a run writes a staging directory beside the output and
renames it into place once `manifest.json` and `_SUCCESS` are in it. Object
stores (s3://, gs://, ...) have no rename, atomic or not: there a run writes
under `<output>/_runs/<run_id>/`, and one small object written last,
`<output>/_LIVE`, names the live run; a single PUT is atomic, so a reader that
resolves the pointer (`live`) sees the previous run or the new one, whole.
Superseded runs are deleted by a later publication once `PUBLISH_GRACE_S` has
passed, so a reader that resolved the old pointer can finish.

Filesystems come from pyarrow (`FileSystem.from_uri`), as Ray Data's and Ray
Train's do, so the same settings reach all three: credentials and
`AWS_ENDPOINT_URL` (an S3-compatible store) from the environment.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import posixpath
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
LIVE = "_LIVE"  # on object stores: which run under RUNS is the output
RUNS = "_runs"
PUBLISH_GRACE_S = float(os.environ.get("RERANK_PUBLISH_GRACE_S", 3600))
_GLOB_CHARS = "*?["


class InputError(ValueError):
    """An input path or file is missing, unreadable, truncated or corrupt."""


class IncompleteOutputError(RuntimeError):
    """A stage output has no `_SUCCESS` marker: its run did not finish."""


@dataclass(frozen=True)
class InputFile:
    path: str  # as the filesystem names it (no scheme for local paths)
    size: int
    mtime: float | None


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and in-filesystem path for a local path or URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as arrow_error:  # pyarrow raises several types for unknown schemes
        try:  # schemes only fsspec knows (az://, memory://, ...)
            import fsspec

            fs, path = fsspec.core.url_to_fs(uri)
        except Exception as e:
            raise InputError(f"cannot open {uri!r}: {arrow_error}; fsspec: {e}") from e
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _is_data_file(name: str) -> bool:
    base = posixpath.basename(name)
    return not base.startswith((".", "_"))


def expand_paths(spec: str | list[str]) -> tuple[pafs.FileSystem, list[InputFile]]:
    """Files named by a file, a directory (recursively), a glob or a URI, in a stable order.

    Inside a directory, hidden entries and markers (`.x`, `_SUCCESS`) are skipped. All
    entries must be on one filesystem. An entry that matches nothing is an error naming it.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise InputError("no input paths given")
    fs: pafs.FileSystem | None = None
    out: list[InputFile] = []
    for s in specs:
        this_fs, path = resolve(s)
        if fs is None:
            fs = this_fs
        elif type(this_fs) is not type(fs):
            raise InputError(f"all inputs must be on one filesystem; {s!r} is not")
        found = _expand_one(this_fs, path)
        if not found:
            raise InputError(f"input path {s!r} matched no files")
        out.extend(found)
    assert fs is not None
    return fs, out


def _glob_match(path: str, pattern: str) -> bool:
    """Shell-style match where `*` stays inside one directory and `**` spans several."""
    if not _is_data_file(posixpath.basename(path)):
        return False
    if "**" in pattern:
        return fnmatch.fnmatch(path, pattern)
    parts, pats = path.split("/"), pattern.split("/")
    return len(parts) == len(pats) and all(
        fnmatch.fnmatch(a, b) for a, b in zip(parts, pats, strict=True)
    )


def _expand_one(fs: pafs.FileSystem, path: str) -> list[InputFile]:
    if any(c in path for c in _GLOB_CHARS):
        first = min(path.index(c) for c in _GLOB_CHARS if c in path)
        base = path[:first].rsplit("/", 1)[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = [i for i in infos if i.type == pafs.FileType.File and _glob_match(i.path, path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return []
        if info.type == pafs.FileType.File:
            files = [info]
        else:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = [
                i
                for i in infos
                if i.type == pafs.FileType.File
                and all(_is_data_file(c) for c in posixpath.relpath(i.path, path).split("/"))
            ]
    files.sort(key=lambda i: i.path)
    return [
        InputFile(
            path=i.path,
            size=int(i.size or 0),
            mtime=i.mtime.timestamp() if i.mtime is not None else None,
        )
        for i in files
    ]


def absolute(uri: str) -> str:
    """A local path made absolute (for processes that run elsewhere); URIs as they are."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    if "://" in base:
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def write_text_atomic(uri: str, text: str) -> None:
    """Readers see the old or the new text, never a partial one: a local file is
    written beside and renamed over; an object store's put is atomic already."""
    fs, path = resolve(uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        write_text(uri, text)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_text(uri: str) -> str:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def parquet_dataset(uri: str):
    """The `*.parquet` files of a file or directory (local or URI) as one pyarrow dataset;
    a stage's `manifest.json` and markers beside them are not data."""
    import pyarrow.dataset as pads

    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        return pads.dataset(path, filesystem=fs, format="parquet")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and i.path.endswith(".parquet")
        and all(_is_data_file(c) for c in posixpath.relpath(i.path, path).split("/"))
    )
    return pads.dataset(files, filesystem=fs, format="parquet")


def read_parquet(uri: str, columns: list[str] | None = None):
    """A Parquet file or directory of files (local or URI) as one pandas frame."""
    return parquet_dataset(uri).to_table(columns=columns).to_pandas()


def ray_parquet(paths: str | list[str], fs: pafs.FileSystem, columns: list[str]):
    """A Ray Dataset of a stage's Parquet output, through Ray Data's V1 reader.

    Ray 2.60's default (V2) reader lists files by reading every footer on a pool of
    `RAY_DATA_PARQUET_FOOTER_NUM_ACTORS` (32) actors, started per read and killed after
    it: a worker process and its imports each, for outputs of a few files whose footers
    the V1 reader reads in the driver. On 2 cores that was about 4 s of CPU per read
    against 0.4 s (README, Development); training and every nightly run read this way.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(paths, filesystem=fs, columns=columns)
    finally:
        ctx.use_datasource_v2 = v2


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_json(uri: str, data: Any) -> None:
    write_text(uri, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def upload_dir(local: str, uri: str) -> None:
    """Copy a local folder's files under `uri` (local path or any pyarrow URI)."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(
        local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def local_copy(uri: str, cache_dir: str) -> str:
    """A local folder with the contents of `uri`: the path itself when local."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    pafs.copy_files(
        path, cache_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
    )
    return cache_dir


class StagedOutput:
    """A stage's output, written in staging and published at the end.

    ``with StagedOutput(out) as stage: ... stage.publish(manifest)``. Leaving the
    block without `publish` (an exception, a kill) leaves the previous output
    untouched and the staging directory behind for inspection. On a local disk the
    staging directory is `.<name>.staging-<run_id>` beside the output; on an object
    store it is `<output>/_runs/<run_id>` (see the module docstring).
    """

    def __init__(self, output: str, overwrite: bool = True) -> None:
        self.output = output.rstrip("/")
        self.fs, self._out_path = resolve(self.output)
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        parent, name = posixpath.split(self._out_path)
        self._parent, self._name = parent, name
        if is_object_store(self.fs):
            self._staging_path = posixpath.join(self._out_path, RUNS, self.run_id)
        else:
            self._staging_path = posixpath.join(parent, f".{name}.staging-{self.run_id}")
        self.staging = self._uri(self._staging_path)
        self.overwrite = overwrite
        self.published = False

    def _uri(self, fs_path: str) -> str:
        if "://" in self.output:
            scheme = self.output.split("://", 1)[0]
            return f"{scheme}://{fs_path}"
        return fs_path

    def __enter__(self) -> StagedOutput:
        if not self.overwrite and is_complete(self.output):
            raise FileExistsError(
                f"{self.output} already holds a complete output (overwrite=false)"
            )
        self.fs.create_dir(self._staging_path, recursive=True)
        logger.info("staging output in %s", self.staging)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and not self.published:
            logger.error("run failed; nothing published; partial output kept in %s", self.staging)

    def path(self, *parts: str) -> str:
        return join(self.staging, *parts)

    def manifest(self, stage: str, config: Any, started: float, **fields: Any) -> dict[str, Any]:
        """What every stage's manifest.json holds first: which stage, run and code made the
        output, from which (resolved) config, when and in how long; then `fields`."""
        return {
            "stage": stage,
            "run_id": self.run_id,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "code_version": code_version(),
            "config": config if isinstance(config, dict) else config.model_dump(mode="json"),
            "timings": {"total_s": round(time.time() - started, 2)},
            **fields,
        }

    def publish(self, manifest: dict[str, Any]) -> None:
        """Write manifest and `_SUCCESS`, then make the staged output the live one."""
        write_json(self.path(MANIFEST), manifest)
        write_text(self.path(SUCCESS), self.run_id + "\n")
        if is_object_store(self.fs):
            self._point_to_run()
        else:
            self._swap_into_place()
        self.published = True
        logger.info("published %s", self.output)

    def _swap_into_place(self) -> None:
        old = posixpath.join(self._parent, f".{self._name}.old-{self.run_id}")
        had_old = self.fs.get_file_info(self._out_path).type != pafs.FileType.NotFound
        if had_old:
            self.fs.move(self._out_path, old)
        self.fs.move(self._staging_path, self._out_path)
        if had_old:
            self.fs.delete_dir(old)
        sel = pafs.FileSelector(self._parent, recursive=False, allow_not_found=True)
        prefix = f".{self._name}.staging-"
        for info in self.fs.get_file_info(sel):
            if posixpath.basename(info.path).startswith(prefix):
                logger.info("removing stale staging directory %s", info.path)
                self.fs.delete_dir(info.path)

    def _point_to_run(self, now: float | None = None) -> None:
        """Write `_LIVE` naming this run (the publication), then delete the runs that were
        superseded more than PUBLISH_GRACE_S ago and unfinished runs idle that long."""
        now = time.time() if now is None else now
        previous = _read_pointer(self.fs, self._out_path) or {"superseded": {}}
        superseded = dict(previous.get("superseded", {}))
        if previous.get("run_id"):
            superseded[previous["run_id"]] = now
        keep = {r: t for r, t in superseded.items() if now - t < PUBLISH_GRACE_S}
        pointer = {"run_id": self.run_id, "published_at": now, "superseded": keep}
        with self.fs.open_output_stream(posixpath.join(self._out_path, LIVE)) as f:
            f.write(json.dumps(pointer).encode())
        runs = posixpath.join(self._out_path, RUNS)
        for info in self.fs.get_file_info(pafs.FileSelector(runs, allow_not_found=True)):
            run = posixpath.basename(info.path)
            if run == self.run_id or run in keep or info.type != pafs.FileType.Directory:
                continue
            if run not in superseded and now - _newest_mtime(self.fs, info.path) < PUBLISH_GRACE_S:
                continue  # another run may still be writing here
            logger.info("removing superseded or abandoned run %s", info.path)
            self.fs.delete_dir(info.path)


def _newest_mtime(fs: pafs.FileSystem, path: str) -> float:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    times = [i.mtime.timestamp() for i in infos if i.mtime is not None]
    return max(times, default=0.0)


def is_object_store(fs: pafs.FileSystem) -> bool:
    """No directory rename: publication goes through the `_LIVE` pointer."""
    return not isinstance(fs, pafs.LocalFileSystem)


def _read_pointer(fs: pafs.FileSystem, out_path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(posixpath.join(out_path, LIVE)) as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        return None


def live(uri: str) -> str:
    """Where a published output's files are: `uri` itself on a local disk (or an object
    store output written without a pointer), else the run `<uri>/_LIVE` names. Every
    reader of a stage output goes through here."""
    uri = uri.rstrip("/")
    fs, path = resolve(uri)
    if not is_object_store(fs):
        return uri
    pointer = _read_pointer(fs, path)
    return join(uri, RUNS, pointer["run_id"]) if pointer else uri


def is_complete(uri: str) -> bool:
    return exists(join(live(uri), SUCCESS))


def published(uri: str) -> tuple[str, dict[str, Any]]:
    """Where a published output's files are (`live`, resolved once) and its manifest; an
    error if its run never finished. Readers take both from here, so the files they read
    are those of the run whose manifest they checked."""
    root = live(uri)
    if not exists(join(root, SUCCESS)):
        raise IncompleteOutputError(
            f"{uri} is not a complete stage output (no {SUCCESS}); re-run the stage that writes it"
        )
    return root, read_json(join(root, MANIFEST))


def require_complete(uri: str) -> dict[str, Any]:
    """The manifest of a published output; an error if its run never finished."""
    return published(uri)[1]


def remove(uri: str) -> None:
    """Delete a directory (local or URI) and everything under it, if it exists."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def code_version() -> dict[str, str]:
    """Package version and, when run from a git checkout, the commit."""
    from ray_app import __version__

    info = {"package": __version__, "git": "unknown"}
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if sha.returncode == 0:
            info["git"] = sha.stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=here,
                capture_output=True,
                text=True,
                timeout=5,
            )
            if dirty.stdout.strip():
                info["git"] += "-dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return info
