"""Parsing and row-level validation: each bad value gets its own reason."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ray_app.data import schema as S
from ray_app.data import validation as V
from ray_app.data.validation import Rules, normalize_interactions, normalize_items, parse_timestamps

RULES = Rules(
    event_types=("view", "click", "rating", "interaction"),
    default_event_type="interaction",
    min_timestamp=946_684_800,  # 2000-01-01
    max_timestamp=1_900_000_000,
    max_id_chars=10,
    max_text_chars=50,
)


def batch(**cols) -> pa.Table:
    n = len(next(iter(cols.values())))
    cols = {k: pa.array(v) for k, v in cols.items()}
    cols[S.SOURCE_FILE] = pa.array(np.zeros(n, np.int32))
    cols[S.SOURCE_ROW] = pa.array(np.arange(n, dtype=np.int64))
    cols[S.REASON] = pa.nulls(n, pa.string())
    return pa.table(cols)


def test_timestamps_in_every_accepted_form():
    ts, missing, bad = parse_timestamps(
        pa.array(
            [
                "1700000000",
                "2024-01-01T00:00:00Z",
                "2024-01-01T02:00:00+02:00",
                "1700000000.9",
                "",
                "yesterday",
                None,
            ]
        ),
        7,
    )
    assert ts[:4].tolist() == [1_700_000_000, 1_704_067_200, 1_704_067_200, 1_700_000_000]
    assert missing.tolist() == [False] * 4 + [True, False, True]
    assert bad.tolist() == [False] * 5 + [True, False]
    ms, _, _ = parse_timestamps(pa.array([1_700_000_000_123]), 1, unit="ms")
    assert ms.tolist() == [1_700_000_000]
    typed, _, _ = parse_timestamps(pa.array([np.datetime64("2024-01-01T00:00:00", "ms")]), 1)
    assert typed.tolist() == [1_704_067_200]


def test_each_bad_field_has_its_reason():
    t = batch(
        user_id=["u1", "", "u3", "u4", "u5", "u6", "u7", "u8", "averyveryverylongid"],
        item_id=["i1", "i2", None, "i4", "i5", "i6", "i7", "i8", "i9"],
        timestamp=[
            "1700000000",
            "1700000000",
            "1700000000",
            "",
            "soon",
            "100",
            "1700000000",
            "1700000000",
            "1700000000",
        ],
        event_type=["VIEW", "view", "view", "view", "view", "view", "teleport", None, "view"],
        value=["1.5", None, None, None, None, None, None, "lots", None],
    )
    frame, reasons = normalize_interactions(t, RULES)
    assert reasons.tolist() == [
        None,
        V.MISSING_USER_ID,
        V.MISSING_ITEM_ID,
        V.MISSING_TIMESTAMP,
        V.BAD_TIMESTAMP,
        V.TIMESTAMP_OUT_OF_RANGE,
        V.UNKNOWN_EVENT_TYPE,
        V.BAD_VALUE,
        V.ID_TOO_LONG,
    ]
    assert frame[S.EVENT_TYPE][0] == "view"  # case-insensitive
    assert frame[S.EVENT_IDX][0] == 1
    assert frame[S.VALUE][0] == 1.5


def test_missing_event_type_gets_default_and_reader_reason_wins():
    t = batch(user_id=["u1", "u2"], item_id=["i1", "i2"], timestamp=[1_700_000_000] * 2)
    t = t.set_column(t.column_names.index(S.REASON), S.REASON, pa.array([None, "malformed_row"]))
    frame, reasons = normalize_interactions(t, RULES)
    assert frame[S.EVENT_TYPE].tolist()[0] == "interaction"
    assert reasons.tolist() == [None, "malformed_row"]


def test_items_text_too_long_and_missing_id():
    t = batch(item_id=["a", "", "c"], title=["ok", "x", "y" * 60])
    _, reasons = normalize_items(t, max_id_chars=10, max_text_chars=50)
    assert reasons.tolist() == [None, V.MISSING_ITEM_ID, V.TEXT_TOO_LONG]


def test_rejected_table_keeps_the_record():
    t = batch(user_id=["u1", ""], item_id=["i1", "i2"])
    out = V.rejected_table(
        t, np.array([False, True]), np.array([None, "missing_user_id"]), ["f.csv"]
    )
    assert out.to_pylist() == [
        {
            "reason": "missing_user_id",
            "source_file": "f.csv",
            "source_row": 1,
            "record": '{"user_id": "", "item_id": "i2"}',
        }
    ]
