#!/usr/bin/env bash
# A Ray cluster on 127.0.0.1 and the pipeline submitted to it with
# `ray job submit --working-dir .`, exactly as on a cluster; then the cluster is
# stopped and the job's final status printed.
#
#   cluster/local-cluster.sh                           # one node, cluster/configs/pipeline-demo.yaml
#   cluster/local-cluster.sh --two-nodes --s3          # a team's cluster shape (below)
#   cluster/local-cluster.sh --config my.yaml --set train.max_minutes=2
#   make cluster-local ARGS="--two-nodes --s3"
#
# --two-nodes: a head that offers no CPUs (it runs the GCS, the dashboard, the job
#   driver, Serve's controller and proxy) and a worker node with the CPUs, in its
#   own temp dir, so Ray Train workers, Ray Data tasks, nightly actors and Serve
#   replicas run there, in processes with their own working directories.
# --s3: every path on an S3-compatible store: the one AWS_ENDPOINT_URL names (with
#   the AWS_* keys of this environment), else an S3 server (moto) started on
#   127.0.0.1 with dummy keys; a bucket (BUCKET, default a new one) is created. The
#   nodes inherit the settings, as a cluster's nodes get them from their instance
#   or pod role; the pipeline's workdir is s3://<bucket>/pipeline unless
#   --set workdir=... names another.
# Other arguments go to jobs/pipeline.py. The job runs in a copy of the working
# dir, so local paths must be absolute: the default workdir is
# $PWD/runs/cluster-local. Exit code: the job's (0 = SUCCEEDED).
#
# For scripts and tests, the same cluster in steps (state in $CLUSTER_DIR):
#   cluster/local-cluster.sh up [--two-nodes] [--s3]   # prints the settings (KEY=value lines)
#   cluster/local-cluster.sh kill-worker | start-worker | down
#
# Env: VENV (.venv), GCS_PORT (6390), DASHBOARD_PORT (8266), PORT_BASE (23000: the
# nodes' other ports, PORT_BASE..+9 the head's, +10..+19 the worker's, worker
# processes in +100..+299 and +300..+499), S3_PORT (PORT_BASE+5), NUM_CPUS (all
# on the worker or the one node), HEAD_OBJECT_STORE_MB (256), WORKER_OBJECT_STORE_MB
# (1024), RUNTIME_ENV (a runtime_env YAML; default: ship the working dir and use
# the packages of $VENV, which the nodes run on).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
export PATH="$VENV/bin:$PATH"
GCS_PORT=${GCS_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8266}
PORT_BASE=${PORT_BASE:-23000}
S3_PORT=${S3_PORT:-$((PORT_BASE + 5))}
HEAD_OBJECT_STORE_MB=${HEAD_OBJECT_STORE_MB:-256}
WORKER_OBJECT_STORE_MB=${WORKER_OBJECT_STORE_MB:-1024}
ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"
log() { echo "local-cluster: $*" >&2; }

wait_for() {  # wait_for SECONDS PID WHAT COMMAND...: until COMMAND succeeds
  local seconds=$1 pid=$2 what=$3
  shift 3
  for _ in $(seq "$seconds"); do
    "$@" >/dev/null 2>&1 && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$what did not start; its log:"
      cat "$CLUSTER_DIR/$what.log" >&2
      return 3
    fi
    sleep 1
  done
  log "$what did not come up in $seconds s"
  return 3
}

start_head() {
  local cpus=()
  if [ "$TWO_NODES" = 1 ]; then cpus=(--num-cpus=0); elif [ -n "${NUM_CPUS:-}" ]; then cpus=(--num-cpus="$NUM_CPUS"); fi
  setsid ray start --head --block --disable-usage-stats \
    --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port=$((GCS_PORT + 1)) \
    --dashboard-agent-listen-port=$((DASHBOARD_PORT + 1)) \
    --node-manager-port="$PORT_BASE" --object-manager-port=$((PORT_BASE + 1)) \
    --dashboard-agent-grpc-port=$((PORT_BASE + 2)) --metrics-export-port=$((PORT_BASE + 3)) \
    --runtime-env-agent-port=$((PORT_BASE + 4)) \
    --min-worker-port=$((PORT_BASE + 100)) --max-worker-port=$((PORT_BASE + 299)) \
    --object-store-memory=$((HEAD_OBJECT_STORE_MB << 20)) \
    "${cpus[@]}" --temp-dir="$CLUSTER_DIR/head" >"$CLUSTER_DIR/head.log" 2>&1 &
  echo $! >"$CLUSTER_DIR/head.pid"
  wait_for 120 "$(cat "$CLUSTER_DIR/head.pid")" head api /api/jobs/ || return 3
  log "Ray head up at $ADDRESS (GCS 127.0.0.1:$GCS_PORT)"
}

