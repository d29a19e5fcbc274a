"""A returning user: what a session says is still worth reading a week later.

Its own module (and so, under `make test`, the second pytest-xdist worker, see
`tests/conftest.py`): it trains a model of its own on data of its own for a few minutes,
sharing nothing with the session's trained model.
"""

from __future__ import annotations

import pytest

from ray_app.evaluation.baselines import Popularity
from ray_app.model.artifact import load_artifact
from ray_app.protocol import metrics as M
from ray_app.protocol.data import load_prepared
from ray_app.protocol.scorer import NetScorer
from ray_app.protocol.scoring import score_split
from ray_app.training.trainer import run_train
from tests.conftest import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def sessions(ray_local, tmp_path_factory) -> tuple[str, str]:
    """(prepared, artifact) of generated users whose sessions stay on one topic and who come
    back days later, and a tiny model trained on them long enough to learn that."""
    from ray_app.config import load_config
    from ray_app.data.config import GenerateConfig, PrepareConfig
    from ray_app.data.prepare import run_prepare
    from ray_app.data.synthetic import generate

    root = tmp_path_factory.mktemp("sessions")
    generate(
        GenerateConfig(
            output=str(root / "raw"), num_events=15_000, num_items=300, seed=3, session_focus=0.9
        )
    )
    raw = root / "raw"
    overrides = [f"input.interactions={raw / 'interactions'}", f"input.items={raw / 'items'}"]
    run_prepare(load_config(PrepareConfig, None, [*overrides, f"output={root / 'prepared'}"]))
    # Nightly moments too: the week-later bar must hold with them, and this runs their path.
    cfg = tiny_config(str(root / "prepared"), root, epochs=8, lr=0.006, nightly_fraction=0.25)
    run_train(cfg)
    return str(root / "prepared"), cfg.output


def test_a_user_who_returns_a_week_later_is_ranked_about_as_well(sessions):
    """What a session's last click says is worth keeping a week later: the model must not
    lose the user then (every gap to the moment of scoring a week longer)."""
    prepared, artifact = sessions
    data = load_prepared(prepared)
    art = load_artifact(artifact)
    scorer = NetScorer(art.model, art.item_vectors)
    test = data.splits["test"]

    def full_ndcg(targets) -> float:
        return float(M.ndcg(score_split(scorer, targets, None, 10, lists=False)["full"], 10).mean())

    at_last = full_ndcg(test.after_last_event(0))
    week_later = full_ndcg(test.after_last_event(7 * 86_400))
    popularity = Popularity().fit(data.train, data.num_items)
    pop = float(M.ndcg(score_split(popularity, test, None, 10, lists=False)["full"], 10).mean())
    assert at_last > 1.5 * pop, (at_last, pop)  # the sessions were learned: something to lose
    assert week_later >= 0.9 * at_last, (week_later, at_last)
