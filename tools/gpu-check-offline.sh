#!/usr/bin/env bash
# make gpu-check on a lent GPU machine that reaches no package registry, under the image's
# own python3 (its torch, transformers and PEFT): the wheels that image lacks come along in
# .gpu-wheels/ (`make gpu-bundle` here), and go into .gpu-site/, not into the image's
# site-packages (which may be externally managed, PEP 668). Then tools.gpu_check runs
# its steps; each keeps its pass/fail and time in benchmarks/results/gpu_check.md.
# Extra arguments go to tools.gpu_check (e.g. --budget-s 420, --allow-no-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
SITE=$PWD/.gpu-site

if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "gpu-check-offline: no wheels in $WHEELS/: run 'make gpu-bundle' on a machine with a registry and copy the folder along" >&2
  exit 2
fi
rm -rf "$SITE"
if "$PY" -m pip --version >/dev/null 2>&1; then
  # --target: never touches the image's own packages; --no-index: nothing is fetched;
  # --no-deps: a --target install does not see the image's packages (pytest, torch, ...).
  "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
    --target "$SITE" "$WHEELS"/*.whl
  # The project's build backend is the bundled setuptools (no isolated build env to fill).
  PYTHONPATH="$SITE" "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
    --no-build-isolation --upgrade --target "$SITE" .
else
  # No pip in the image: a wheel is a zip laid out for site-packages; the project runs
  # from this tree (every process is started with `python -m`).
  echo "gpu-check-offline: $PY has no pip; unpacking the wheels into $SITE" >&2
  "$PY" - "$WHEELS" "$SITE" <<'EOF'
import glob, sys, zipfile
for w in sorted(glob.glob(sys.argv[1] + "/*.whl")):
    zipfile.ZipFile(w).extractall(sys.argv[2])
EOF
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m tools.gpu_check "$@"
