"""Adapters: public log and catalogue formats -> the interaction and item contracts.

An adapter says which files to read and how (`sources`), and renames a raw
batch's columns onto the contract (`to_interactions`, `to_items`). Parsing
and validation are shared (`validation`), so every format gets the same rules.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from ray_app.data import schema
from ray_app.data.config import InputConfig
from ray_app.data.readers import ReadSpec, read_file
from ray_app.storage import InputError, InputFile, expand_paths, join

_PROVENANCE = (schema.SOURCE_FILE, schema.SOURCE_ROW, schema.REASON)

ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


@dataclass
class Source:
    """A group of files read the same way."""

    fs: pafs.FileSystem
    files: list[InputFile]
    spec: ReadSpec


@dataclass
class ColumnMap:
    """contract column -> candidate source columns (first present wins) or a constant."""

    columns: dict[str, tuple[str, ...]] = field(default_factory=dict)
    constants: dict[str, str] = field(default_factory=dict)
    required: tuple[str, ...] = ()

    def apply(self, table: pa.Table, path_hint: str) -> pa.Table:
        n = table.num_rows
        out: dict[str, pa.ChunkedArray | pa.Array] = {}
        has_valid = (
            table.column(schema.REASON).null_count > 0
            if schema.REASON in table.column_names
            else True
        )
        for contract, candidates in self.columns.items():
            src = next((c for c in candidates if c in table.column_names), None)
            if src is not None:
                out[contract] = table.column(src)
            elif contract in self.constants:
                out[contract] = pa.array([self.constants[contract]] * n, pa.string())
            elif contract in self.required and has_valid:
                raise InputError(
                    f"{path_hint}: no column for {contract!r} (looked for {list(candidates)}); "
                    f"columns are {[c for c in table.column_names if c not in _PROVENANCE]}. "
                    "Map it with input.interaction_columns / input.item_columns."
                )
        for contract, value in self.constants.items():
            out.setdefault(contract, pa.array([value] * n, pa.string()))
        for name in _PROVENANCE:
            out[name] = table.column(name)
        return pa.table(out)


class Adapter:
    """Base adapter: generic column mapping (identity by default)."""

    name = "generic"

    def __init__(self, cfg: InputConfig) -> None:
        self.cfg = cfg
        # Files read beside the two main sources (e.g. MovieLens tags), for the manifest.
        self.side_files: list[str] = []
        # Split label of each interaction file, for data sets that come already split.
        self.file_splits: list[str] | None = None
        self.interaction_map = ColumnMap(
            columns={
                c: (cfg.interaction_columns.get(c, c),)
                for c in (
                    schema.USER_ID,
                    schema.ITEM_ID,
                    schema.TIMESTAMP,
                    schema.EVENT_TYPE,
                    schema.VALUE,
                )
            },
            required=(schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP),
        )
        self.item_map = ColumnMap(
            columns={c: (cfg.item_columns.get(c, c),) for c in schema.ITEM_COLUMNS},
            required=(schema.ITEM_ID,),
        )
        unknown = set(cfg.interaction_columns) - set(schema.INTERACTION_COLUMNS)
        if unknown:
            raise InputError(
                f"input.interaction_columns: unknown contract columns {sorted(unknown)}"
            )
        unknown = set(cfg.item_columns) - set(schema.ITEM_COLUMNS)
        if unknown:
            raise InputError(f"input.item_columns: unknown contract columns {sorted(unknown)}")

    def _spec(self) -> ReadSpec:
        return ReadSpec(format=self.cfg.format, delimiter=self.cfg.delimiter)

    def interaction_source(self) -> Source:
        return self._interactions(self.cfg.interactions, self._spec())

    def _interactions(self, default, spec: ReadSpec) -> Source:
        """The interaction files; with `input.splits`, train then valid then test files."""
        if not self.cfg.splits:
            fs, files = expand_paths(default)
            return Source(fs, files, spec)
        fs, files, labels = None, [], []
        for split in ("train", "valid", "test"):
            fs, found = expand_paths(self.cfg.splits[split])
            files += found
            labels += [split] * len(found)
        self.file_splits = labels
        return Source(fs, files, spec)

    def item_source(self) -> Source | None:
        if not self.cfg.items:
            return None
        fs, files = expand_paths(self.cfg.items)
        return Source(fs, files, self._spec())

    def to_interactions(self, table: pa.Table) -> pa.Table:
        return self.interaction_map.apply(table, "interactions")

    def to_items(self, table: pa.Table) -> pa.Table:
        return self.item_map.apply(table, "items")

    def extra_item_text(self) -> dict[str, dict[str, str]]:
        """Text fields gathered from side files (e.g. MovieLens tags), by item id."""
        return {}

    @property
    def timestamp_unit(self) -> str:
        return self.cfg.timestamp_unit


class MovieLensAdapter(Adapter):
    """ml-latest / ml-25m style: ratings.csv, movies.csv, tags.csv under `path`.

    Tags (user-applied, all of them regardless of time) become item text: up
    to 20 distinct tags per movie, most frequent first. The interactions are
    the ratings, with event type `rating` and the rating as `value`.
    """

    name = "movielens"
    max_tags = 20

    def __init__(self, cfg: InputConfig) -> None:
        super().__init__(cfg)
        self.interaction_map = ColumnMap(
            columns={
                schema.USER_ID: ("userId",),
                schema.ITEM_ID: ("movieId",),
                schema.TIMESTAMP: ("timestamp",),
                schema.VALUE: ("rating",),
            },
            constants={schema.EVENT_TYPE: "rating"},
            required=(schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP),
        )
        self.item_map = ColumnMap(
            columns={
                schema.ITEM_ID: ("movieId",),
                schema.TITLE: ("title",),
                schema.GENRES: ("genres",),
            },
            required=(schema.ITEM_ID,),
        )

    def _file(self, explicit, name: str) -> str:
        if explicit:
            return explicit
        if not self.cfg.path:
            raise InputError(f"adapter {self.name}: set input.path to the data set directory")
        return join(self.cfg.path, name)

    def interaction_source(self) -> Source:
        default = None if self.cfg.splits else self._file(self.cfg.interactions, "ratings.csv")
        return self._interactions(default, ReadSpec(format="csv"))

    def item_source(self) -> Source:
        fs, files = expand_paths(self._file(self.cfg.items, "movies.csv"))
        return Source(fs, files, ReadSpec(format="csv"))

    def to_items(self, table: pa.Table) -> pa.Table:
        out = super().to_items(table)
        if schema.GENRES in out.column_names:
            import pyarrow.compute as pc

            g = out.column(schema.GENRES)
            out = out.set_column(
                out.column_names.index(schema.GENRES),
                schema.GENRES,
                pc.if_else(pc.equal(g, "(no genres listed)"), pa.scalar(None, pa.string()), g),
            )
        return out

    def extra_item_text(self) -> dict[str, dict[str, str]]:
        path = self.cfg.tags or (join(self.cfg.path, "tags.csv") if self.cfg.path else None)
        if not path:
            return {}
        try:
            fs, files = expand_paths(path)
        except InputError:
            if self.cfg.tags:
                raise
            return {}
        counts: dict[str, Counter[str]] = {}
        self.side_files = [fi.path for fi in files]
        for fi in files:
            for block in read_file(fs, fi.path, 0, ReadSpec(format="csv")):
                if "movieId" not in block.column_names or "tag" not in block.column_names:
                    raise InputError(f"{fi.path}: tags file needs movieId and tag columns")
                for mid, tag in zip(
                    block.column("movieId").to_pylist(),
                    block.column("tag").to_pylist(),
                    strict=True,
                ):
                    if mid and tag and tag.strip():
                        counts.setdefault(mid.strip(), Counter())[tag.strip().lower()] += 1
        return {
            mid: {schema.TAGS: "|".join(t for t, _ in c.most_common(self.max_tags))}
            for mid, c in counts.items()
        }


class MovieLens100kAdapter(MovieLensAdapter):
    """The older ml-100k format: u.data (tab, no header) and u.item (pipe, latin-1)."""

    name = "movielens100k"

    def __init__(self, cfg: InputConfig) -> None:
        super().__init__(cfg)
        self.interaction_map = ColumnMap(
            columns={
                schema.USER_ID: ("user",),
                schema.ITEM_ID: ("item",),
                schema.TIMESTAMP: ("timestamp",),
                schema.VALUE: ("rating",),
            },
            constants={schema.EVENT_TYPE: "rating"},
            required=(schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP),
        )

    def interaction_source(self) -> Source:
        return self._interactions(
            None if self.cfg.splits else self._file(self.cfg.interactions, "u.data"),
            ReadSpec(
                format="csv",
                delimiter="\t",
                header=False,
                quoting=False,
                column_names=("user", "item", "rating", "timestamp"),
            ),
        )

    def item_source(self) -> Source:
        fs, files = expand_paths(self._file(self.cfg.items, "u.item"))
        genre_flags = tuple(f"g{i}" for i in range(len(ML100K_GENRES)))
        names = ("movie", "title", "release", "video_release", "url", *genre_flags)
        return Source(
            fs,
            files,
            ReadSpec(
                format="csv",
                delimiter="|",
                header=False,
                quoting=False,
                column_names=names,
                encoding="latin-1",
            ),
        )

    def to_items(self, table: pa.Table) -> pa.Table:
        flags = [table.column(f"g{i}").to_pylist() for i in range(len(ML100K_GENRES))]
        genres = (
            [
                "|".join(g for g, f in zip(ML100K_GENRES, row, strict=True) if f == "1") or None
                for row in zip(*flags, strict=True)
            ]
            if table.num_rows
            else []
        )
        return pa.table(
            {
                schema.ITEM_ID: table.column("movie"),
                schema.TITLE: table.column("title"),
                schema.GENRES: pa.array(genres, pa.string()),
                **{c: table.column(c) for c in _PROVENANCE},
            }
        )

    def extra_item_text(self) -> dict[str, dict[str, str]]:
        return {}


class AmazonAdapter(Adapter):
    """Amazon reviews JSONL (2014/2018 `reviewerID/asin/overall/unixReviewTime`
    and 2023 `user_id/parent_asin/rating/timestamp[ms]`) with its metadata JSONL.
    """

    name = "amazon"

    def __init__(self, cfg: InputConfig) -> None:
        super().__init__(cfg)
        self.interaction_map = ColumnMap(
            columns={
                schema.USER_ID: ("reviewerID", "user_id"),
                schema.ITEM_ID: ("parent_asin", "asin"),
                schema.VALUE: ("overall", "rating"),
            },
            constants={schema.EVENT_TYPE: "review"},
            required=(schema.USER_ID, schema.ITEM_ID),
        )
        self.item_map = ColumnMap(
            columns={
                schema.ITEM_ID: ("parent_asin", "asin"),
                schema.TITLE: ("title",),
                schema.DESCRIPTION: ("description",),
                schema.CATEGORIES: ("categories", "category", "main_category"),
                schema.TAGS: ("features", "feature"),
            },
            required=(schema.ITEM_ID,),
        )

    def _spec(self) -> ReadSpec:
        return ReadSpec(format="jsonl" if self.cfg.format == "auto" else self.cfg.format)

    def to_interactions(self, table: pa.Table) -> pa.Table:
        out = super().to_interactions(table)
        if "unixReviewTime" in table.column_names:
            ts = table.column("unixReviewTime")
        elif "timestamp" in table.column_names:
            import pandas as pd

            # 2023 files give milliseconds; unparseable values stay text so
            # validation rejects them as bad_timestamp.
            raw = pd.Series(table.column("timestamp").to_pylist(), dtype=object)
            num = pd.to_numeric(raw, errors="coerce")
            ts = pa.array(
                [
                    None if r is None else (str(int(v // 1000)) if v == v else r)
                    for r, v in zip(raw, num, strict=True)
                ],
                pa.string(),
            )
        elif table.column(schema.REASON).null_count == 0:
            ts = pa.nulls(table.num_rows, pa.string())
        else:
            raise InputError(
                "amazon reviews: no unixReviewTime or timestamp field; columns are "
                f"{[c for c in table.column_names if c not in _PROVENANCE]}"
            )
        return out.append_column(schema.TIMESTAMP, ts)


ADAPTERS: dict[str, type[Adapter]] = {
    "generic": Adapter,
    "movielens": MovieLensAdapter,
    "movielens100k": MovieLens100kAdapter,
    "amazon": AmazonAdapter,
}


def make_adapter(cfg: InputConfig) -> Adapter:
    return ADAPTERS[cfg.adapter](cfg)
