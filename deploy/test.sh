#!/usr/bin/env bash
# Create/update .venv, install minirl-async with the dev and hf extras, lint, type-check, run the tests.
#   ./deploy/test.sh                 fast suite (slow tests deselected)
#   MINIRL_SLOW=1 ./deploy/test.sh   everything
#   ./deploy/test.sh tests/proto -k codec   extra pytest arguments are passed through
set -euo pipefail
. "$(dirname "$0")/_env.sh"
echo "[test] ruff"
ruff check minirl_async proto services tests
echo "[test] mypy"
mypy minirl_async proto services
echo "[test] pytest"
MARK="not slow and not gpu"
[ "${MINIRL_SLOW:-0}" = "1" ] && MARK="not gpu"
exec python -m pytest -m "$MARK" -q "$@"
