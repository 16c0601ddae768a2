"""Peak memory of ``hypergrad`` must not grow with the number of inner steps.

What is measured
----------------
Each case runs in a fresh Python process (``_CHILD`` below), so that no
allocator state or resident-set high-water mark leaks from one case to the
next. The child builds a float32 model of about one million parameters
(``Linear(1000, 1000)`` + ``tanh``, 1,001,000 parameters, so Hessian-vector
products are not trivial), a batch of 4 rows for the support and the query
set, and MSE for both losses. It then

1. makes one warm-up call with the same mode and memory setting and 3 inner
   steps (allocator arenas, thread pools and autograd's lazily built state
   exist before the measurement), collects garbage and hands the C heap's
   free memory back to the system (``malloc_trim``, glibc), so every case
   starts from the same kind of heap;
2. resets the kernel's resident-set high-water mark (writing ``5`` to
   ``/proc/self/clear_refs`` resets ``VmHWM``; if that is refused it falls
   back to ``ru_maxrss``, which the small warm-up cannot push above the
   measured call) and records the current RSS as the baseline;
3. makes the measured call and reports ``growth = VmHWM - baseline``: the
   peak resident memory the call needed on top of what the process held.

The test compares that growth at a small and a large ``steps``:

* ``memory="recompute"`` for ``fom``, ``ufom`` and ``exact``: the growth at
  the large ``steps`` may exceed the growth at 10 steps by less than three
  parameter copies (3 x 4,004,000 bytes ~ 11.5 MiB). The recompute schedule
  keeps a fixed number of inner states alive (the start state, the replayed
  state, one or two step records with their graphs, the two adjoint streams),
  so the peak is the same at any ``steps``; three copies absorb allocator and
  page-granularity noise (measured noise is a few MiB) while a single extra
  state kept per step would exceed it by far (hundreds of copies at 300
  steps). ``ufom`` runs with ``q=1.0`` so its exact branch is always taken:
  the constant-memory claim of the exact sweep is what is tested, not a coin.
* ``memory="store"`` (``exact``) keeps every step's state and graph, so its
  growth must rise by clearly more than three copies: at least half a
  parameter copy per extra step (about three copies per step are measured).
  This proves the measurement can see a per-step state at all, which is what
  makes the recompute assertions meaningful.

Step counts: ``fom`` compares 10 with 300 steps. ``exact`` and ``ufom`` with
recompute replay ``steps (steps - 1) / 2`` inner steps: 44,850 at 300 steps,
about 2.5 minutes per call on 2 CPU cores, so they compare 10 with
``EXACT_LARGE = 100`` steps (4,950 replays, ~15 s per call); one state kept
per step would still show as ~90 parameter copies. ``store`` compares 10
with 60 steps (~50 x 12 MiB).
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

N_PARAMS = 1000 * 1000 + 1000  # Linear(1000, 1000) with bias
PARAM_BYTES = 4 * N_PARAMS  # float32
MiB = 2 ** 20
SMALL = 10
FOM_LARGE = 300
EXACT_LARGE = 100  # 300 would replay 44,850 steps per call (~2.5 min on 2 cores)
STORE_LARGE = 60
ALLOWED_GROWTH = 3 * PARAM_BYTES  # recompute: peak(large) - peak(small)
STORE_MIN_PER_STEP = 0.5 * PARAM_BYTES  # store: at least this per extra step

_CHILD = r'''
import ctypes, gc, json, os, re, resource, sys, time
import torch
import torch_ufom

mode, memory, steps, q = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
torch.set_num_threads(2)


def status(key):
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+) kB", f.read()).group(1)) * 1024


def reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return status("VmHWM") <= status("VmRSS") + (1 << 20)


torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Tanh())
n_params = sum(p.numel() for p in model.parameters())
support = (torch.randn(4, 1000), torch.randn(4, 1000))
query = (torch.randn(4, 1000), torch.randn(4, 1000))


def mse(fmodel, batch):
    return torch.nn.functional.mse_loss(fmodel(batch[0]), batch[1])


def call(r):
    return torch_ufom.hypergrad(model, mse, mse, support, query, steps=r, inner_lr=0.1,
                                mode=mode, q=q, memory=memory,
                                generator=torch.Generator().manual_seed(1))


grads = call(3)  # warm-up
del grads
gc.collect()
try:
    ctypes.CDLL(None).malloc_trim(0)
except (OSError, AttributeError):
    pass
exact_hwm = reset_hwm()
base = status("VmRSS")
start = time.perf_counter()
grads = call(steps)
seconds = time.perf_counter() - start
if exact_hwm:
    peak = status("VmHWM")
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
assert all(bool(torch.isfinite(g).all()) for g in grads)
print(json.dumps({"growth": peak - base, "base": base, "n_params": n_params,
                  "seconds": seconds, "hwm_reset": exact_hwm}))
'''


def _growth(tmp_path, mode, memory, steps, q=0.1):
    """Run one measured ``hypergrad`` call in a fresh process; return its JSON report."""
    script = tmp_path / "measure_memory.py"
    script.write_text(_CHILD)
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(script), mode, memory, str(steps), str(q)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n_params"] == N_PARAMS
    print(f"\n  {mode}/{memory} steps={steps}: peak growth {out['growth'] / MiB:.1f} MiB "
          f"({out['growth'] / PARAM_BYTES:.2f} parameter copies), {out['seconds']:.1f} s, "
          f"VmHWM reset: {out['hwm_reset']}")
    return out["growth"]


@pytest.mark.parametrize("mode, q, large", [
    ("fom", 0.1, FOM_LARGE),
    ("ufom", 1.0, EXACT_LARGE),  # q = 1: the exact branch is always taken
    ("exact", 0.1, EXACT_LARGE),
])
def test_recompute_peak_memory_is_constant_in_steps(tmp_path, mode, q, large):
    small_growth = _growth(tmp_path, mode, "recompute", SMALL, q)
    large_growth = _growth(tmp_path, mode, "recompute", large, q)
    extra = large_growth - small_growth
    assert extra < ALLOWED_GROWTH, (
        f"{mode}/recompute: peak RSS growth at steps={large} exceeds steps={SMALL} by "
        f"{extra / MiB:.1f} MiB = {extra / PARAM_BYTES:.1f} parameter copies "
        f"(allowed: {ALLOWED_GROWTH / PARAM_BYTES:g}); the schedule is not constant-memory")


def test_store_peak_memory_grows_with_steps(tmp_path):
    small_growth = _growth(tmp_path, "exact", "store", SMALL)
    large_growth = _growth(tmp_path, "exact", "store", STORE_LARGE)
    extra = large_growth - small_growth
    needed = (STORE_LARGE - SMALL) * STORE_MIN_PER_STEP
    assert extra > needed, (
        f"exact/store: peak RSS growth at steps={STORE_LARGE} exceeds steps={SMALL} by only "
        f"{extra / MiB:.1f} MiB = {extra / PARAM_BYTES:.1f} parameter copies; storing every "
        f"step must show at least {needed / PARAM_BYTES:g} (the measurement cannot see it)")
