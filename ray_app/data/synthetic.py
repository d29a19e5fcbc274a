"""Synthetic interaction logs and catalogue: the embedded default data.

Users have latent topic preferences that drift over their lifetime; items
belong to topics, and their titles, descriptions, genres and tags are drawn
from the topic's vocabulary, so a model that reads item text can learn what
a user wants (`text_signal: false` draws the text from another topic: the
control). Popularity within a topic is Zipf-like; users re-consume recent
items sometimes; events come in sessions of view/click/cart/purchase, and
users come back minutes, hours, days or weeks later.

The catalogue grows: a share of the items is released during the period,
nobody meets an item before its release, and new items draw a share of the
attention while they are new. A time split's test period then holds targets
that no training event has seen, known to a model only by their text.

Generation streams: users are produced in chunks and each chunk is written
as its own Parquet file, so any size fits in memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ray_app.data import schema
from ray_app.data.config import GenerateConfig
from ray_app.storage import join, resolve
from ray_app.times import parse_time

logger = logging.getLogger(__name__)

TOPICS: dict[str, list[str]] = {
    "space": [
        "galaxy",
        "rocket",
        "orbit",
        "planet",
        "astronaut",
        "nebula",
        "comet",
        "starship",
        "lunar",
        "cosmic",
        "telescope",
        "asteroid",
        "gravity",
        "mars",
        "satellite",
    ],
    "cooking": [
        "recipe",
        "kitchen",
        "spice",
        "bake",
        "pasta",
        "grill",
        "flavor",
        "sauce",
        "chef",
        "oven",
        "garlic",
        "dough",
        "soup",
        "herb",
        "skillet",
    ],
    "fitness": [
        "workout",
        "muscle",
        "cardio",
        "yoga",
        "strength",
        "run",
        "stretch",
        "protein",
        "endurance",
        "gym",
        "training",
        "sprint",
        "core",
        "weights",
        "pilates",
    ],
    "travel": [
        "journey",
        "passport",
        "island",
        "beach",
        "voyage",
        "hotel",
        "backpack",
        "route",
        "coast",
        "map",
        "luggage",
        "resort",
        "flight",
        "harbor",
        "tour",
    ],
    "garden": [
        "seed",
        "soil",
        "bloom",
        "orchard",
        "compost",
        "tulip",
        "greenhouse",
        "pruning",
        "shrub",
        "vine",
        "harvest",
        "roses",
        "mulch",
        "seedling",
        "trellis",
    ],
    "jazz": [
        "saxophone",
        "swing",
        "trumpet",
        "improvisation",
        "bebop",
        "groove",
        "piano",
        "trio",
        "blues",
        "rhythm",
        "ballad",
        "quartet",
        "melody",
        "bass",
        "club",
    ],
    "mystery": [
        "detective",
        "clue",
        "murder",
        "suspect",
        "alibi",
        "secret",
        "crime",
        "witness",
        "motive",
        "riddle",
        "inspector",
        "shadow",
        "case",
        "evidence",
        "noir",
    ],
    "finance": [
        "invest",
        "stock",
        "budget",
        "savings",
        "market",
        "portfolio",
        "dividend",
        "loan",
        "credit",
        "tax",
        "retirement",
        "bond",
        "income",
        "wealth",
        "broker",
    ],
    "kids": [
        "toy",
        "puzzle",
        "crayon",
        "cartoon",
        "puppet",
        "blocks",
        "storybook",
        "lullaby",
        "playground",
        "balloon",
        "dinosaur",
        "unicorn",
        "teddy",
        "glitter",
        "sticker",
    ],
    "fantasy": [
        "dragon",
        "wizard",
        "sword",
        "kingdom",
        "elf",
        "quest",
        "spell",
        "castle",
        "knight",
        "sorcery",
        "prophecy",
        "dwarf",
        "realm",
        "enchanted",
        "throne",
    ],
    "outdoors": [
        "hiking",
        "trail",
        "camping",
        "tent",
        "summit",
        "canyon",
        "river",
        "forest",
        "compass",
        "kayak",
        "wilderness",
        "lantern",
        "ridge",
        "campfire",
        "boots",
    ],
    "gaming": [
        "console",
        "controller",
        "arcade",
        "pixel",
        "boss",
        "level",
        "multiplayer",
        "quest",
        "score",
        "joystick",
        "speedrun",
        "loot",
        "respawn",
        "guild",
        "strategy",
    ],
}
_GENERIC = [
    "edition",
    "guide",
    "collection",
    "deluxe",
    "classic",
    "essential",
    "complete",
    "ultimate",
    "series",
    "volume",
    "set",
    "pack",
    "story",
    "book",
    "kit",
]
EVENT_MIX = (("view", 0.6), ("click", 0.25), ("cart", 0.1), ("purchase", 0.05))
# (share, mean seconds) of the gap before an event: the next one in a session,
# then a return hours, days or weeks later.
GAPS = ((0.75, 120.0), (0.12, 4 * 3_600.0), (0.09, 3 * 86_400.0), (0.04, 14 * 86_400.0))


@dataclass(frozen=True)
class _World:
    topic_names: list[str]
    vocab: list[list[str]]
    item_topic: np.ndarray  # (items,)
    topic_items: list[np.ndarray]  # item indices per topic, by popularity rank
    topic_cdf: list[np.ndarray]
    release: np.ndarray  # (items,) seconds after the start when the item appears
    evergreen: np.ndarray  # (topics,) the topic's most popular item there from the start
    fresh_items: list[np.ndarray]  # per topic, its items released later, by release time
    fresh_release: list[np.ndarray]  # their release times, sorted


def _topics(n: int, rng: np.random.Generator) -> tuple[list[str], list[list[str]]]:
    names = list(TOPICS)[:n]
    vocab = [TOPICS[t] for t in names]
    syll = ["ka", "lo", "mi", "ra", "te", "su", "no", "vi", "be", "da", "ro", "zi", "fa", "lu"]
    while len(names) < n:
        words = ["".join(rng.choice(syll, 3)) for _ in range(15)]
        names.append(f"topic{len(names)}")
        vocab.append(words)
    return names, vocab


def _item_table(
    cfg: GenerateConfig, n_items: int, rng: np.random.Generator
) -> tuple[pa.Table, _World]:
    names, vocab = _topics(cfg.num_topics, rng)
    item_topic = rng.integers(0, cfg.num_topics, n_items)
    text_topic = item_topic if cfg.text_signal else rng.integers(0, cfg.num_topics, n_items)
    titles, descs, genres, tags = [], [], [], []
    for i in range(n_items):
        t = text_topic[i]
        words = vocab[t]
        other = vocab[rng.integers(0, cfg.num_topics)]
        title_words = list(rng.choice(words, rng.integers(1, 3), replace=False))
        title_words.append(rng.choice(_GENERIC))
        titles.append(" ".join(w.capitalize() for w in title_words) + f" {i % 97 + 1}")
        body = list(rng.choice(words, 6)) + list(rng.choice(other, 2))
        rng.shuffle(body)
        descs.append("A " + " ".join(body) + " " + rng.choice(_GENERIC) + ".")
        g = [names[t]]
        if rng.random() < 0.3:
            g.append(names[rng.integers(0, cfg.num_topics)])
        genres.append("|".join(dict.fromkeys(g)))
        tags.append("|".join(rng.choice(words, 2, replace=False)))
    horizon = cfg.days * 86_400
    later = rng.random(n_items) < cfg.new_items_share
    later[rng.integers(0, n_items)] = False  # at least one item from the start
    release = np.where(later, rng.uniform(0, horizon, n_items), 0).astype(np.int64)
    first = int(np.flatnonzero(release == 0)[0])
    topic_items, topic_cdf, evergreen, fresh_items, fresh_release = [], [], [], [], []
    for t in range(cfg.num_topics):
        members = rng.permutation(np.flatnonzero(item_topic == t))
        w = 1.0 / np.arange(1, len(members) + 1) ** 1.1
        topic_items.append(members)
        topic_cdf.append(np.cumsum(w) / w.sum() if len(w) else np.array([1.0]))
        from_start = members[release[members] == 0]
        evergreen.append(from_start[0] if len(from_start) else first)
        new = members[release[members] > 0]
        new = new[np.argsort(release[new], kind="stable")]
        fresh_items.append(new)
        fresh_release.append(release[new])
    table = pa.table(
        {
            schema.ITEM_ID: [f"i{i:07d}" for i in range(n_items)],
            schema.TITLE: titles,
            schema.DESCRIPTION: descs,
            schema.GENRES: genres,
            schema.TAGS: tags,
        }
    )
    world = _World(
        names,
        vocab,
        item_topic,
        topic_items,
        topic_cdf,
        release,
        np.asarray(evergreen, dtype=np.int64),
        fresh_items,
        fresh_release,
    )
    return table, world


def _zipf(members: np.ndarray, cdf: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return members[np.minimum(np.searchsorted(cdf, rng.random(n)), len(members) - 1)]


def _popular(
    world: _World, topic: np.ndarray, at: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """An item per event: Zipf-like by popularity within the event's topic, among the
    items released by the event's time (redrawn a few times, then the topic's most
    popular item from the start)."""
    item = np.zeros(len(topic), dtype=np.int64)
    for t in np.unique(topic):
        m = np.flatnonzero(topic == t)
        members, cdf = world.topic_items[t], world.topic_cdf[t]
        if len(members) == 0:
            item[m] = world.evergreen[t]
            continue

        pick = _zipf(members, cdf, len(m), rng)
        for _ in range(8):
            late = world.release[pick] > at[m]
            if not late.any():
                break
            pick[late] = _zipf(members, cdf, int(late.sum()), rng)
        pick[world.release[pick] > at[m]] = world.evergreen[t]
        item[m] = pick
    return item


def _fresh(
    world: _World, topic: np.ndarray, at: np.ndarray, window: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(found, item) per event: an item of its topic released in the `window` seconds
    before the event, uniformly, where the topic has one."""
    item = np.zeros(len(topic), dtype=np.int64)
    found = np.zeros(len(topic), dtype=bool)
    for t in np.unique(topic):
        m = np.flatnonzero(topic == t)
        rel = world.fresh_release[t]
        lo = np.searchsorted(rel, at[m] - window, side="right")
        hi = np.searchsorted(rel, at[m], side="right")
        ok = hi > lo
        pos = lo + (rng.random(len(m)) * (hi - lo)).astype(np.int64)
        item[m[ok]] = world.fresh_items[t][pos[ok]]
        found[m[ok]] = True
    return found, item


