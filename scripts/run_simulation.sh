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
# - Every -c/--run-config key and value is checked against the app's run-config schema first
#   (server/run_config_check.py): an unknown key or a bad value stops here, exit status 2, one line.
# - The exit status is the run's: `flwr run --stream` exits 0 however the run ended, so its final
#   status is read back with `flwr ls --run-id`; anything but finished:completed prints one line
#   (the run id, its status and Flower's status details, e.g. the ServerApp's error) and exits 1.
# Outputs land in ~/robustmerge-fl/<output-dir> (override the root with ROBUSTMERGE_FL_OUTPUT_ROOT).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi

# Refuse an unknown run-config key or a bad value before Flower starts (exit status 2).
python -m server.run_config_check "$@"

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
started="$(mktemp)"
trap 'stop_superlink; rm -f "$started"' EXIT

# stdout through tee (unbuffered, so the log still streams) to learn the run id.
PYTHONUNBUFFERED=1 flwr run . local --stream \
  --federation-config "num-supernodes=$NUM_SUPERNODES client-resources-num-cpus=$CLIENT_CPUS" "$@" \
  | tee "$started"
run_id="$(sed -n -e 's/.*Successfully started run \([0-9][0-9]*\).*/\1/p' \
  -e 's/.*"run-id": "\([0-9][0-9]*\)".*/\1/p' "$started" | head -n 1)"
if [ -z "$run_id" ]; then
  echo "run_simulation.sh: error: flwr run printed no run id; the run did not start" >&2
  exit 1
fi

# The run's final status (finished:completed, finished:failed, finished:stopped) and details.
# The stream ends when the run does; the status is polled briefly in case it lags.
read_status() {
  flwr ls local --run-id "$run_id" --format json | python -c '
import json, sys
run = json.load(sys.stdin)["runs"][0]
print(run["status"], " ".join(str(run["status-details"]).split()), sep="\t")'
}
for _ in $(seq 1 30); do
  IFS=$'\t' read -r status details < <(read_status) || true
  case "${status:-}" in finished:*) break ;; esac
  sleep 1
done
if [ "${status:-}" != "finished:completed" ]; then
  echo "run_simulation.sh: error: run $run_id ended ${status:-with an unknown status}: ${details:-no details}" >&2
  exit 1
fi
