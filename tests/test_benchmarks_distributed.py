"""The data-parallel example ``benchmarks/distributed.py``, launched by torchrun with 2 gloo processes.

``python -m torch.distributed.run`` is ``torchrun`` run by this interpreter.
Tiny sizes: the run takes seconds, most of it starting the processes.
"""
import os
import re
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not built in")]


def _launch(*extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "benchmarks.distributed", "--outer-steps", "3", "--meta-batch", "4",
           "--steps", "3", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)


def _checksums(stdout):
    return dict(re.findall(r"^rank (\d)/2: .*final parameters: (.+)$", stdout, re.M))


def test_two_gloo_ranks_end_with_identical_parameters():
    proc = _launch()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sums = _checksums(proc.stdout)
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"], proc.stdout
    assert "identical parameters on all 2 ranks: yes" in proc.stdout
    losses = re.search(r"^outer loss .*$", proc.stdout, re.M)
    assert losses and len(re.findall(r"step \d+: \d+\.\d+", losses.group(0))) == 3, proc.stdout


def test_a_difference_between_ranks_is_reported_and_fails():
    proc = _launch("--perturb-rank", "1")
    assert proc.returncode != 0
    sums = _checksums(proc.stdout)
    assert set(sums) == {"0", "1"} and sums["0"] != sums["1"], proc.stdout
    assert "identical parameters on all 2 ranks: NO" in proc.stdout