def _events_for_users(
    users: np.ndarray,
    counts: np.ndarray,
    world: _World,
    cfg: GenerateConfig,
    rng: np.random.Generator,
    t0: int,
) -> pa.Table:
    n_topics = cfg.num_topics
    total = int(counts.sum())
    uidx = np.repeat(np.arange(len(users)), counts)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    pos = np.arange(total) - np.repeat(starts, counts)
    frac = pos / np.maximum(np.repeat(counts, counts) - 1, 1)
    p0 = rng.dirichlet(np.full(n_topics, 0.3), len(users))
    p1 = rng.dirichlet(np.full(n_topics, 0.3), len(users))
    drift = rng.uniform(0.0, 1.0, len(users))[uidx][:, None]
    pref = (1 - drift * frac[:, None]) * p0[uidx] + drift * frac[:, None] * p1[uidx]
    topic = (pref.cumsum(axis=1) < rng.random(total)[:, None]).sum(axis=1).clip(0, n_topics - 1)
    shares = np.cumsum([share for share, _ in GAPS])
    kind = np.searchsorted(shares / shares[-1], rng.random(total)).clip(0, len(GAPS) - 1)
    gaps = rng.exponential(1.0, total) * np.array([mean for _, mean in GAPS])[kind]
    in_session = kind == 0
    gaps[pos == 0] = 0
    csum = np.cumsum(gaps)
    offset = csum - np.repeat(csum[starts], counts)
    horizon = cfg.days * 86_400
    user_start = rng.uniform(0, horizon * 0.85, len(users))
    # A user whose gaps would run past the period has them shortened in proportion.
    span = offset[starts + counts - 1]
    scale = np.minimum(1.0, (horizon - user_start) / np.maximum(span, 1.0))
    at = (user_start[uidx] + offset * scale[uidx]).astype(np.int64)
    if cfg.session_focus > 0:
        opens = ~in_session | (pos == 0)
        first = np.maximum.accumulate(np.where(opens, np.arange(total), 0))
        focus = ~opens & (rng.random(total) < cfg.session_focus)
        topic[focus] = topic[first[focus]]
    item = _popular(world, topic, at, rng)
    fresh = rng.random(total) < cfg.fresh_share
    found, new = _fresh(world, topic[fresh], at[fresh], cfg.fresh_days * 86_400, rng)
    item[np.flatnonzero(fresh)[found]] = new[found]
    back = rng.integers(1, 6, total)
    repeat = (rng.random(total) < 0.08) & (pos >= back)
    item[repeat] = item[np.flatnonzero(repeat) - back[repeat]]
    ts = t0 + at
    kinds = [k for k, _ in EVENT_MIX]
    probs = np.array([p for _, p in EVENT_MIX])
    ev = np.searchsorted(np.cumsum(probs), rng.random(total)).clip(0, len(kinds) - 1)
    value = np.where(np.isin(ev, [0, 1]), np.round(rng.lognormal(3.0, 1.0, total), 1), 1.0)
    order = np.lexsort((uidx, ts))
    return pa.table(
        {
            schema.USER_ID: pa.array(np.asarray([f"u{x:08d}" for x in users])[uidx[order]]),
            schema.ITEM_ID: pa.array(np.char.add("i", np.char.zfill(item[order].astype(str), 7))),
            schema.TIMESTAMP: pa.array(ts[order]),
            schema.EVENT_TYPE: pa.array(np.asarray(kinds)[ev[order]]),
            schema.VALUE: pa.array(value[order].astype(np.float32)),
        }
    )