start_worker() {
  # setsid: the node's raylet and its worker processes share one process group,
  # which kill-worker ends at once, as a machine failure would.
  setsid ray start --block --disable-usage-stats --address="127.0.0.1:$GCS_PORT" \
    --node-ip-address=127.0.0.1 \
    --node-manager-port=$((PORT_BASE + 10)) --object-manager-port=$((PORT_BASE + 11)) \
    --dashboard-agent-grpc-port=$((PORT_BASE + 12)) --metrics-export-port=$((PORT_BASE + 13)) \
    --runtime-env-agent-port=$((PORT_BASE + 14)) \
    --dashboard-agent-listen-port=$((PORT_BASE + 15)) \
    --min-worker-port=$((PORT_BASE + 300)) --max-worker-port=$((PORT_BASE + 499)) \
    --object-store-memory=$((WORKER_OBJECT_STORE_MB << 20)) \
    ${NUM_CPUS:+--num-cpus="$NUM_CPUS"} --resources='{"worker": 1}' \
    --temp-dir="$CLUSTER_DIR/worker" >>"$CLUSTER_DIR/worker.log" 2>&1 &
  echo $! >"$CLUSTER_DIR/worker.pid"
  wait_for 120 "$(cat "$CLUSTER_DIR/worker.pid")" worker worker_alive || return 3
  log "worker node up (temp dir $CLUSTER_DIR/worker)"
}

# The dashboard's REST API with the cluster's token, for the polls here: `ray job list`
# or `ray list nodes` would start a Python that imports Ray (about 2 s of CPU) each time.
api() {  # api PATH: print the JSON body of GET PATH; fails until the dashboard answers
  python - "$ADDRESS$1" <<'EOF'
import os, sys, urllib.request

req = urllib.request.Request(sys.argv[1])
token = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
if os.path.exists(token):
    req.add_header("Authorization", "Bearer " + open(token).read().strip())
sys.stdout.write(urllib.request.urlopen(req, timeout=10).read().decode())
EOF
}

worker_alive() {
  api "/api/v0/nodes?limit=1000&detail=true" | python -c "
import json, sys
nodes = json.load(sys.stdin)['data']['result']['result']
sys.exit(not any(n['state'] == 'ALIVE' and 'worker' in n['resources_total'] for n in nodes))"
}

kill_group() {  # kill_group PIDFILE: SIGKILL the process group that PIDFILE's process leads
  local f=$1
  [ -f "$f" ] || return 0
  kill -9 -- "-$(cat "$f")" 2>/dev/null
  rm -f "$f"
}

start_s3() {
  if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
    log "S3: the store at AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL, with the keys of this environment"
  else
    setsid moto_server -H 127.0.0.1 -p "$S3_PORT" >"$CLUSTER_DIR/s3.log" 2>&1 &
    echo $! >"$CLUSTER_DIR/s3.pid"
    export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
    export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
  fi
  BUCKET=${BUCKET:-rerank-$(date -u +%Y%m%d%H%M%S)-$$}
  local pid
  pid=$(cat "$CLUSTER_DIR/s3.pid" 2>/dev/null || echo $$)
  wait_for 60 "$pid" s3 python -c "
import boto3, botocore.exceptions as e
try:
    boto3.client('s3').create_bucket(Bucket='$BUCKET')
except e.ClientError as x:
    if x.response['Error']['Code'] not in ('BucketAlreadyOwnedByYou', 'BucketAlreadyExists'):
        raise" || return 3
  log "S3 at $AWS_ENDPOINT_URL, bucket s3://$BUCKET"
}

settings() {
  echo "RAY_ADDRESS=127.0.0.1:$GCS_PORT"  # for ray.init and the ray CLI (ray job, serve)
  echo "DASHBOARD_URL=$ADDRESS"
  echo "CLUSTER_DIR=$CLUSTER_DIR"
  if [ "$S3" = 1 ]; then
    echo "AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL"
    echo "BUCKET=$BUCKET"
    if [ -f "$CLUSTER_DIR/s3.pid" ]; then  # the dummy keys of our own moto, not a user's
      echo "AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID"
      echo "AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY"
    fi
  fi
}

