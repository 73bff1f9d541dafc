#!/usr/bin/env bash
# Build what Spark executors need on a cluster: the cxr wheel and a packed Python environment.
#
#   scripts/build_dist.sh [full|slim]      (default full; `make dist` runs it)
#
#   full: every runtime dependency of cxr-spark (TensorFlow included, pyspark excluded: Spark ships its own
#         Python code to the executors) + the cxr wheel -> dist/cxr-env.tar.gz, dist/cxr_spark-*.whl
#   slim: no TensorFlow/matplotlib/tf2onnx/onnx (preprocess + inference with ONNX Runtime, or scratch NumPy
#         models with either engine), cached under
#         build/envs/slim-<hash of pyproject.toml + cxr sources>/cxr-env.tar.gz; the cluster tests use it.
#
# Two cache levels: the dependency venv (build/envs/KIND-deps-<hash of the dependency list + pinned versions>,
# slow: minutes) and the
# packed archive (keyed by pyproject.toml + cxr sources: a source change only reinstalls the wheel and repacks).
# Versions are pinned to the project venv's (pip freeze), so the driver and the executors agree on
# numpy / pandas / pyarrow. The packed venv's bin/python links to the same interpreter path as the project
# venv's (here: pyenv's 3.11): every cluster node needs Python 3.11 at that path (or use conda-pack / PEX).
# Prints the archive's path as its last line. Use it:
#   spark-submit --archives dist/cxr-env.tar.gz#environment --conf spark.pyspark.python=./environment/bin/python ...
set -euo pipefail
kind="${1:-full}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CXR_VENV:-$here/.venv}"
py="$venv/bin/python"
[ -x "$py" ] || { echo "no venv at $venv: run 'make venv' first" >&2; exit 2; }
"$py" -c "import venv_pack" 2>/dev/null || { echo "venv-pack missing: pip install -e '.[dist]'" >&2; exit 2; }

# The dependency list and the pinned versions decide the dependency venv (not the rest of pyproject.toml).
reqs="$("$py" "$here/scripts/build_dist_requirements.py" "$here/pyproject.toml" "$kind")"
pins="$("$py" -m pip freeze --exclude-editable 2>/dev/null | grep -v -i '^cxr-spark')"
deps_hash="$(printf '%s\n%s\n%s\n' "$reqs" "$pins" "$("$py" -c 'import sys; print(sys.version)')" | sha256sum | cut -c1-16)"
hash="$(cd "$here" && { cat pyproject.toml; find cxr \( -name '*.py' -o -name '*.yaml' -o -path '*/frontal_model/*' \) -print | LC_ALL=C sort | xargs cat; } \
        | sha256sum | cut -c1-16)"
case "$kind" in
  full) work="$here/build/envs/full-$hash"; out_dir="$here/dist" ;;
  slim) work="$here/build/envs/slim-$hash"; out_dir="$work" ;;
  *) echo "usage: $0 [full|slim]" >&2; exit 2 ;;
esac
deps="$here/build/envs/$kind-deps-$deps_hash"
archive="$out_dir/cxr-env.tar.gz"
if [ -f "$work/.done" ] && [ -f "$archive" ]; then
  echo "up to date: $archive" >&2
  echo "$archive"
  exit 0
fi
mkdir -p "$here/build/envs"
exec 9>"$here/build/.build_dist.$kind.lock"
flock 9   # one build of a kind at a time (two test sessions may start together)
if [ -f "$work/.done" ] && [ -f "$archive" ]; then echo "$archive"; exit 0; fi

start=$(date +%s)
# 1. the dependency venv: pyproject's dependencies pinned to the project venv's versions
if [ ! -f "$deps/.done" ]; then
  rm -rf "$deps"
  mkdir -p "$deps"
  printf '%s\n' "$reqs" > "$deps/requirements.txt"
  printf '%s\n' "$pins" > "$deps/constraints.txt"
  base_py="$("$py" -c 'import sys; print(sys._base_executable)')"   # the driver's interpreter
  "$base_py" -m venv "$deps/venv"
  "$deps/venv/bin/python" -m pip install --quiet -r "$deps/requirements.txt" -c "$deps/constraints.txt" >&2
  touch "$deps/.done"
  echo "dependency venv built in $(( $(date +%s) - start ))s: $deps/venv" >&2
fi
# 2. the cxr wheel (venv-pack cannot pack editable installs), installed into it without deps
rm -rf "$work"
mkdir -p "$work/wheel" "$out_dir"
"$py" -m pip wheel --quiet --no-deps --no-build-isolation -w "$work/wheel" "$here" >&2
wheel="$(ls "$work"/wheel/cxr_spark-*.whl)"
"$deps/venv/bin/python" -m pip install --quiet --no-deps --force-reinstall "$wheel" >&2
"$deps/venv/bin/python" -c "import cxr, cv2, numpy, pandas, pyarrow, pydicom" >&2
# 3. pack it (relocatable: venv-pack rewrites the prefix in scripts when the archive is unpacked)
rm -f "$archive"
"$venv/bin/venv-pack" -q -p "$deps/venv" -o "$archive" >&2
if [ "$kind" = full ]; then rm -f "$out_dir"/cxr_spark-*.whl; cp "$wheel" "$out_dir/"; fi
touch "$work/.done"
# keep only the current builds of this kind
for old in "$here"/build/envs/"$kind"-*; do
  if [ "$old" != "$work" ] && [ "$old" != "$deps" ]; then rm -rf "$old"; fi
done
echo "built $kind environment in $(( $(date +%s) - start ))s: $archive ($(du -h "$archive" | cut -f1))" >&2
echo "$archive"