def generate(cfg: GenerateConfig) -> dict:
    """Write `items/items.parquet` and `interactions/part-*.parquet` under `cfg.output`."""
    t_start = time.time()
    rng = np.random.default_rng(cfg.seed)
    n_users = cfg.num_users or max(10, cfg.num_events // 40)
    n_items = cfg.num_items or int(np.clip(cfg.num_events // 100, 200, 200_000))
    fs, root = resolve(cfg.output)
    fs.create_dir(root, recursive=True)
    items, world = _item_table(cfg, n_items, rng)
    fs.create_dir(join(root, "items"), recursive=True)
    pq.write_table(items, join(root, "items", "items.parquet"), filesystem=fs)
    weights = rng.lognormal(0.0, 1.0, n_users)
    counts = 3 + rng.multinomial(max(cfg.num_events - 3 * n_users, 0), weights / weights.sum())
    while counts.sum() > cfg.num_events and counts.max() > 3:  # num_events < 3 * users
        counts[np.argmax(counts)] -= 1
    t0 = parse_time(cfg.start)
    fs.create_dir(join(root, "interactions"), recursive=True)
    written, part, lo = 0, 0, 0
    cum = np.cumsum(counts)
    with tqdm(total=int(counts.sum()), desc="generate", unit="ev", disable=None) as bar:
        while lo < n_users:
            hi = int(np.searchsorted(cum, (cum[lo - 1] if lo else 0) + cfg.events_per_file)) + 1
            hi = min(max(hi, lo + 1), n_users)
            users = np.arange(lo, hi)
            table = _events_for_users(users, counts[lo:hi], world, cfg, rng, t0)
            pq.write_table(
                table, join(root, "interactions", f"part-{part:05d}.parquet"), filesystem=fs
            )
            written += table.num_rows
            bar.update(table.num_rows)
            part += 1
            lo = hi
    summary = {
        "output": cfg.output,
        "events": written,
        "users": n_users,
        "items": n_items,
        "files": part,
        "seconds": round(time.time() - t_start, 2),
    }
    logger.info("generated %s", summary)
    return summary
