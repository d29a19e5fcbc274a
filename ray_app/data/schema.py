"""Column names and Arrow schemas of every table the project writes.

Defined once here; every other module imports the names instead of spelling
strings, so a rename is one edit.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

# Interaction contract (architecture doc, "Data contracts").
USER_ID = "user_id"
ITEM_ID = "item_id"
TIMESTAMP = "timestamp"
EVENT_TYPE = "event_type"
VALUE = "value"
INTERACTION_COLUMNS = (USER_ID, ITEM_ID, TIMESTAMP, EVENT_TYPE, VALUE)

# Item contract.
TITLE = "title"
DESCRIPTION = "description"
GENRES = "genres"
TAGS = "tags"
CATEGORIES = "categories"
ITEM_TEXT_FIELDS = (TITLE, DESCRIPTION, GENRES, TAGS, CATEGORIES)
ITEM_COLUMNS = (ITEM_ID, *ITEM_TEXT_FIELDS)

# Provenance columns added by the readers: which file a row came from and its
# 0-based record number in that file. They make "ties broken by file order"
# exact and let every rejected row be traced back to its source line.
SOURCE_FILE = "_source_file"
SOURCE_ROW = "_source_row"
# Reason a row was rejected; null for a valid row.
REASON = "_reason"
# Which hash bucket of users a valid interaction goes to (internal).
BUCKET = "_bucket"

# Derived columns written by prepare.
ITEM_IDX = "item_idx"
EVENT_IDX = "event_idx"
SPLIT = "split"
TEXT = "text"
INPUT_IDS = "input_ids"
HIST_ITEM_IDX = "hist_item_idx"
HIST_EVENT_IDX = "hist_event_idx"
HIST_GAP = "hist_gap_s"
HIST_LEN = "hist_len"
TARGET_ITEM_IDX = "target_item_idx"
TARGET_ITEM_ID = "target_item_id"
TARGET_TIMESTAMP = "target_timestamp"
TARGET_EVENT_IDX = "target_event_idx"
# Position of the target in its user's time-ordered events (0-based), so the
# full history of any example is that user's first `target_pos` events.
TARGET_POS = "target_pos"
NEGATIVES = "neg_item_idx"

SPLITS = ("train", "valid", "test")

# Index 0 is padding in every vocabulary the model sees, so real items and
# event types start at 1.
PAD_IDX = 0

INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(ITEM_ID, pa.string(), nullable=False),
        pa.field(ITEM_IDX, pa.int32(), nullable=False),
        pa.field(TIMESTAMP, pa.int64(), nullable=False),
        pa.field(EVENT_TYPE, pa.string(), nullable=False),
        pa.field(EVENT_IDX, pa.int8(), nullable=False),
        pa.field(VALUE, pa.float32()),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(SOURCE_FILE, pa.int32(), nullable=False),
        pa.field(SOURCE_ROW, pa.int64(), nullable=False),
    ]
)

EXAMPLES_SCHEMA = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(TARGET_ITEM_ID, pa.string(), nullable=False),
        pa.field(TARGET_ITEM_IDX, pa.int32(), nullable=False),
        pa.field(TARGET_TIMESTAMP, pa.int64(), nullable=False),
        pa.field(TARGET_EVENT_IDX, pa.int8(), nullable=False),
        pa.field(TARGET_POS, pa.int32(), nullable=False),
        pa.field(HIST_ITEM_IDX, pa.list_(pa.int32()), nullable=False),
        pa.field(HIST_EVENT_IDX, pa.list_(pa.int8()), nullable=False),
        pa.field(HIST_GAP, pa.list_(pa.int64()), nullable=False),
        pa.field(HIST_LEN, pa.int32(), nullable=False),
        pa.field(NEGATIVES, pa.list_(pa.int32()), nullable=False),
    ]
)

ITEMS_SCHEMA = pa.schema(
    [
        pa.field(ITEM_IDX, pa.int32(), nullable=False),
        pa.field(ITEM_ID, pa.string(), nullable=False),
        pa.field(TITLE, pa.string()),
        pa.field(TEXT, pa.string(), nullable=False),
        pa.field(INPUT_IDS, pa.list_(pa.int32()), nullable=False),
    ]
)

# Rejected rows keep every source column (as text) beside these.
REJECTED_META = (REASON, SOURCE_FILE, SOURCE_ROW)

# Nightly top-K lists: topk/dt=YYYY-MM-DD/part-*.parquet, one row per (user, rank),
# each partition sorted by user_id then rank; `LATEST` at the root names the
# last published partition (e.g. "dt=2026-11-23").
RANK = "rank"
SCORE = "score"
MODEL_VERSION = "model_version"
TOPK_LATEST = "LATEST"
TOPK_SCHEMA = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(RANK, pa.int32(), nullable=False),
        pa.field(ITEM_ID, pa.string(), nullable=False),
        pa.field(SCORE, pa.float32(), nullable=False),
        pa.field(MODEL_VERSION, pa.string(), nullable=False),
    ]
)
BECAUSE = "because"
# The nightly lists with `explain_top`: each row's explanation.
BECAUSE_FIELD = pa.field(
    BECAUSE,
    pa.list_(pa.struct([pa.field(ITEM_ID, pa.string()), pa.field("weight", pa.float32())])),
    nullable=False,
)


def item_index(items: Any) -> dict[str, int]:
    """item_id -> item_idx of an item table ordered by item_idx whose row 0 is the
    padding item (a prepare output's or an artifact's `items`, as a DataFrame)."""
    rest = items.iloc[1:]
    return dict(zip(rest[ITEM_ID], rest[ITEM_IDX].astype(int), strict=True))
