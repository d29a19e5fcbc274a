"""Item text rendering/tokenization and the synthetic generator's properties."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_app.data import schema as S
from ray_app.data.config import GenerateConfig, TextConfig
from ray_app.data.synthetic import generate
from ray_app.data.text import ItemTokenizer, TextRenderer, default_encoder_path


def test_template_drops_empty_parts_and_splits_lists():
    r = TextRenderer(TextConfig())
    assert r.render({S.TITLE: "Heat", S.GENRES: "Action|Crime", S.TAGS: None}) == (
        "Heat. Genres: Action, Crime"
    )
    assert r.render({S.TITLE: "Lamp", S.CATEGORIES: '["Home", ["Lighting"]]'}) == (
        "Lamp. Home, Lighting"
    )
    with pytest.raises(ValueError, match="unknown fields"):
        TextRenderer(TextConfig(template="{title} {price}"))


def test_bundled_tokenizer_loads_offline_and_truncates():
    import pyarrow as pa

    assert (default_encoder_path() / "tokenizer.json").exists()
    tok = ItemTokenizer(TextConfig(max_length=8))
    out = tok(
        pa.table(
            {
                S.ITEM_IDX: pa.array([1, 2], pa.int32()),
                S.ITEM_ID: ["a", "b"],
                S.TITLE: ["Heat", "A very long title " * 10],
                S.GENRES: ["Crime", None],
                S.TAGS: [None, None],
                S.DESCRIPTION: [None, None],
                S.CATEGORIES: [None, None],
            }
        )
    )
    ids = out.column(S.INPUT_IDS).to_pylist()
    assert len(ids[1]) == 8 and ids[0][0] == 101 and ids[0][-1] == 102  # [CLS] ... [SEP]
    assert out.column(S.TEXT).to_pylist()[0] == "Heat. Genres: Crime"


def test_generator_streams_files_exactly_and_text_carries_signal(tmp_path):
    cfg = GenerateConfig(output=str(tmp_path), num_events=30_000, events_per_file=10_000, seed=1)
    summary = generate(cfg)
    files = sorted((tmp_path / "interactions").glob("*.parquet"))
    assert len(files) >= 3 and summary["events"] == 30_000
    ev = pq.read_table(tmp_path / "interactions").to_pandas()
    items = pq.read_table(tmp_path / "items").to_pandas()
    assert len(ev) == 30_000 and set(ev[S.EVENT_TYPE]) == {"view", "click", "cart", "purchase"}
    topic = dict(zip(items[S.ITEM_ID], items[S.GENRES].str.split("|").str[0], strict=True))
    ev["topic"] = ev[S.ITEM_ID].map(topic)
    # A user's events concentrate on few topics: the top topic's share is far above 1/12.
    top_share = ev.groupby(S.USER_ID)["topic"].agg(lambda s: s.value_counts(normalize=True).iloc[0])
    assert top_share.mean() > 0.35
    # Item text names its topic's words: the description shares vocabulary with the genre.
    from ray_app.data.synthetic import TOPICS

    words = items[S.DESCRIPTION].str.lower().str.split()
    hits = [
        np.mean([w in TOPICS[g.split("|")[0]] for w in ws])
        for ws, g in zip(words, items[S.GENRES], strict=True)
    ]
    assert np.mean(hits) > 0.5
    # Popularity is skewed (Zipf-like): the top 10% of items get a large share of events.
    counts = ev[S.ITEM_ID].value_counts()
    assert counts.iloc[: len(counts) // 10].sum() / len(ev) > 0.3
    # Same seed, same data.
    generate(
        GenerateConfig(
            output=str(tmp_path / "again"), num_events=30_000, events_per_file=10_000, seed=1
        )
    )
    again = pq.read_table(tmp_path / "again" / "interactions").to_pandas()
    assert again.equals(ev.drop(columns="topic"))
