# Sourced by deploy/test.sh and deploy/quickstart.sh: create or update .venv and install the project.
# Idempotent: reinstalls only when pyproject.toml changed. GPU users: set MINIRL_TORCH_SPEC to the torch
# you want (e.g. "torch==2.9.1") or pre-install torch in .venv; the default pins this machine's CPU build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
EXTRAS="${MINIRL_EXTRAS:-dev,hf}"
if [ ! -x .venv/bin/python ]; then
    echo "[env] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
STAMP=".venv/.minirl-installed"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)-$EXTRAS"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    if ! python -c "import torch" 2>/dev/null; then
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
