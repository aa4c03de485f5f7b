#!/usr/bin/env bash
# The local stack, embedded by default: Prefect server (SQLite), the process serving `fedlease/full`,
# and an MLflow tracking server (SQLite). Bound to 127.0.0.1, stored under infra/state/. Idempotent.
#   infra/stack.sh up | down | status
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE="${FEDLEASE_STATE_DIR:-$ROOT/infra/state}"
BIN="$ROOT/.venv/bin"
HOST="${FEDLEASE_BIND_HOST:-127.0.0.1}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
export PREFECT_HOME="$STATE/prefect"
export PREFECT_API_URL="${PREFECT_API_URL:-http://$HOST:$PREFECT_PORT/api}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_RUNNER_POLL_FREQUENCY=2 PREFECT_UI_ENABLED=true
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-http://$HOST:$MLFLOW_PORT}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true PYTHONWARNINGS=ignore
mkdir -p "$STATE/logs" "$PREFECT_HOME"

alive() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }
http_ok() { curl -sf -m 3 "$1" >/dev/null 2>&1; }
wait_for() {  # name url seconds
  for _ in $(seq 1 "$3"); do http_ok "$2" && return 0; alive "$1" || { echo "$1 exited; see $STATE/logs/$1.log"; return 1; }; sleep 1; done
  echo "$1 did not answer at $2 within $3 s; see $STATE/logs/$1.log"; return 1
}
start() {  # name cmd...
  local name=$1; shift
  if alive "$name"; then echo "$name: already running (pid $(cat "$STATE/$name.pid"))"; return 0; fi
  # exec: the recorded pid is the service itself, a session leader whose group `stop` can signal;
  # no inherited stdout, so the caller (make, CI) is not held open by the service
  (cd "$ROOT" && exec setsid "$@" </dev/null >"$STATE/logs/$name.log" 2>&1) &
  echo $! >"$STATE/$name.pid"
}
stop() {
  local name=$1
  if alive "$name"; then
    local pid; pid=$(cat "$STATE/$name.pid")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "$name: stopped"
  fi
  rm -f "$STATE/$name.pid"
}

case "${1:-status}" in
  up)
    if [[ "$PREFECT_API_URL" == "http://$HOST:$PREFECT_PORT/api" ]]; then
      start prefect-server "$BIN/prefect" server start --host "$HOST" --port "$PREFECT_PORT"
      wait_for prefect-server "$PREFECT_API_URL/health" 120 || exit 1
    else echo "prefect: using team server $PREFECT_API_URL"; fi
    if [[ "$MLFLOW_TRACKING_URI" == "http://$HOST:$MLFLOW_PORT" ]]; then
      start mlflow-server "$BIN/mlflow" server --host "$HOST" --port "$MLFLOW_PORT" \
        --backend-store-uri "sqlite:///$STATE/mlflow.db" --artifacts-destination "$STATE/mlartifacts" --workers 1
      wait_for mlflow-server "$MLFLOW_TRACKING_URI/health" 120 || exit 1
    else echo "mlflow: using team server $MLFLOW_TRACKING_URI"; fi
    start serve "$BIN/python" -m flows.serve
    for _ in $(seq 1 60); do
      "$BIN/prefect" deployment inspect fedlease/full >/dev/null 2>&1 && break
      alive serve || { echo "serve exited; see $STATE/logs/serve.log"; exit 1; }; sleep 1
    done
    "$BIN/prefect" deployment inspect fedlease/full >/dev/null 2>&1 || { echo "deployment fedlease/full not registered; see $STATE/logs/serve.log"; exit 1; }
    echo "stack up: Prefect UI http://$HOST:$PREFECT_PORT  MLflow UI ${MLFLOW_TRACKING_URI}  deployment fedlease/full"
    ;;
  down)
    stop serve; stop mlflow-server; stop prefect-server ;;
  status)
    for n in prefect-server mlflow-server serve; do
      if alive "$n"; then echo "$n: running (pid $(cat "$STATE/$n.pid"))"; else echo "$n: stopped"; fi
    done
    http_ok "$PREFECT_API_URL/health" && echo "prefect api: ok ($PREFECT_API_URL)" || echo "prefect api: not answering ($PREFECT_API_URL)"
    http_ok "$MLFLOW_TRACKING_URI/health" && echo "mlflow: ok ($MLFLOW_TRACKING_URI)" || echo "mlflow: not answering ($MLFLOW_TRACKING_URI)"
    ;;
  env)  # print the variables a shell needs to talk to the stack
    echo "export PREFECT_HOME='$PREFECT_HOME' PREFECT_API_URL='$PREFECT_API_URL' MLFLOW_TRACKING_URI='$MLFLOW_TRACKING_URI'" ;;
  *) echo "usage: $0 up|down|status|env"; exit 2 ;;
esac
