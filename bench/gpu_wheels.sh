#!/usr/bin/env bash
# Wheels for bench/gpu_check.sh on the GPU machine, fetched HERE (that machine has no network).
#
# The GPU machine's python3 (3.12, x86-64) has torch with CUDA, numpy, pyyaml, fsspec, tqdm, psutil,
# safetensors, prometheus-client, einops, msgpack, ninja, py-cpuinfo and packaging, but none of what
# lvmae needs besides: DeepSpeed (and its hjson and pydantic), omegaconf, webdataset, zarr and PyAV.
# This puts one wheel of each missing package, at the version this checkout's .venv runs (what the test
# suite passed with), into .whl/ (ignored by git), for the device tool to carry ("carry": [".whl"]).
# DeepSpeed ships as an sdist only: its wheel is built here, pure Python (DS_BUILD_OPS=0: ops are
# JIT-compiled where used). NVIDIA DALI's wheel (hundreds of MB) cannot travel: the check decodes with
# PyAV there. Everything that travels must stay under 64 MiB: this fails when the wheels do not.
#
#     bash bench/gpu_wheels.sh            # PYTHON=... to read versions from another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
DEST=.whl
LIMIT=$((64 * 1024 * 1024))
# What bench/gpu_check.py imports that the GPU machine lacks, with what those need in turn (checked
# against each wheel's Requires-Dist). typing-extensions and fsspec are there, but pydantic and zarr
# need recent releases of them: the ones this .venv runs travel too.
BINARY=(av pydantic-core numcodecs google-crc32c)
PURE=(hjson pydantic annotated-types typing-inspection typing-extensions omegaconf webdataset braceexpand
  zarr donfig fsspec)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
  manylinux1_x86_64)

version() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }
wheel_name() { echo "${1//-/_}"; } # a wheel's file name spells its distribution with underscores
mib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; }

mkdir -p "$DEST"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

specs=()
for name in "${BINARY[@]}" "${PURE[@]}" deepspeed; do
  v=$(version "$name") || {
    echo "gpu_wheels: $name is not installed in $PY: install the project (make venv) first" >&2
    exit 1
  }
  rm -f "$DEST/$(wheel_name "$name")"-*.whl "$DEST/$name"-*.whl # one version of each: two stop the install
  specs+=("$name==$v")
done

platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platform_args[@]}" -d "$DEST" "${specs[@]:0:$((${#BINARY[@]} + ${#PURE[@]}))}"
ds=${specs[-1]}
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$ds"

# One wheel per distribution, or pip refuses the whole install there.
dupes=$(for f in "$DEST"/*.whl; do basename "$f" | cut -d- -f1 | tr 'A-Z' 'a-z'; done | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "gpu_wheels: more than one wheel of: $dupes (remove the old ones from $DEST)" >&2
  exit 1
fi

total=$(cat "$DEST"/*.whl | wc -c)
echo "wheels in $DEST:"
for f in "$DEST"/*.whl; do printf '  %8s MiB  %s\n' "$(mib "$(wc -c <"$f")")" "$(basename "$f")"; done
echo "total: $(mib "$total") MiB ($total bytes) of the 64 MiB the device tool carries per call"
tree=$(git ls-files -co --exclude-standard -z | xargs -0 cat 2>/dev/null | wc -c)
echo "with the working tree that travels beside them ($(mib "$tree") MiB): $(mib $((tree + total))) MiB"
if [ "$total" -gt "$LIMIT" ] || [ $((tree + total)) -gt "$LIMIT" ]; then
  echo "gpu_wheels: over the device tool's 64 MiB per call" >&2
  exit 1
fi
