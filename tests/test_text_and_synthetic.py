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


def _events(path, **keys):
    generate(GenerateConfig(output=str(path), num_events=30_000, seed=3, **keys))
    ev = pq.read_table(path / "interactions").to_pandas()
    items = pq.read_table(path / "items").to_pandas()
    return ev, items


def test_generator_releases_items_over_time_and_users_come_back(tmp_path):
    """Items keep arriving: after a late cut-off, events go to items nobody met before
    it (far more than from the long tail alone), and users return hours, days and
    weeks after their last event as well as within sessions."""

    def unseen_share(ev):
        cut = ev[S.TIMESTAMP].min() + 0.85 * (ev[S.TIMESTAMP].max() - ev[S.TIMESTAMP].min())
        before = set(ev.loc[ev[S.TIMESTAMP] < cut, S.ITEM_ID])
        return (~ev.loc[ev[S.TIMESTAMP] >= cut, S.ITEM_ID].isin(before)).mean()

    ev, _ = _events(tmp_path / "grow")
    still, _ = _events(tmp_path / "still", new_items_share=0.0, fresh_share=0.0)
    assert unseen_share(ev) > 0.05 and unseen_share(ev) > 4 * unseen_share(still)
    gaps = ev.sort_values([S.USER_ID, S.TIMESTAMP]).groupby(S.USER_ID)[S.TIMESTAMP].diff().dropna()
    assert (gaps < 600).mean() > 0.5  # sessions
    for lo, hi in ((3_600, 86_400), (86_400, 7 * 86_400), (7 * 86_400, None)):
        assert ((gaps >= lo) & ((gaps < hi) if hi else True)).mean() > 0.01, (lo, hi)


def test_text_signal_off_makes_text_unrelated_to_behaviour(tmp_path):
    """The control: with `text_signal: false` an item's genres (and words) come from a
    random topic, so a user's events no longer concentrate on the topics text names."""

    def top_topic_share(ev, items):
        topic = dict(zip(items[S.ITEM_ID], items[S.GENRES].str.split("|").str[0], strict=True))
        named = ev[S.ITEM_ID].map(topic)
        shares = named.groupby(ev[S.USER_ID]).agg(lambda s: s.value_counts(normalize=True).iloc[0])
        return shares.mean()

    on = top_topic_share(*_events(tmp_path / "on"))
    off = top_topic_share(*_events(tmp_path / "off", text_signal=False))
    assert on > 0.35 and off < on - 0.1
