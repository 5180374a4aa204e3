#!/usr/bin/env bash
# Installs Nurture and runs the whole test suite: ruff, mypy, then pytest.
# DATABASE_URL (a server URL) makes the tests use that PostgreSQL, started if it is down;
# without it they start an embedded one. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy .
exec .venv/bin/pytest "$@"
