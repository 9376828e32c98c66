#!/usr/bin/env bash
# Build the native ops with AddressSanitizer and run the op fuzzers under it.
#
#   scripts/asan_fuzz.sh [CASES_PER_TARGET]      (default 2000)
#
# The extension and libspeclora_ops are compiled with -fsanitize=address into
# build/asan (the installed package is left alone), staged next to symlinks of
# the Python sources, and loaded into the venv's Python with libasan preloaded.
# Python is started with -S so that the editable install's import hook cannot
# substitute the regular build. Then:
#   1. a self-check: a one-past-the-end read of an MLX buffer must be reported,
#      or a clean run would prove nothing;
#   2. tests/fuzz_ops.py on every target (speculative_accept, kv_ring_write,
#      RollbackKVCache);
#   3. the ops' own test files (tests/test_acceptance.py, tests/test_cache.py),
#      which also run the ops inside a model's decode loop.
# Any ASan report aborts the run with a non-zero status.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=${ASAN_BUILD_DIR:-$ROOT/build/asan}
CASES=${1:-2000}
CXX=${CXX:-g++}

LIBASAN=$("$CXX" -print-file-name=libasan.so)
if [[ ! -f "$LIBASAN" ]]; then
  echo "libasan.so not found next to $CXX (Debian/Ubuntu: apt-get install libasan8)" >&2
  exit 2
fi
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
MLX_DIR="$SITE/mlx"

echo "== building with AddressSanitizer into $OUT/build"
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
SAN="-fsanitize=address -fno-omit-frame-pointer -g"
cmake -S "$ROOT" -B "$OUT/build" "${GENERATOR[@]}" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER="$CXX" \
  -DCMAKE_CXX_FLAGS="$SAN" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address" \
  -DPython_EXECUTABLE="$PY" >"$OUT.configure.log"
cmake --build "$OUT/build" -j 2 >"$OUT.build.log"
EXT=$(ls "$OUT"/build/_ext*.so)

echo "== staging the package in $OUT/python"
rm -rf "$OUT/python"
mkdir -p "$OUT/python/speclora"
for entry in "$ROOT"/python/speclora/*; do
  case "$(basename "$entry")" in
    _ext*.so | __pycache__) ;;
    *) ln -s "$entry" "$OUT/python/speclora/" ;;
  esac
done
cp "$EXT" "$OUT/python/speclora/"

# libstdc++ too: Python is no C++ program, and ASan's exception interceptor
# needs the real __cxa_throw resolvable when it starts.
export LD_PRELOAD="$LIBASAN $("$CXX" -print-file-name=libstdc++.so.6)"
# Python and libmlx are not instrumented: their allocations are intercepted
# (heap redzones) but leak reports would be theirs, not the ops'.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1"
export PYTHONPATH="$OUT/python:$SITE"
export PYTHONDONTWRITEBYTECODE=1
run_py() { "$PY" -S "$@"; }

echo "== checking that the sanitized extension is the one imported"
run_py - <<'EOF'
import speclora
from speclora._native import extension
path = extension().__file__
assert "/asan/" in path, path
print("extension:", path)
EOF
if ! nm -D "$EXT" | grep __asan_ >/dev/null; then  # not -q: pipefail and SIGPIPE
  echo "$EXT is not instrumented" >&2
  exit 1
fi

echo "== self-check: an out-of-bounds read of an MLX buffer must be reported"
cat >"$OUT/oob.cpp" <<'EOF'
#include "mlx/mlx.h"
namespace mx = mlx::core;
int main() {
  auto a = mx::arange(16, mx::float32);
  mx::eval(a);
  volatile float past_end = a.data<float>()[a.size()];
  return past_end == 12345.0f;
}
EOF
"$CXX" -std=c++20 $SAN -I"$MLX_DIR/include" "$OUT/oob.cpp" -o "$OUT/oob" \
  -L"$MLX_DIR/lib" -lmlx -Wl,-rpath,"$MLX_DIR/lib"
if env -u LD_PRELOAD ASAN_OPTIONS=detect_leaks=0 "$OUT/oob" 2>"$OUT/oob.log"; then
  echo "ASan did not see a read past an MLX buffer: a clean fuzz run would prove nothing" >&2
  exit 1
fi
grep -q "heap-buffer-overflow" "$OUT/oob.log"
echo "reported: $(grep -m1 -o 'heap-buffer-overflow.*' "$OUT/oob.log")"

echo "== fuzzing the ops under ASan ($CASES cases per target)"
(cd "$ROOT" && run_py tests/fuzz_ops.py --examples "$CASES")

echo "== the ops' own tests under ASan"
(cd "$ROOT" && run_py -m pytest -q -p no:cacheprovider tests/test_acceptance.py tests/test_cache.py)

echo "== ASan: no report"
