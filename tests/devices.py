"""The devices the device-aware tests run on: the CPU always, CUDA when present.

``DEVICES`` is a list of ``pytest.param`` values for ``@pytest.mark.parametrize("device",
DEVICES)``; on a machine without CUDA the ``"cuda"`` case is kept and skipped with a
reason, so that ``pytest -rs`` lists what did not run. The GPU check
(``tests/gpu_check.py``, ``docs/gpu.md``) runs these tests' checks on a GPU.
"""
import contextlib
import os

import pytest
import torch

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # see deterministic()

CUDA = torch.cuda.is_available()
SKIP_CUDA = pytest.mark.skipif(not CUDA, reason="CUDA is not available on this machine "
                               "(the GPU check runs the CUDA cases: docs/gpu.md)")

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=SKIP_CUDA)]


def to(device, tree):
    """``tree`` (a tensor, or a list, tuple or dict of them, nested) moved to ``device``;
    other leaves are returned unchanged."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: to(device, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to(device, v) for v in tree)
    return tree


@contextlib.contextmanager
def deterministic():
    """Deterministic kernels in the body (``torch.use_deterministic_algorithms(True)``,
    no cuDNN autotuning), restored afterwards; usable as a decorator. On CUDA, cuBLAS
    also needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` before its first call: importing this
    module sets it unless the environment already does."""
    old = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
        torch.backends.cudnn.benchmark = old[2]
