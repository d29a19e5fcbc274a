"""Config of the `evaluate` stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ray_app.config import PathLike, StrictModel
from ray_app.times import DEFAULT_DELTAS, format_duration, parse_duration
from ray_app.tracking import TrackingConfig

BaselineName = Literal["popularity", "item_knn", "ease", "sasrec", "sasrec_ce", "text_tfidf"]


class EvaluateConfig(StrictModel):
    """Config of the `evaluate` stage: what to score, on which prepared data, how."""

    prepared: PathLike
    """A `prepare` output: methods are fitted on train, tuned on valid, scored on test."""
    output: PathLike
    """Folder for metrics.json, report.md, plots and the sampled candidate lists."""
    k: int = Field(default=10, ge=1, le=1000)
    """Cut-off of HR, NDCG, Recall, coverage, long-tail and diversity."""
    num_negatives: int = Field(default=99, ge=1)
    """Sampled protocol: items drawn per user beside the held-out one."""
    seed: int = 0
    """Seed of the sampled candidates (the same lists for every method)."""
    baselines: list[BaselineName] = Field(
        default_factory=lambda: [
            "popularity",
            "item_knn",
            "ease",
            "sasrec",
            "sasrec_ce",
            "text_tfidf",
        ]
    )
    """Baselines to fit: popularity, item_knn, ease, sasrec (BCE with one sampled negative, as
    published), sasrec_ce (full-softmax cross-entropy over the catalogue, "SASRec+"), text_tfidf
    (text only: TF-IDF cosine of each item to the user's recent items; the one baseline that ranks
    items no training event has met).
    """
    text_recent: list[int] = Field(default_factory=lambda: [1, 3, 10, 30], min_length=1)
    """text_tfidf: how many of the user's last items make the profile, searched on valid."""
    ease_lambdas: list[float] = Field(
        default_factory=lambda: [10.0, 30.0, 100.0, 300.0, 1000.0], min_length=1
    )
    """EASE regularisation values searched on valid."""
    knn_neighbours: list[int] = Field(default_factory=lambda: [5, 10, 20, 50, 100], min_length=1)
    """Item-kNN neighbour counts searched on valid."""
    sasrec_epochs: int = Field(default=300, ge=1)
    """Most SASRec epochs, either loss (the best on valid is kept)."""
    sasrec_max_minutes: float | None = Field(default=20.0, gt=0)
    """Fit-time cap of each SASRec variant, validation included (then the best epoch so far is
    kept); null = none.
    """
    fit_processes: int | None = Field(default=None, ge=1)
    """Processes the SASRec variants fit in, side by side, each with an equal share of this
    machine's CPUs; null = one per variant, at most one per CPU; 1 = one after the other in the
    driver. Two small models on one thread each finish sooner than in turn on two threads.
    """
    deltas: list[int | str] = Field(default_factory=lambda: list(DEFAULT_DELTAS))
    """Returning users: every target is also scored at its history's last event + each of these
    (seconds, or a number with s/m/h/d/w), the gaps a user who comes back later has; methods
    without a time input score the same at every one.
    """
    backtest: bool = True
    """Also score every method as the nightly job would have listed it: each target against
    what the run of the UTC day before it knew (events before its day's 00:00, recency to the
    end of the day before), the whole catalogue minus those events' items.
    """
    max_users: int | None = Field(default=None, ge=10)
    """Score a fixed sample of this many users (seeded by `seed`, drawn from every split's users;
    the same users for every method, protocol and moment); baselines still fit on every training
    event. Bounds the cost of whole-catalogue rankings on a large catalogue; null = every user.
    """
    returning_splits: list[Literal["valid", "test"]] = Field(
        default_factory=lambda: ["valid", "test"], min_length=1
    )
    """Splits scored at every Δ and in the backtest. Each costs a whole-catalogue ranking per Δ
    for every model with a time input; `[test]` halves that on a large catalogue.
    """
    groups: dict[str, list[str]] = Field(default_factory=dict)
    """Models reported together, e.g. {reranker: [seed0, seed1, seed2]}: a row with their mean
    (± sd across members), compared user by user (mean of the members) with the best baseline.
    """
    models: dict[str, PathLike] = Field(default_factory=dict)
    """Trained re-rankers to score beside the baselines: name -> artifact path."""
    lists: dict[str, PathLike] = Field(default_factory=dict)
    """Precomputed top-K lists to score with the full-ranking protocol: name -> a `nightly`
    partition run with `as_of: test` (or `valid`), e.g. runs/ml/backtest/dt=2026-11-23.
    """
    paired: list[tuple[str, str]] = Field(default_factory=list)
    """Pairs of methods [a, b] compared user by user on test (and on cold-start items when both
    hold items out): mean and standard error of a - b NDCG@k.
    """

    compare: list[tuple[str, str]] = Field(default_factory=list)
    """Pairs of methods or groups [a, b] compared user by user on test at the target's time, at
    every Δ and in the backtest, both protocols: mean and 95% interval of a - b NDCG@k (e.g. the
    re-ranker against its no-time-input variant).
    """
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Record the metrics table as an MLflow run (off unless `tracking.mlflow_uri` is set)."""

    @field_validator("deltas")
    @classmethod
    def _durations(cls, v: list[int | str]) -> list[int | str]:
        for d in v:
            parse_duration(d)
        return v

    @property
    def delta_seconds(self) -> dict[str, int]:
        """Label (Δ=1h) -> seconds, in the configured order."""
        return {f"Δ={format_duration(parse_duration(d))}": parse_duration(d) for d in self.deltas}

    @model_validator(mode="after")
    def _paired_names_exist(self) -> EvaluateConfig:
        known = set(self.baselines) | set(self.models)
        unknown = sorted({n for pair in self.paired for n in pair} - known)
        if unknown:
            raise ValueError(
                f"paired names {unknown} are neither baselines nor models {sorted(known)}"
            )
        for group, members in self.groups.items():
            missing = sorted(set(members) - set(self.models))
            if missing or not members:
                raise ValueError(f"groups.{group}: {missing or 'no members'} are not models")
            if group in known:
                raise ValueError(f"groups.{group}: the name is already a method")
        unknown = sorted({n for pair in self.compare for n in pair} - known - set(self.groups))
        if unknown:
            raise ValueError(
                f"compare names {unknown} are neither baselines, models nor groups "
                f"{sorted(known | set(self.groups))}"
            )
        return self
