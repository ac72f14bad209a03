#!/usr/bin/env bash
# Runs the default federation with Flower's simulation engine, offline, and cleans up after itself.
#
#   bash scripts/run_simulation.sh [extra flwr run arguments, e.g. -c 'num-server-rounds=2']
#
# - FLWR_HOME is a private folder (.flwr-home/) holding a config.toml whose "local" SuperLink
#   connection starts a local simulation SuperLink; ~/.flwr is never touched. NUM_SUPERNODES
#   clients are simulated (default 4), each with CLIENT_CPUS cores (default 1).
# - FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1: the app runs in this venv (no `uv sync`,
#   which would pull GBs of CUDA wheels).
# - The local SuperLink that `flwr run` starts in the background is stopped by its pid on exit.
# Outputs land in ~/robustmerge-fl/<output-dir> (override the root with ROBUSTMERGE_FL_OUTPUT_ROOT).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi

export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr-home}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT="${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39191}"
export FLWR_LOCAL_CONTROL_API_PORT="${FLWR_LOCAL_CONTROL_API_PORT:-39193}"
NUM_SUPERNODES="${NUM_SUPERNODES:-4}"
CLIENT_CPUS="${CLIENT_CPUS:-1}"

mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local"

[superlink.local]
address = ":local:"
TOML

superlink_pids() {
  pgrep -f -- "flower-superlink.*--control-api-address 127.0.0.1:${FLWR_LOCAL_CONTROL_API_PORT}" || true
}
stop_superlink() {
  local pids
  pids=$(superlink_pids)
  if [ -n "$pids" ]; then
    kill $pids 2>/dev/null || true
    for _ in $(seq 1 50); do
      [ -z "$(superlink_pids)" ] && return 0
      sleep 0.2
    done
    kill -9 $pids 2>/dev/null || true
  fi
}
# A SuperLink left from an earlier run keeps its old environment: start from a fresh one.
stop_superlink
trap stop_superlink EXIT

flwr run . local --stream \
  --federation-config "num-supernodes=$NUM_SUPERNODES client-resources-num-cpus=$CLIENT_CPUS" "$@"
