#!/usr/bin/env bash
# The GPU run of issue 14 on the offline GPU machine (docs/gpu.md): install the carried
# wheels where an import fails, run the GPU check into $OUT/gpu, then the CUDA cases of the
# device-aware tests (tests/test_exact.py, test_buffers.py, test_batch.py).
#
# Usage: tools/gpu_run.sh COMMIT [DEVICE [EXTRA GPU_CHECK ARGUMENTS...]]
#   COMMIT  the commit the tree holds (recorded in the report; the machine may lack git)
#   DEVICE  cuda (default) or cpu (to try this script here: tools/gpu_run.sh x cpu --tiny)
# Environment: OUT (default results/) receives gpu/; TIME_LIMIT (default 240 s) is the
# check's --time-limit; PYTEST_LIMIT (default 90 s) bounds the tests; PYTHON (default python3,
# the interpreter that holds torch on the GPU machine).
# Exit status: the check's (0 pass, 1 a gated check failed, 3 incomplete), else pytest's
# (5 where pytest ran out of PYTEST_LIMIT: 124 would read as the run tool's own time-out).
set -uo pipefail
py="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
commit="${1:?usage: tools/gpu_run.sh COMMIT [DEVICE [EXTRA ARGUMENTS...]]}"
device="${2:-cuda}"
shift $(( $# < 2 ? $# : 2 ))
out="${OUT:-results}/gpu"
mkdir -p "$out"

need() {  # need MODULE WHEEL...: pip-install the wheels unless MODULE imports
    local module="$1"; shift
    "$py" -c "import $module" 2>/dev/null && return 0
    "$py" -m pip install -q --no-index "$@" && return 0
    echo "pip could not install $module: importing its wheels as zip files" >&2
    for w in "$@"; do PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/$w"; done
    export PYTHONPATH
}
need numpy wheels/numpy/*.whl
need checkpoint_schedules wheels/checkpoint_schedules-*.whl
need higher wheels/higher-*.whl
need pytest wheels/pytest/*.whl
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" CUBLAS_WORKSPACE_CONFIG=:4096:8

{ nvidia-smi -L; "$py" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"; } > "$out/env.txt" 2>&1
cat "$out/env.txt"
"$py" tests/gpu_check.py --device "$device" --out "$out" --time-limit "${TIME_LIMIT:-240}" \
    --commit "$commit" "$@" 2>&1 | tee "$out/stdout.txt"
rc=${PIPESTATUS[0]}
timeout "${PYTEST_LIMIT:-90}" "$py" -m pytest -q -rs -p no:cacheprovider -k "$device" \
    tests/test_exact.py tests/test_buffers.py tests/test_batch.py > "$out/pytest_$device.txt" 2>&1
prc=$?
if [ "$prc" -eq 124 ]; then
    echo "pytest ran out of PYTEST_LIMIT (${PYTEST_LIMIT:-90} s)" >&2
    prc=5
fi
tail -n 4 "$out/pytest_$device.txt"
echo "gpu_check exit $rc; pytest ($device cases) exit $prc; results in $out"
exit $(( rc != 0 ? rc : prc ))
