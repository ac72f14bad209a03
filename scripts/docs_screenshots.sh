#!/usr/bin/env bash
# Regenerates the screenshots of docs/tracking.md ("Watch and compare runs") from real runs:
#
#   bash scripts/docs_screenshots.sh
#
# 1. Four short simulations (scripts/run_simulation.sh, 2 simulated sites, 3 rounds, a tiny
#    slice of the data): merge-method fedavg and robustmerge, once with tracking='tensorboard'
#    and once with tracking='mlflow' logging to one local `mlflow server`.
# 2. `tensorboard` and that `mlflow server`, both on 127.0.0.1 only, started and stopped here.
# 3. Headless Chromium takes the pictures, written to docs/images/:
#      tracking-tensorboard.png       TensorBoard, Scalars: eval/*accuracy of both runs
#      tracking-mlflow-runs.png       MLflow, the experiment robustmerge-fl listing both runs
#      tracking-mlflow-compare.png    MLflow, Compare runs: the two runs side by side
#      tracking-mlflow-metric.png     MLflow, the metric plot: seen/unseen accuracy of both runs
#
# Needs: Debian's chromium (apt-get install -y chromium; set CHROMIUM to use another binary) and
# the tracking extra (pip install -e '.[tracking]', or bash scripts/setup.sh). Everything stays
# on the loopback interface: both servers listen on 127.0.0.1 only; Chromium's background
# networking is off, every host name but 127.0.0.1 fails to resolve and anything not on the
# loopback goes to a proxy port nobody listens on; MLflow's telemetry is off.
#
# Environment: SHOTS_RUNS (folder for the runs; default a new temp folder, kept and printed at
# the end; a run whose metrics.json is already there is not run again), SHOTS_OUT (default
# docs/images), CHROMIUM (default /usr/bin/chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
OUT="${SHOTS_OUT:-$PWD/docs/images}"
RUNS="${SHOTS_RUNS:-$(mktemp -d /tmp/docs-screenshots.XXXXXX)}"
TINY="num-server-rounds=3 train-examples=32 eval-examples=32 max-length=32 \
seen-tasks='banking77,sentiment' unseen-tasks='mcid'"
METHODS=(fedavg robustmerge)

if [ ! -x "$CHROMIUM" ]; then
  echo "docs_screenshots.sh: error: no Chromium at $CHROMIUM; install Debian's: apt-get install -y chromium" >&2
  exit 2
fi
if ! python -c 'import tensorboard, mlflow' 2>/dev/null; then
  echo "docs_screenshots.sh: error: tensorboard/mlflow missing; install the tracking extra: pip install -e '.[tracking]'" >&2
  exit 2
fi
mkdir -p "$OUT" "$RUNS"
# No usage reports from MLflow (server, client or UI): nothing is to leave this machine.
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
RUNS="$(cd "$RUNS" && pwd)"

