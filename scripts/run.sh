#!/usr/bin/env bash
# Installs Nurture and runs it on embedded defaults (PostgreSQL, Temporal dev server + UI,
# worker, API, local outbox, example journeys). Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/python -m devstack.run "$@"
