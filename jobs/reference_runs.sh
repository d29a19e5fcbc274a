#!/usr/bin/env bash
# The reference runs for a change that must not change behaviour: the demo, the
# MovieLens commands and a `ray job submit` pipeline, each bounded by epochs (no
# time budget cuts a run short on a busy machine), with a seeded shuffle
# (train.shuffle_seed) and fixed nightly dates, written under OUT. Run it on the
# code before and after the change (and twice before, to see what two runs of the
# same code give), then compare:
#
#   bash jobs/reference_runs.sh runs/ref-a        # on the old code
#   bash jobs/reference_runs.sh runs/ref-b        # on the new code
#   python jobs/compare_runs.py runs/ref-a/ml runs/ref-b/ml    # and demo/, job/
#
# Env: VENV (.venv), MOVIELENS (../shared/data/ml-latest-small), PARTS (all of
# "ml demo job"). Takes about 25 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:?usage: reference_runs.sh OUT}")
VENV=$(realpath "${VENV:-.venv}")
MOVIELENS=$(realpath -m "${MOVIELENS:-../shared/data/ml-latest-small}")
PARTS=${PARTS:-ml demo job}
R="$VENV/bin/rerank"
export RAY_USAGE_STATS_ENABLED=0
mkdir -p "$OUT"
log() { echo "reference_runs: $* ($(date -u +%H:%M:%S))"; }

if [[ " $PARTS " == *" ml "* ]]; then
  ML="$OUT/ml"
  log "MovieLens prepare"
  "$R" prepare --config cluster/configs/prepare-movielens.yaml \
    --set input.path="$MOVIELENS" --set output="$ML/prepared" >"$OUT/ml-prepare.log" 2>&1
  log "MovieLens train (1 frozen + 1 fine-tuning epoch)"
  "$R" train --config cluster/configs/train-movielens.yaml \
    --set prepared="$ML/prepared" --set output="$ML/model" \
    --set epochs=2 --set encoder_frozen_epochs=1 --set max_minutes=null \
    --set patience=5 --set shuffle_seed=1 >"$OUT/ml-train.log" 2>&1
  log "MovieLens nightly"
  "$R" nightly --set model="$ML/model" --set prepared="$ML/prepared" \
    --set output="$ML/topk" --date 2018-09-30 >"$OUT/ml-nightly.log" 2>&1
  log "MovieLens evaluate"
  "$R" evaluate --config cluster/configs/evaluate-movielens.yaml \
    --set prepared="$ML/prepared" --set output="$ML/evaluation" \
    --set models.reranker="$ML/model" --set "baselines=[popularity, item_knn, ease]" \
    >"$OUT/ml-evaluate.log" 2>&1
fi

if [[ " $PARTS " == *" demo "* ]]; then
  log "demo (50,000 events)"
  "$R" demo --workdir "$OUT/demo" --events 50000 --sasrec-epochs 5 \
    --set train.max_minutes=null --set train.shuffle_seed=1 \
    --set evaluate.sasrec_max_minutes=null --set nightly.date=2024-07-01 >"$OUT/demo.log" 2>&1
fi

if [[ " $PARTS " == *" job "* ]]; then
  log "pipeline through ray job submit (30,000 events)"
  VENV="$VENV" bash cluster/local-cluster.sh --config cluster/configs/pipeline-demo.yaml \
    --set workdir="$OUT/job" --set generate.num_events=30000 --set train.epochs=1 \
    --set train.max_minutes=null --set train.shuffle_seed=1 --set evaluate.sasrec_epochs=5 \
    --set evaluate.sasrec_max_minutes=null --set nightly.date=2024-07-01 >"$OUT/job.log" 2>&1
fi
log "done: $OUT"
