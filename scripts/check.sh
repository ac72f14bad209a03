#!/usr/bin/env bash
# One command for lint, format, types, the docs build and the whole test suite (extra arguments go
# to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check .
ruff format --check .
mypy
# The layering contracts in pyproject.toml ([tool.importlinter]): no cycle or upward import.
lint-imports --no-cache
# The docs site: --strict fails on a broken link or anchor and on a page missing from the nav.
# Built into a temporary folder so the checkout stays clean.
docs_site="$(mktemp -d)"
trap 'rm -rf "$docs_site"' EXIT
NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --quiet --site-dir "$docs_site"
python -m pytest "$@"
