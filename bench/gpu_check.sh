#!/usr/bin/env bash
# Everything GPU in one short run (bench/gpu_check.py; bench/README.md): CUDA and bf16, the ViT-B
# 128-frame step against the memory plan, a 1-GPU `lvmae train mae` run from local shards, the
# tokenizer's clips/s. Writes OUT/gpu_check_<device>.json (OUT: --out, else $OUT, else bench/results).
#
#     bash bench/gpu_check.sh --out "$OUT"                 # on the GPU machine (.whl/ carried)
#     PYTHON=.venv/bin/python bash bench/gpu_check.sh --device cpu --quick --out /tmp/x   # here
#
# Wheels in .whl/ (bench/gpu_wheels.sh) are installed into /tmp/site first, when this python lacks
# what they hold; the repository root goes on PYTHONPATH (lvmae is not pip-installed there).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}

missing=$("$PY" - <<'EOF'
import importlib.util
names = ("deepspeed", "omegaconf", "webdataset", "zarr", "av", "pydantic", "hjson")
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
) || exit 1
if [ -n "$missing" ]; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_check: $PY lacks $missing and there is no .whl/ (bash bench/gpu_wheels.sh, then carry .whl)" >&2
    exit 1
  fi
  echo "gpu_check: $PY lacks $missing: installing .whl/ into $SITE"
  start=$(date +%s)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/*.whl || exit 1
  echo "gpu_check: wheels installed in $(($(date +%s) - start)) s"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
