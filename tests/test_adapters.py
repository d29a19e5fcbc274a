"""Adapters map each public format onto the contracts; the real MovieLens counts match."""

from __future__ import annotations

import json

import pyarrow.dataset as pads
import pytest

from ray_app.config import load_config
from ray_app.data import schema as S
from ray_app.data.adapters import make_adapter
from ray_app.data.config import InputConfig, PrepareConfig
from ray_app.data.prepare import run_prepare
from ray_app.data.readers import read_file

from .conftest import SHARED_MOVIELENS


def contract_rows(adapter, source, kind):
    rows = []
    for f in source.files:
        for block in read_file(source.fs, f.path, 0, source.spec):
            t = adapter.to_interactions(block) if kind == "i" else adapter.to_items(block)
            rows += t.to_pylist()
    return rows


def test_movielens_latest_format(write, tmp_path):
    write("ml/ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.5,964982703\n")
    write(
        "ml/movies.csv",
        'movieId,title,genres\n10,"Heat, The (1995)",Action|Crime\n'
        "11,Nothing (2000),(no genres listed)\n",
    )
    write(
        "ml/tags.csv", "userId,movieId,tag,timestamp\n1,10,Heist,1\n2,10,heist,2\n3,10,Pacino,3\n"
    )
    a = make_adapter(InputConfig(adapter="movielens", path=str(tmp_path / "ml")))
    (r,) = contract_rows(a, a.interaction_source(), "i")
    assert (r[S.USER_ID], r[S.ITEM_ID], r[S.TIMESTAMP], r[S.EVENT_TYPE], r[S.VALUE]) == (
        "1",
        "10",
        "964982703",
        "rating",
        "4.5",
    )
    items = contract_rows(a, a.item_source(), "t")
    assert items[0][S.TITLE] == "Heat, The (1995)" and items[0][S.GENRES] == "Action|Crime"
    assert items[1][S.GENRES] is None
    assert a.extra_item_text() == {"10": {S.TAGS: "heist|pacino"}}  # by frequency, lower-cased


def test_movielens_100k_format(write, tmp_path):
    write("ml100k/u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    flags = "|".join(["0"] * 3 + ["1"] + ["0"] * 15)
    write(
        "ml100k/u.item",
        f"242|Kolya (1996)|24-Jan-1997||http://x|{flags}\n".encode("latin-1")
        + f"302|L.A. Confidential (1997)|01-Jan-1997||http://y|{flags}\n".encode("latin-1")
        + f"303|Caf\xe9 au lait (1994)|01-Jan-1994||u|{flags}\n".encode("latin-1"),
    )
    a = make_adapter(InputConfig(adapter="movielens100k", path=str(tmp_path / "ml100k")))
    rows = contract_rows(a, a.interaction_source(), "i")
    assert [(r[S.USER_ID], r[S.ITEM_ID], r[S.TIMESTAMP]) for r in rows] == [
        ("196", "242", "881250949"),
        ("186", "302", "891717742"),
    ]
    items = contract_rows(a, a.item_source(), "t")
    assert [i[S.GENRES] for i in items] == ["Animation"] * 3
    assert items[2][S.TITLE] == "Café au lait (1994)"  # latin-1 decoded, not rejected


def test_amazon_both_generations(write, tmp_path):
    write(
        "old/reviews.jsonl",
        json.dumps(
            {"reviewerID": "A1", "asin": "B01", "overall": 5.0, "unixReviewTime": 1400000000}
        )
        + "\n",
    )
    write(
        "old/meta.jsonl",
        json.dumps(
            {
                "asin": "B01",
                "title": "Kettle",
                "categories": [["Home", "Kitchen"]],
                "description": "Boils water.",
            }
        )
        + "\n",
    )
    write(
        "new/reviews.jsonl",
        json.dumps(
            {
                "user_id": "U1",
                "asin": "C02",
                "parent_asin": "P02",
                "rating": 4.0,
                "timestamp": 1588687728923,
            }
        )
        + "\n",
    )
    write(
        "new/meta.jsonl",
        json.dumps(
            {
                "parent_asin": "P02",
                "title": "Lamp",
                "description": ["Bright.", "LED."],
                "categories": ["Home", "Lighting"],
                "features": ["dimmable"],
            }
        )
        + "\n",
    )
    for d, user, item, ts in (
        ("old", "A1", "B01", "1400000000"),
        ("new", "U1", "P02", "1588687728"),
    ):
        a = make_adapter(
            InputConfig(
                adapter="amazon",
                interactions=str(tmp_path / d / "reviews.jsonl"),
                items=str(tmp_path / d / "meta.jsonl"),
            )
        )
        (r,) = contract_rows(a, a.interaction_source(), "i")
        assert (r[S.USER_ID], r[S.ITEM_ID], str(r[S.TIMESTAMP]), r[S.EVENT_TYPE]) == (
            user,
            item,
            ts,
            "review",
        )
        (it,) = contract_rows(a, a.item_source(), "t")
        assert it[S.ITEM_ID] == item and it[S.CATEGORIES].startswith("[")


def test_generic_column_mapping(write, tmp_path):
    write("ev.tsv", "uid\tsku\twhen\taction\nu1\ts1\t2024-01-01T00:00:00Z\tclick\n")
    write("cat.tsv", "sku\tname\nu1\tShoe\n")
    a = make_adapter(
        InputConfig(
            interactions=str(tmp_path / "ev.tsv"),
            items=str(tmp_path / "cat.tsv"),
            interaction_columns={
                "user_id": "uid",
                "item_id": "sku",
                "timestamp": "when",
                "event_type": "action",
            },
            item_columns={"item_id": "sku", "title": "name"},
        )
    )
    (r,) = contract_rows(a, a.interaction_source(), "i")
    assert (r[S.USER_ID], r[S.ITEM_ID], r[S.EVENT_TYPE]) == ("u1", "s1", "click")
    (it,) = contract_rows(a, a.item_source(), "t")
    assert it[S.TITLE] == "Shoe"
    with pytest.raises(ValueError, match="unknown contract columns"):
        make_adapter(InputConfig(interactions="x", items="y", interaction_columns={"usr": "a"}))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not SHARED_MOVIELENS.exists(), reason="shared MovieLens data not present")
def test_real_movielens_counts_match_the_input(ray_local, tmp_path):
    cfg = load_config(
        PrepareConfig,
        None,
        [
            "input.adapter=movielens",
            f"input.path={SHARED_MOVIELENS}",
            f"output={tmp_path / 'ml'}",
        ],
    )
    m = run_prepare(cfg)
    c = m["counts"]
    assert c["interactions"]["read"] == 100_836
    assert c["interactions"]["kept"] == 100_836  # nothing rejected or filtered
    assert c["interactions"]["rejected"] == 0 and c["interactions"]["filtered"] == 0
    assert c["users"]["total"] == 610 and c["users"]["kept"] == 610
    assert c["items"]["read"] == 9_742 and c["items"]["valid"] == 9_742
    assert c["interactions"]["by_split"] == {"train": 100_836 - 1_220, "valid": 610, "test": 610}
    assert c["examples"] == {"train": 100_836 - 1_220 - 610, "valid": 610, "test": 610}
    test = pads.dataset(str(tmp_path / "ml" / "examples" / "test")).to_table().to_pandas()
    assert test[S.USER_ID].is_unique and len(test) == 610