free_port() {
  python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Servers run in their own process group (setsid), so stopping one stops its workers too.
SERVER_PIDS=()
stop_servers() {
  local pid
  for pid in "${SERVER_PIDS[@]}"; do
    kill -- -"$pid" 2>/dev/null || true
  done
  for pid in "${SERVER_PIDS[@]}"; do
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -9 -- -"$pid" 2>/dev/null || true
  done
  SERVER_PIDS=()
}
trap stop_servers EXIT
trap 'exit 130' INT TERM

wait_http() {  # wait_http URL SECONDS: until URL answers 200
  local url="$1" deadline=$((SECONDS + $2))
  until python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$url" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "docs_screenshots.sh: error: $url did not answer within $2 s" >&2
      return 1
    fi
    sleep 1
  done
}

# --- 1. The MLflow server the mlflow runs log to (and the UI pictured below) -----------------
mkdir -p "$RUNS/mlflow-server"
MLFLOW_PORT="$(free_port)"
MLFLOW_URI="http://127.0.0.1:$MLFLOW_PORT"
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" \
  --backend-store-uri "sqlite:///$RUNS/mlflow-server/mlflow.db" \
  --artifacts-destination "$RUNS/mlflow-server/artifacts" --workers 1 \
  >"$RUNS/mlflow-server/server.log" 2>&1 &
SERVER_PIDS+=($!)
wait_http "$MLFLOW_URI/health" 300

# --- 2. The runs -----------------------------------------------------------------------------
run() {  # run BACKEND METHOD
  local backend="$1" method="$2" dir="$RUNS/$1/$2" extra=""
  if [ -f "$dir/metrics.json" ]; then
    echo "docs_screenshots.sh: $dir already ran; kept"
    return 0
  fi
  [ "$backend" = mlflow ] && extra="tracking-uri='$MLFLOW_URI'"
  echo "docs_screenshots.sh: running $backend / $method into $dir"
  FLWR_HOME="$RUNS/flwr-home" NUM_SUPERNODES=2 \
    FLWR_LOCAL_SUPERLINK_HTTP_API_PORT="$(free_port)" FLWR_LOCAL_CONTROL_API_PORT="$(free_port)" \
    bash scripts/run_simulation.sh -c "$TINY merge-method='$method' tracking='$backend' \
output-dir='$dir' $extra" >"$RUNS/$backend-$method.log" 2>&1 || {
    tail -n 40 "$RUNS/$backend-$method.log" >&2
    return 1
  }
}
for method in "${METHODS[@]}"; do
  run tensorboard "$method"
  run mlflow "$method"
done

# --- 3. TensorBoard over both tensorboard runs -------------------------------------------------
TB_PORT="$(free_port)"
setsid tensorboard --logdir "$RUNS/tensorboard" --host 127.0.0.1 --port "$TB_PORT" \
  >"$RUNS/tensorboard.log" 2>&1 &
SERVER_PIDS+=($!)
wait_http "http://127.0.0.1:$TB_PORT/data/runs" 180

# --- 4. The pictures -------------------------------------------------------------------------
shot() {  # shot FILE URL WIDTH,HEIGHT [KEEP_WIDTH [KEEP_HEIGHT]]: a screenshot of the window,
  #                                        cropped to its top-left KEEP_WIDTH x KEEP_HEIGHT
  local file="$1" url="$2" size="$3" profile
  profile="$(mktemp -d)"
  timeout 180 "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --disable-default-apps --disable-extensions --hide-scrollbars \
    --proxy-server=http://127.0.0.1:9 --host-resolver-rules='MAP * ~NOTFOUND, EXCLUDE 127.0.0.1' \
    --user-data-dir="$profile" --window-size="$size" --screenshot="$file" \
    --virtual-time-budget=15000 "$url" >"$RUNS/chromium.log" 2>&1 || true
  rm -rf "$profile"
  if [ ! -s "$file" ]; then
    echo "docs_screenshots.sh: error: Chromium wrote no $file; see $RUNS/chromium.log" >&2
    return 1
  fi
  python - "$file" "${4:-0}" "${5:-0}" <<'PY'
import sys
from PIL import Image
path, width, height = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
image = Image.open(path).convert("RGB")
image = image.crop((0, 0, width or image.width, height or image.height))
image.save(path, optimize=True)
PY
  echo "docs_screenshots.sh: wrote $file"
}

# The MLflow UI's URLs, built as its own links build them: the experiment's run list, Compare
# runs, and the metric plot of both runs.
mapfile -t MLFLOW_URLS < <(MLFLOW_TRACKING_URI="$MLFLOW_URI" python - "$MLFLOW_URI" <<'PY'
import json
import sys
from urllib.parse import quote

from mlflow import MlflowClient

base = sys.argv[1]
client = MlflowClient()
experiment = client.get_experiment_by_name("robustmerge-fl")
runs = client.search_runs([experiment.experiment_id], order_by=["attributes.run_name ASC"])
ids = json.dumps([run.info.run_id for run in runs])
experiments = json.dumps([experiment.experiment_id])
keys = ["eval/seen-accuracy", "eval/unseen-accuracy"]
print(f"{base}/#/experiments/{experiment.experiment_id}/runs")
print(f"{base}/#/compare-runs?runs={ids}&experiments={experiments}")
print(
    f"{base}/#/metric?runs={ids}&metric={quote(json.dumps(keys[0]))}&experiments={experiments}"
    f"&plot_metric_keys={quote(json.dumps(keys))}&plot_layout={{}}&x_axis=step"
    "&y_axis_scale=linear&line_smoothness=1&show_point=true&deselected_curves=[]"
    "&last_linear_y_axis_range=[]"
)
PY
)

# TensorBoard's Scalars tab, filtered to the accuracy tags. MLflow 3.17's UI opens with its
# assistant panel (an empty chat) on the right of a 1700-pixel window from x = 1262 on; the crop
# leaves it out (another MLflow version may need another width: look at the pictures).
shot "$OUT/tracking-tensorboard.png" \
  "http://127.0.0.1:$TB_PORT/#scalars&tagFilter=eval%2F.*accuracy&_smoothingWeight=0" 1400,1000
shot "$OUT/tracking-mlflow-runs.png" "${MLFLOW_URLS[0]}" 1700,700 1262
shot "$OUT/tracking-mlflow-compare.png" "${MLFLOW_URLS[1]}" 1700,2600 1262 2320
shot "$OUT/tracking-mlflow-metric.png" "${MLFLOW_URLS[2]}" 1700,1000 1262 880

echo "docs_screenshots.sh: runs kept in $RUNS"
