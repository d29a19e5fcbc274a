#!/usr/bin/env bash
# Local cluster parity: start a Ray head on 127.0.0.1, submit the pipeline as a
# Ray job exactly as on a cluster (`ray job submit --working-dir .`), wait for
# it, print its final status, and stop the head.
#
#   cluster/local-cluster.sh                                   # cluster/configs/pipeline-demo.yaml
#   cluster/local-cluster.sh --config my.yaml --set train.max_minutes=2
#   make cluster-local ARGS="--set workdir=$PWD/runs/local"
#
# Arguments go to jobs/pipeline.py. The job runs in a copy of the working dir
# that is deleted with the cluster, so its paths must be absolute (or URIs): the
# default run writes to $PWD/runs/cluster-local. Exit code: the job's (0 = SUCCEEDED).
# Env: VENV (.venv), GCS_PORT (6390), DASHBOARD_PORT (8266), NUM_CPUS (all),
# RUNTIME_ENV (a runtime_env YAML; default: ship the working dir and use the
# packages of $VENV, which is what the head runs on).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
export PATH="$VENV/bin:$PATH"
GCS_PORT=${GCS_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8266}
ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"
if [ $# -eq 0 ]; then
  set -- --config cluster/configs/pipeline-demo.yaml --set "workdir=$PWD/runs/cluster-local"
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/rerank-ray.XXXXXX")
# A token of this cluster only, for the head and for `ray job` (Ray's token auth).
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TMP/auth_token"
(umask 077 && python -c "import secrets; print(secrets.token_hex(32))" >"$RAY_AUTH_TOKEN_PATH")

ray start --head --block --disable-usage-stats \
  --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
  --ray-client-server-port=$((GCS_PORT + 1)) \
  --dashboard-agent-listen-port=$((DASHBOARD_PORT + 1)) \
  ${NUM_CPUS:+--num-cpus="$NUM_CPUS"} --temp-dir="$TMP/ray" >"$TMP/head.log" 2>&1 &
HEAD=$!
stop_head() {
  kill "$HEAD" 2>/dev/null && wait "$HEAD" 2>/dev/null
  echo "local-cluster: Ray head stopped"
  rm -rf "$TMP"
}
trap stop_head EXIT

for _ in $(seq 120); do
  ray job list --address "$ADDRESS" >/dev/null 2>&1 && break
  if ! kill -0 "$HEAD" 2>/dev/null; then
    echo "local-cluster: the Ray head did not start:" >&2
    cat "$TMP/head.log" >&2
    exit 3
  fi
  sleep 1
done
echo "local-cluster: Ray head up at $ADDRESS (GCS 127.0.0.1:$GCS_PORT)"

if [ -n "${RUNTIME_ENV:-}" ]; then
  ENV_ARGS=(--runtime-env "$RUNTIME_ENV" --working-dir .)
else
  ENV_ARGS=(--working-dir . --runtime-env-json
    '{"excludes": [".git/", ".venv/", "runs/", "notebooks/", ".pytest_cache/", "**/__pycache__/"]}')
fi
JOB="pipeline-$(date -u +%Y%m%dT%H%M%S)-$$"
ray job submit --address "$ADDRESS" --submission-id "$JOB" "${ENV_ARGS[@]}" \
  -- python jobs/pipeline.py "$@"
rc=$?
python - "$ADDRESS" "$JOB" <<'EOF'
import sys
from ray.job_submission import JobSubmissionClient

info = JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2])
print(f"local-cluster: job {sys.argv[2]} {info.status.value}: {info.message}")
EOF
exit $rc
