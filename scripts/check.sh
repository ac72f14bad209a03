#!/usr/bin/env bash
# One command for lint, format, types and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
mypy
python -m pytest "$@"
