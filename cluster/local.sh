#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine: a head (no CPUs, like a cloud head node) and N
# worker nodes, each its own raylet with its own CPUs/GPUs. For trying multi-node searches and
# `raytl submit` without a cloud account. Token authentication is on; the dashboard (and the Jobs
# API) listen on 127.0.0.1 only.
#
#   cluster/local.sh up [WORKERS] [CPUS_PER_WORKER] [GPUS_PER_WORKER]   # default: 2 workers x 1 CPU
#   cluster/local.sh status
#   cluster/local.sh down
#
# Environment: RAYTL_LOCAL_CLUSTER (state folder: token, pids, logs; default ~/.raytl/local-cluster),
# GCS_PORT (default 6380), DASHBOARD_PORT (default 8265), RAY (the ray CLI; default: the one in
# .venv, else on PATH). `down` stops only the processes `up` started (never `ray stop`, which would
# end every Ray process on the machine), puts back Ray's current-cluster file as `up` found it and
# removes the worker nodes' temp folders.
set -euo pipefail

STATE=${RAYTL_LOCAL_CLUSTER:-$HOME/.raytl/local-cluster}
GCS_PORT=${GCS_PORT:-6380}
NODE_TMP=${TMPDIR:-/tmp}/raytl-local-$(id -u)  # short: Ray's socket paths must stay under 107 bytes
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
HERE=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${RAY:-}" ]; then
  if [ -x "$HERE/.venv/bin/ray" ]; then RAY=$HERE/.venv/bin/ray; else RAY=ray; fi
fi
PYTHON=$(dirname "$(command -v "$RAY")")/python
[ -x "$PYTHON" ] || PYTHON=python3

export PATH="$(dirname "$(command -v "$RAY")"):$PATH"  # jobs run the head's `python`
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$STATE/auth_token
export RAY_USAGE_STATS_ENABLED=0

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Start `ray start ... --block` as its own process group, so `down` can end exactly that node.
start_node() {  # name, then ray start arguments
  local name=$1; shift
  setsid "$RAY" start --block "$@" >"$STATE/$name.log" 2>&1 &
  echo $! >"$STATE/$name.pid"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# `ray start --head` writes Ray's current-cluster file (/tmp/ray/ray_current_cluster), which
# every plain `ray.init()` on the machine reads: `up` keeps what was there, `down` puts it back.
current_cluster() {  # save | restore
  "$PYTHON" - "$1" "$STATE/current_cluster" <<'EOF'
import shutil, sys
from pathlib import Path
from ray._private.utils import get_ray_address_file
action, saved = sys.argv[1], Path(sys.argv[2])
live, absent = Path(get_ray_address_file(None)), saved.with_suffix(".absent")
if action == "save":
    shutil.copy2(live, saved) if live.is_file() else absent.touch()
elif saved.is_file():
    shutil.copy2(saved, live)
    saved.unlink()
elif absent.exists():
    live.unlink(missing_ok=True)
    absent.unlink()
EOF
}

up() {
  local workers=${1:-2} cpus=${2:-1} gpus=${3:-0}
  mkdir -p "$STATE" && chmod 700 "$STATE"
  if alive "$STATE/head.pid"; then echo "already up (cluster/local.sh status)"; exit 1; fi
  current_cluster save
  if [ ! -s "$STATE/auth_token" ]; then  # 256 random bits, readable by this user only
    (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' >"$STATE/auth_token")
  fi
  start_node head --head --port="$GCS_PORT" --num-cpus=0 --num-gpus=0 \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true
  for _ in $(seq 60); do
    "$RAY" status --address "127.0.0.1:$GCS_PORT" >/dev/null 2>&1 && break
    alive "$STATE/head.pid" || { echo "the head failed to start:"; tail -20 "$STATE/head.log"; exit 1; }
    sleep 1
  done
  for i in $(seq "$workers"); do
    # Each raylet on this machine needs its own agent ports, and its own temp dir: nodes sharing
    # one would share the runtime-env cache, and a worker node's clean-up would delete the job's
    # working directory under the head's running driver.
    start_node "worker$i" --address="127.0.0.1:$GCS_PORT" --num-cpus="$cpus" --num-gpus="$gpus" \
      --dashboard-agent-listen-port="$(free_port)" --metrics-export-port="$(free_port)" \
      --temp-dir="$NODE_TMP/w$i"
  done
  for _ in $(seq 60); do
    local nodes
    nodes=$("$PYTHON" - <<EOF 2>/dev/null || echo 0
import ray
ray.init(address="127.0.0.1:$GCS_PORT", logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
EOF
)
    [ "$nodes" = "$((workers + 1))" ] && break
    sleep 1
  done
  echo "up: a head and $workers worker node(s) x $cpus CPU, $gpus GPU; logs and token in $STATE"
  echo
  echo "  export RAY_AUTH_TOKEN_PATH=$STATE/auth_token"
  echo "  raytl search search_spaces/quickstart.yaml --address 127.0.0.1:$GCS_PORT"
  echo "  raytl submit search_spaces/quickstart.yaml --address http://127.0.0.1:$DASHBOARD_PORT"
  echo "  dashboard: http://127.0.0.1:$DASHBOARD_PORT"
}

status() {
  for pid in "$STATE"/*.pid; do
    [ -e "$pid" ] || { echo "down"; return 0; }
    if alive "$pid"; then echo "$(basename "$pid" .pid): running (pid $(cat "$pid"))"
    else echo "$(basename "$pid" .pid): not running"; fi
  done
  "$RAY" status --address "127.0.0.1:$GCS_PORT"
}

down() {
  local pid
  for file in "$STATE"/worker*.pid "$STATE"/head.pid; do
    [ -e "$file" ] || continue
    pid=$(cat "$file")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$file"
  done
  current_cluster restore
  rm -rf "$NODE_TMP"/w*  # the worker nodes' temp folders `up` made
  rmdir "$NODE_TMP" 2>/dev/null || true
  echo "down"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  status) status ;;
  down) down ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
