#!/usr/bin/env bash
# The whole test suite under another torch release, in its own ignored virtual
# environment (.venv-torch<version>/): by default torch 2.11.0, the oldest release
# setup.cfg accepts and the GPU machine's.
#
# On a machine without a local CPU wheel, pip takes the release from the package
# index: for 2.11.0 that is the CUDA build (about 3 GB with its nvidia packages),
# which runs on a CPU-only machine, CUDA cases skipped.
#
# Usage: tools/other_torch.sh [VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-2.11.0}"
venv=".venv-torch$version"
python3 -m venv "$venv" && . "$venv/bin/activate"
pip install "torch==$version" && pip install -e ".[test]"
python -c "import torch; print('torch', torch.__version__)"
python -m pytest -q -p no:cacheprovider tests
