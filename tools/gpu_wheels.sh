#!/usr/bin/env bash
# Download the pure-Python wheels the GPU machine lacks into the ignored wheels/ folder.
#
# The GPU machine (Python 3.12, torch with CUDA) has no network, so the packages the
# GPU check needs beyond torch travel with the working tree (the run tool's carry list:
# carry=["wheels"]) and are installed there with `pip install --no-index wheels/*.whl`.
# Only py3-none-any wheels are accepted: they install on any Python 3.12 platform.
# numpy (checkpoint_schedules' only dependency) normally comes with torch's image; a
# platform wheel for it goes to wheels/numpy/, and pytest with its dependencies (for the
# CUDA cases of the device-aware tests) to wheels/pytest/: docs/gpu.md installs each only
# where its import fails.
#
# Usage: tools/gpu_wheels.sh [DEST]   (DEST defaults to wheels/ at the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-wheels}"
python=3.12
mkdir -p "$dest" "$dest/numpy" "$dest/pytest"
pip download --no-deps --only-binary=:all: --python-version "$python" -d "$dest" \
    "checkpoint_schedules==1.0.4" "higher==0.2.1"
pip download --no-deps --only-binary=:all: --python-version "$python" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$dest/numpy" "numpy<3"
pip download --no-deps --only-binary=:all: --python-version "$python" -d "$dest/pytest" \
    "pytest==9.2.0" "pluggy==1.7.0" "iniconfig==2.3.1" "packaging==26.4" "pygments==2.21.0"
status=0
for whl in "$dest"/*.whl "$dest"/pytest/*.whl; do
    case "$whl" in
        *-py3-none-any.whl) echo "ok  $whl" ;;
        *) echo "not pure Python: $whl" >&2; status=1 ;;
    esac
done
for name in checkpoint_schedules higher; do
    ls "$dest"/"$name"-*.whl >/dev/null 2>&1 || { echo "missing: $name" >&2; status=1; }
done
du -sh "$dest"
exit "$status"
