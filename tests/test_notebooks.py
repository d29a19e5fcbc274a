"""The notebooks run top to bottom on small data, so they cannot break silently.

Each one is executed headless with nbclient in its own kernel (its own local
Ray), with the parameters its first cell reads from the environment turned
down to test size. The notebooks are committed without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.slow]

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, env: dict[str, str], monkeypatch, tmp_path: Path):
    """Run notebooks/<name> with `env` set; returns the executed notebook (saved
    under tmp_path for a look when a cell fails)."""
    import nbformat
    from nbclient import NotebookClient

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / name)
    return nb


def outputs(nb, kind: str) -> list[dict]:
    return [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})
    ]


def test_quickstart_runs_every_stage_and_draws_its_plots(monkeypatch, tmp_path):
    wd = tmp_path / "quickstart"
    nb = execute(
        "quickstart.ipynb",
        {
            "RERANK_NB_WORKDIR": str(wd),
            "RERANK_NB_EVENTS": "3000",
            "RERANK_NB_ENCODER": "tiny",
            "RERANK_NB_EPOCHS": "1",
            "RERANK_NB_BASELINES": "popularity",
            "RERANK_NB_PORT": str(free_port()),
        },
        monkeypatch,
        tmp_path,
    )
    for stage in ("prepared", "model", "evaluation", "topk/dt=2026-11-24"):
        assert (wd / stage / "_SUCCESS").exists(), stage
    # training curves, metrics by method, the summary's bars, NDCG by popularity,
    # history vs list
    assert len(outputs(nb, "image/png")) == 5
    text = "\n".join(
        "".join(o.get("text", "")) + json.dumps(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert "model_version" in text and "history_used" in text
    assert "all targets: reranker is " in text  # the summary's verdict


def test_committed_notebooks_carry_no_outputs():
    import nbformat

    found = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert {p.name for p in found} >= {"quickstart.ipynb", "evaluation.ipynb"}
    for path in found:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name


def movielens_folder(root: Path, num_events: int = 6000) -> Path:
    """Generated logs written as MovieLens's ratings.csv / movies.csv / tags.csv."""
    import numpy as np
    import pandas as pd

    from ray_app.data.config import GenerateConfig
    from ray_app.data.synthetic import generate

    generate(GenerateConfig(output=str(root / "raw"), num_events=num_events, seed=5))
    ev = pd.read_parquet(root / "raw" / "interactions")
    items = pd.read_parquet(root / "raw" / "items")
    movie = {i: n + 1 for n, i in enumerate(items["item_id"])}
    user = {u: n + 1 for n, u in enumerate(sorted(ev["user_id"].unique()))}
    out = root / "ml"
    out.mkdir()
    rng = np.random.default_rng(0)
    pd.DataFrame(
        {
            "userId": ev["user_id"].map(user),
            "movieId": ev["item_id"].map(movie),
            "rating": rng.integers(1, 11, len(ev)) / 2,
            "timestamp": ev["timestamp"],
        }
    ).to_csv(out / "ratings.csv", index=False)
    pd.DataFrame(
        {
            "movieId": items["item_id"].map(movie),
            "title": items["title"] + " (2001)",
            "genres": items["genres"].str.replace(",", "|"),
        }
    ).to_csv(out / "movies.csv", index=False)
    tags = items[["item_id", "tags"]].assign(tag=items["tags"].str.split("|")).explode("tag")
    pd.DataFrame(
        {"userId": 1, "movieId": tags["item_id"].map(movie), "tag": tags["tag"], "timestamp": 1}
    ).to_csv(out / "tags.csv", index=False)
    return out


def test_evaluation_scores_the_model_beside_the_baselines(monkeypatch, tmp_path):
    wd = tmp_path / "evaluation"
    nb = execute(
        "evaluation.ipynb",
        {
            "RERANK_NB_DATA": str(movielens_folder(tmp_path)),
            "RERANK_NB_WORKDIR": str(wd),
            "RERANK_NB_ENCODER": "tiny",
            "RERANK_NB_EPOCHS": "1",
            "RERANK_NB_BASELINES": "popularity,item_knn",
        },
        monkeypatch,
        tmp_path,
    )
    metrics = json.loads((wd / "evaluation" / "metrics.json").read_text())
    assert set(metrics["results"]["test"]) == {"popularity", "item_knn", "reranker"}
    assert set(metrics["paired"]) == {"reranker - popularity", "reranker - item_knn"}
    # training curves, metrics by method, two breakdowns, paired differences
    assert len(outputs(nb, "image/png")) == 5
