"""Config of the `train` stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ray_app.config import PathLike, StrictModel
from ray_app.model.config import ModelConfig
from ray_app.runtime import RayConfig
from ray_app.times import DEFAULT_DELTAS, parse_duration
from ray_app.tracking import TrackingConfig


class TrainConfig(StrictModel):
    """Config of the `train` stage: data, model, optimisation, workers, checkpoints."""

    prepared: PathLike
    """A `prepare` output."""
    output: PathLike
    """The model artifact directory, published atomically at the end."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The network: encoder, what is fine-tuned, tower sizes."""
    storage: str | None = None
    """Ray Train run storage (checkpoints). A new run with the same storage and name resumes from
    the last checkpoint. Default: `<output>.runs`.
    """
    run_name: str = "train"
    """Ray Train run name under `storage`."""
    resume: bool = True
    """Continue the run of the same storage and name from its last checkpoint; false starts over."""
    epochs: int = Field(default=8, ge=1)
    """Most epochs (early stopping and max_minutes can end sooner)."""
    batch_size: int = Field(default=256, ge=2)
    """Examples per step, over all workers."""
    negatives_per_example: int = Field(default=0, ge=0)
    """How many of each example's prepared negatives join the batch's shared candidate set. The
    other examples' targets are negatives in any case (in-batch, popularity-distributed,
    logQ-corrected); every candidate goes through the fine-tuned encoder layers, so each one
    costs a text pass.
    """
    loss: Literal["softmax", "bce"] = "softmax"
    """`softmax` (sampled softmax over the batch's shared candidates, logQ-corrected) or `bce`."""
    lr: float = Field(default=2e-3, gt=0)
    """Learning rate of everything but the encoder (AdamW)."""
    encoder_lr: float = Field(default=5e-5, gt=0)
    """Learning rate of the encoder's trainable layers."""
    encoder_frozen_epochs: int = Field(default=1, ge=0)
    """Epochs that train the heads on the frozen encoder before its trainable layers are updated
    (linear probing, then fine-tuning): fine-tuning from the first step, while the heads are
    random, distorts the pretrained text features (see the README's MovieLens ablations).
    """
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay."""
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    """Share of the steps with a linear warm-up; then cosine decay."""
    grad_clip: float = Field(default=1.0, gt=0)
    """Gradient norm clipping."""
    refresh_text_every: int = Field(default=100, ge=1)
    """Steps between re-encoding every item's text with the current weights (the history side of
    the model reads that table).
    """
    text_chunks: int = Field(default=4, ge=1)
    """The batch's target items go through the trained encoder layers in this many length-sorted
    groups (less padding); negatives use the text table.
    """
    prefetch_batches: int = Field(default=4, ge=0)
    """Batches each worker's Ray Data iterator fetches ahead of the step, so a slow fetch from the
    dataset's split coordinator overlaps training.
    """
    cache_examples: bool | Literal["auto"] = "auto"
    """Keep the decoded examples in the object store across epochs: `auto` when they take under a
    third of it; false streams them from storage each epoch.
    """
    checkpoint_every_steps: int = Field(default=0, ge=0)
    """Also checkpoint every N steps within an epoch (0 = at epoch ends only)."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Checkpoints kept in storage."""
    patience: int = Field(default=2, ge=1)
    """Epochs without a better select_metric before training stops."""
    select_metric: Literal[
        "ndcg_full_returning", "ndcg_sampled_returning", "ndcg_full", "ndcg_sampled"
    ] = "ndcg_full_returning"
    """Validation metric that picks the best epoch: full-ranking or sampled NDCG@k. `_returning`
    scores each valid user at one moment drawn (fixed seed) from its target's time and its last
    event + each of `select_deltas`: an unbiased estimate of the mean over the returning-user
    curve at the cost of one ranking per user. Without the suffix, every user at its target's
    time (the moment right after the last click, which favours models that read only that).
    """
    select_deltas: list[int | str] = Field(
        default_factory=lambda: list(DEFAULT_DELTAS), min_length=1
    )
    """The moments after the last event that `_returning` select metrics draw from."""
    returning_fraction: float = Field(default=0.5, ge=0, le=1)
    """Share of training examples scored as a returning user would be: the time since their
    history's last event is redrawn log-uniformly between one minute and `returning_max` (the
    target stays). Without it a model only sees the gap to the next event, seconds to minutes
    in most examples, and never learns what a day or a month later looks like.
    """
    returning_max: int | str = "180d"
    """Longest time since the last event that `returning_fraction` draws."""
    nightly_fraction: float = Field(default=0.0, ge=0, le=1)
    """Share of training examples seen as the nightly run of the day before their target sees
    them: that day's events dropped from the history, every gap measured to the end of the
    day before (the moment the nightly lists are scored at). It is also the only way the
    model sees an empty history, a user whose first day it is. These rows keep their
    time since the last event (no `returning_fraction` redraw). Off by default: the README
    says what it fixed and what it cost.
    """
    k: int = Field(default=10, ge=1)
    """Cut-off of the validation metrics."""
    valid_negatives: int = Field(default=99, ge=1)
    """Sampled negatives per validation user (the evaluate stage's protocol)."""
    valid_users: int | None = Field(default=None, ge=1)
    """Per-epoch validation on this many valid users (a fixed sample, the same for every run and
    seed); null = all. Ranking a large catalogue for every valid user each epoch can cost more
    than the epoch's training; the evaluate stage scores them all.
    """
    max_minutes: float | None = Field(default=None, gt=0)
    """Stop after this much training time (checked every step, then validate and checkpoint); null
    = no limit.
    """
    num_workers: int = Field(default=1, ge=1)
    """Ray Train workers (DDP processes), one GPU each when use_gpu."""
    cpus_per_worker: int = Field(default=1, ge=1)
    """CPUs each worker reserves, and the threads its PyTorch uses (default: the reserved CPUs).
    Leave some CPUs unreserved for Ray Data to feed the workers: on one small machine reserve 1
    per worker and use more threads.
    """
    torch_threads: int | None = Field(default=None, ge=1)
    """PyTorch threads per worker (default: cpus_per_worker)."""
    use_gpu: bool | Literal["auto"] = "auto"
    """`auto` uses GPUs when the cluster has them."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """`auto`: bf16 autocast on GPUs that support it, else fp16 with loss scaling; fp32 on CPUs."""
    max_failures: int = Field(default=2, ge=-1)
    """Worker failures Ray Train recovers from the last checkpoint (-1 = unlimited)."""
    cold_start_fraction: float = Field(default=0.0, ge=0, lt=1)
    """Share of items held out of training entirely (their events removed from the train split) to
    measure cold start; 0 = none.
    """
    export_onnx: bool = True
    """Write the text tower (encoder, pooling, projection) into the artifact as ONNX, float32 and
    int8, for serving's and nightly's `text_encoder: onnx / onnx-int8` (CPU encoding of new items);
    without it they export it when they load the model.
    """
    seed: int = 0
    """Seed of initialisation, dropout and the draws of returning and nightly moments."""
    shuffle_seed: int | None = None
    """Seed of the examples' shuffle; null draws a new order every run and every epoch. With a
    seed, every epoch sees the same order and the order examples reach the workers is kept,
    so two runs on the same data and cluster shape train the same model (a reproducible run,
    e.g. to check that a change to the code changed nothing).
    """
    ray: RayConfig = Field(default_factory=RayConfig)
    """Which Ray to run on."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Record the run (resolved config, per-epoch metrics, artifact path) in MLflow, from the
    driver (off unless `tracking.mlflow_uri` is set).
    """

    @field_validator("select_deltas", "returning_max")
    @classmethod
    def _train_durations(cls, v: list[int | str] | int | str) -> list[int | str] | int | str:
        for d in v if isinstance(v, list) else [v]:
            parse_duration(d)
        return v

    @model_validator(mode="after")
    def _bce_needs_negatives(self) -> TrainConfig:
        if self.loss == "bce" and self.negatives_per_example < 1:
            raise ValueError("loss 'bce' needs negatives_per_example >= 1")
        return self

    @property
    def storage_path(self) -> str:
        return self.storage or self.output.rstrip("/") + ".runs"
