# Sourced by deploy/test.sh and deploy/quickstart.sh: create or update .venv and install the project.
# Idempotent: reinstalls only when pyproject.toml changed. GPU users: set MINIRL_TORCH_SPEC to the torch
# you want (e.g. "torch==2.9.1") or pre-install torch in .venv; the default pins this machine's CPU build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# Python >= 3.11: $PYTHON, else python3.11 / python3.12 / python3.13 / python3, the first that is new enough.
py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
    py_ok "$PY" || { echo "[env] PYTHON=$PY is not Python >= 3.11" >&2; exit 1; }
else
    PY=""
    for cand in python3.11 python3.12 python3.13 python3; do
        if command -v "$cand" >/dev/null && py_ok "$cand"; then PY="$cand"; break; fi
    done
    [ -n "$PY" ] || { echo "[env] needs Python >= 3.11 (none of python3.11..3.13 or python3 is); set PYTHON=/path/to/python3.11" >&2; exit 1; }
fi
EXTRAS="${MINIRL_EXTRAS:-dev,hf}"
if [ -x .venv/bin/python ] && ! py_ok .venv/bin/python; then
    echo "[env] .venv has $(.venv/bin/python --version 2>&1) (< 3.11): recreating it" >&2
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    echo "[env] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
STAMP=".venv/.minirl-installed"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)-$EXTRAS-${MINIRL_TORCH_SPEC:-}"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    if [ -n "${MINIRL_TORCH_SPEC:-}" ] || ! python -c "import torch" 2>/dev/null; then
        # Pin first: an unpinned torch would pull a multi-GB CUDA build.
        echo "[env] installing ${MINIRL_TORCH_SPEC:-torch==2.13.0}"
        pip install --quiet --disable-pip-version-check "${MINIRL_TORCH_SPEC:-torch==2.13.0}"
    fi
    echo "[env] installing minirl-async[$EXTRAS]"
    pip install --quiet --disable-pip-version-check -e ".[$EXTRAS]"
    echo "$WANT" > "$STAMP"
fi
# One BLAS/OpenMP thread per process unless told otherwise: sampler and learner share the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