up() {
  mkdir -p "$CLUSTER_DIR"
  # Every process of the cluster (Ray Train's controller looks itself up) finds this
  # cluster, not another one on the machine.
  export RAY_ADDRESS="127.0.0.1:$GCS_PORT"
  # A token of this cluster only, for the nodes and for `ray job` (Ray's token auth).
  (umask 077 && python -c "import secrets; print(secrets.token_hex(32))" >"$RAY_AUTH_TOKEN_PATH")
  if [ "$S3" = 1 ]; then start_s3 || return 3; fi
  start_head || return 3
  if [ "$TWO_NODES" = 1 ]; then start_worker || return 3; fi
  settings >"$CLUSTER_DIR/settings.env"
  echo "TWO_NODES=$TWO_NODES" >>"$CLUSTER_DIR/settings.env"
  echo "S3=$S3" >>"$CLUSTER_DIR/settings.env"
}

down() {
  kill_group "$CLUSTER_DIR/worker.pid"
  if [ -f "$CLUSTER_DIR/head.pid" ]; then
    local pid
    pid=$(cat "$CLUSTER_DIR/head.pid")
    kill -- "-$pid" 2>/dev/null
    for _ in $(seq 10); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill_group "$CLUSTER_DIR/head.pid"
  fi
  kill_group "$CLUSTER_DIR/s3.pid"
  log "Ray head stopped"
}

TWO_NODES=0
S3=0
COMMAND=run
case "${1:-}" in up | down | kill-worker | start-worker) COMMAND=$1; shift ;; esac
ARGS=()
for a in "$@"; do
  case "$a" in
    --two-nodes) TWO_NODES=1 ;;
    --s3) S3=1 ;;
    *) ARGS+=("$a") ;;
  esac
done

if [ "$COMMAND" != run ]; then
  CLUSTER_DIR=${CLUSTER_DIR:?set CLUSTER_DIR to a folder for the state and logs of the cluster}
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$CLUSTER_DIR/auth_token"
  if [ "$COMMAND" != up ] && [ -f "$CLUSTER_DIR/settings.env" ]; then
    set -a
    # shellcheck disable=SC1091
    . "$CLUSTER_DIR/settings.env"
    set +a
  fi
  case "$COMMAND" in
    up) up || { down; exit 3; }; settings ;;
    down) down ;;
    kill-worker)
      kill_group "$CLUSTER_DIR/worker.pid"
      # Until the GCS has marked it dead (its health checks), the node still counts.
      for _ in $(seq 90); do worker_alive || break; sleep 1; done
      log "worker node killed" ;;
    start-worker) start_worker || exit 3 ;;
  esac
  exit 0
fi

CLUSTER_DIR=$(mktemp -d "${TMPDIR:-/tmp}/rerank-ray.XXXXXX")
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$CLUSTER_DIR/auth_token"
cleanup() {
  down
  rm -rf "$CLUSTER_DIR"
}
trap cleanup EXIT
up || exit 3

if [ ${#ARGS[@]} -eq 0 ]; then
  ARGS=(--config cluster/configs/pipeline-demo.yaml)
  if [ "$S3" = 1 ]; then ARGS+=(--set "workdir=s3://$BUCKET/pipeline"); else ARGS+=(--set "workdir=$PWD/runs/cluster-local"); fi
elif [ "$S3" = 1 ] && [[ " ${ARGS[*]} " != *" workdir="* ]]; then
  ARGS+=(--set "workdir=s3://$BUCKET/pipeline")
fi

if [ -n "${RUNTIME_ENV:-}" ]; then
  ENV_ARGS=(--runtime-env "$RUNTIME_ENV" --working-dir .)
else
  ENV_ARGS=(--working-dir . --runtime-env-json
    '{"excludes": [".git/", ".venv/", "runs/", "notebooks/", ".pytest_cache/", "**/__pycache__/"]}')
fi
JOB="pipeline-$(date -u +%Y%m%dT%H%M%S)-$$"
ray job submit --address "$ADDRESS" --submission-id "$JOB" "${ENV_ARGS[@]}" \
  -- python jobs/pipeline.py "${ARGS[@]}"
rc=$?
python - "$ADDRESS" "$JOB" <<'EOF'
import sys
from ray.job_submission import JobSubmissionClient

info = JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2])
print(f"local-cluster: job {sys.argv[2]} {info.status.value}: {info.message}")
EOF
[ "$S3" = 1 ] && log "outputs under s3://$BUCKET (gone with the S3 server)"
exit $rc
