#!/usr/bin/env bash
# The default federation (4 clients, 5 rounds, seed 0), one real simulation per method offered in
# rounds; resumable (a finished run is skipped). Results: benchmarks/results/round_methods.md.
#   bash benchmarks/round_methods.sh [OUT_ROOT]     (default /tmp/rounds)
set -u
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
ROOT="${1:-/tmp/rounds}"
mkdir -p "$ROOT"
for spec in "robustmerge-exact|merge-method='robustmerge' merge-mode='paper-exact'" \
            "svd|merge-method='svd'" \
            "exact-mean|merge-method='exact-mean'" \
            "robustmerge-equation|merge-method='robustmerge' merge-mode='paper-equation'" \
            "dare|merge-method='dare'" \
            "fedavg|merge-method='fedavg'"; do
  name=${spec%%|*}; cfg=${spec#*|}
  out="$ROOT/$name"
  if [ -f "$out/final/run_report.json" ]; then echo "skip $name"; continue; fi
  start=$(date +%s)
  FLWR_HOME="$ROOT/flwr-home" FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=39291 FLWR_LOCAL_CONTROL_API_PORT=39293 \
    bash scripts/run_simulation.sh -c "$cfg output-dir='$out'" > "$ROOT/$name.log" 2>&1
  echo "$name rc=$? seconds=$(( $(date +%s) - start ))" >> "$ROOT/status.txt"
done
python - "$ROOT" <<'PY'
import json, sys
root = sys.argv[1]
for name in ["robustmerge-exact", "robustmerge-equation", "svd", "exact-mean", "dare", "fedavg"]:
    try:
        rounds = json.load(open(f"{root}/{name}/metrics.json"))["rounds"]
    except FileNotFoundError:
        continue
    seen = " ".join(f"{e['server-eval']['seen-accuracy'] * 100:.1f}" for e in rounds)
    unseen = " ".join(f"{e['server-eval']['unseen-accuracy'] * 100:.1f}" for e in rounds)
    print(f"| {name} | {seen} | {unseen} |")
PY
