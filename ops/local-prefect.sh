#!/usr/bin/env bash
# A local Prefect server, the bucketchat-process work pool, every deployment in prefect.yaml and a
# process worker — started in the background with their logs and pids under $PREFECT_HOME/local/,
# or stopped again.
#
#   ops/local-prefect.sh up      # server on 127.0.0.1:$PORT (UI), pool, `prefect deploy --all`, worker
#   ops/local-prefect.sh down    # stop the worker and the server
#   ops/local-prefect.sh status
#
# Environment: PORT (default 4200), PREFECT_HOME (default .bucketchat/prefect in the project),
# BIN (default .venv/bin). Flow runs the worker starts inherit this environment, so export
# MLFLOW_TRACKING_URI / BUCKETCHAT_HOME before `up` to point them at another store or state folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PORT:-4200}"
BIN="${BIN:-.venv/bin}"
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.bucketchat/prefect}"
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true
# What `bucketchat` sets before Prefect starts (tasks/settings.py: apply_environment); flow runs the
# worker starts inherit it. No import sets these: a library that changed the environment on import
# would change it for whoever imported it.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false LANCEDB_LOG="${LANCEDB_LOG:-error}"
RUN="$PREFECT_HOME/local"
POOL=bucketchat-process
mkdir -p "$RUN"

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

stop() {
  if alive "$1"; then
    local pid; pid="$(cat "$RUN/$1.pid")"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "stopped $1 (pid $pid)"
  fi
  rm -f "$RUN/$1.pid"
}

case "${1:-}" in
  up)
    if alive server; then
      echo "server already running (pid $(cat "$RUN/server.pid")) at http://127.0.0.1:$PORT"
    else
      # setsid: the server gets its own process group, so `down` stops its children too.
      setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$RUN/server.log" 2>&1 &
      echo $! >"$RUN/server.pid"
      for i in $(seq 120); do
        "$BIN/python" -c "import urllib.request,sys; urllib.request.urlopen('$PREFECT_API_URL/health', timeout=1)" 2>/dev/null && break
        alive server || { echo "the Prefect server exited; see $RUN/server.log" >&2; tail -20 "$RUN/server.log" >&2; exit 1; }
        [ "$i" = 120 ] && { echo "the Prefect server did not answer on port $PORT within 60 s; see $RUN/server.log" >&2; exit 1; }
        sleep 0.5
      done
      echo "server: http://127.0.0.1:$PORT (log $RUN/server.log)"
    fi
    "$BIN/prefect" work-pool inspect "$POOL" >/dev/null 2>&1 || "$BIN/prefect" work-pool create "$POOL" --type process >/dev/null
    echo "work pool: $POOL"
    "$BIN/prefect" --no-prompt deploy --all >"$RUN/deploy.log" 2>&1 || { cat "$RUN/deploy.log" >&2; exit 1; }
    echo "deployed: $(grep -o "Deployment '[^']*'" "$RUN/deploy.log" | sort -u | tr '\n' ' ')"
    if [ "${NO_WORKER:-0}" = 1 ]; then
      echo "worker: not started (NO_WORKER=1)"
    elif alive worker; then
      echo "worker already running (pid $(cat "$RUN/worker.pid"))"
    else
      setsid "$BIN/prefect" worker start --pool "$POOL" >"$RUN/worker.log" 2>&1 &
      echo $! >"$RUN/worker.pid"
      echo "worker: pid $(cat "$RUN/worker.pid") (log $RUN/worker.log)"
    fi
    echo "export PREFECT_API_URL=$PREFECT_API_URL   # then: $BIN/prefect deployment run 'pipeline/pipeline'"
    ;;
  down)
    stop worker
    stop server
    ;;
  status)
    for p in server worker; do
      if alive "$p"; then echo "$p: running (pid $(cat "$RUN/$p.pid"))"; else echo "$p: stopped"; fi
    done
    ;;
  *)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
