"""Experiment tracking with MLflow (the optional `tracking` extra), so that `mlflow ui`
compares training runs and evaluations.

Off unless `tracking.mlflow_uri` is set. Runs are written from the driver through
MLflow's own client, never from Ray workers: a cluster's workers cannot see a
local store such as `sqlite:///runs/mlflow.db`, and one writer per run keeps its
record whole. `check` runs before a stage starts work, so a missing package fails
in a second, not after an hour of training.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import Field

from ray_app.config import ConfigError, StrictModel

logger = logging.getLogger(__name__)

MAX_PARAM = 500  # characters MLflow keeps of a parameter's value


class TrackingConfig(StrictModel):
    """Where runs are recorded (MLflow); nothing is recorded while `mlflow_uri` is null."""

    mlflow_uri: str | None = None
    """An MLflow tracking URI: `sqlite:///runs/mlflow.db` (a file the driver can write), or a
    tracking server `http://mlflow:5000`. Needs `pip install -e ".[tracking]"`.
    """
    experiment: str = Field(default="rerank", min_length=1)
    """Experiment that train and evaluate runs are recorded under."""
    run_name: str | None = None
    """Name of the run (default: the stage and its output folder's name)."""


def check(cfg: TrackingConfig) -> None:
    """Fail now, naming the fix, if tracking is on and MLflow is not installed."""
    if not cfg.mlflow_uri:
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError(
            f'tracking.mlflow_uri={cfg.mlflow_uri} needs MLflow: pip install -e ".[tracking]"'
        ) from None


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (`model.dim`), the shape MLflow's params take."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def run_label(stage: str, output: object, run_id: str) -> str:
    """A run's default name: the stage, its output folder's name (a URI's last part) and
    the output's run id, e.g. `train model 20261206T1203-ab12`."""
    return f"{stage} {str(output).rstrip('/').rsplit('/', 1)[-1]} {run_id}"


def _metric_key(key: str) -> str:
    """MLflow allows letters, digits and `_-./ :`; `ndcg@10` becomes `ndcg_at_10`."""
    return key.replace("@", "_at_")


def log_run(
    cfg: TrackingConfig,
    stage: str,
    default_name: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
    steps: Iterable[tuple[int, Mapping[str, Any]]] = (),
    tags: Mapping[str, str] | None = None,
) -> str | None:
    """Record one finished stage as an MLflow run; returns its id (None when off).

    `params` are flattened to dotted keys; `metrics` are logged once, `steps` as
    (step, {name: value}) series (the per-epoch curves). Non-numeric and non-finite
    values are left out of metrics. Nothing goes to MLflow's artifact store, whose
    default for a sqlite URI is a folder of the working directory.
    """
    if not cfg.mlflow_uri:
        return None
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.mlflow_uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment)
    run = client.create_run(
        exp_id, run_name=cfg.run_name or default_name, tags={"rerank.stage": stage, **(tags or {})}
    )
    run_id = run.info.run_id
    now = int(time.time() * 1000)

    def numeric(values: Mapping[str, Any], step: int) -> list[Metric]:
        return [
            Metric(_metric_key(k), float(v), now, step)
            for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        ]

    try:
        flat = flatten(params)
        plist = [Param(k, str(v)[:MAX_PARAM]) for k, v in sorted(flat.items())]
        mlist = numeric(metrics or {}, 0)
        for step, values in steps:
            mlist += numeric(values, step)
        # MLflow takes at most 100 params and 1000 metrics per batch.
        for i in range(0, len(plist), 100):
            client.log_batch(run_id, params=plist[i : i + 100])
        for i in range(0, len(mlist), 1000):
            client.log_batch(run_id, metrics=mlist[i : i + 1000])
        client.set_tag(run_id, "mlflow.note.content", f"rerank {stage}: {default_name}")
        client.set_terminated(run_id, "FINISHED")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    logger.info("recorded %s as MLflow run %s (%s)", stage, run_id, cfg.mlflow_uri)
    return run_id
