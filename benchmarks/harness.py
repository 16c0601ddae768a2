"""Small helpers shared by the benchmark scripts.

* seeding: :func:`seed_everything`;
* timing: :func:`time_calls` (wall-clock and process CPU time of each call,
  synchronising CUDA around it) and :func:`interleaved_times` (several
  callables round-robin, for ratios that survive background load);
* peak memory: :class:`PeakMemory`, a context manager measuring the peak above
  the memory in use when it was entered: ``torch.cuda.max_memory_allocated``
  on CUDA, the peak resident set size of the process on CPU;
* isolation: :func:`run_fresh` runs one measurement in a fresh Python process
  and returns the JSON it prints (CPU peak RSS is only meaningful per process);
  :func:`run_fresh_many` runs several, a few at a time;
* reporting: :func:`markdown_table`, :func:`progress`, :func:`plot_panels`
  (line plots with matplotlib's Agg backend) and :func:`write_text`.

Only the standard library and ``torch`` are required; ``psutil`` and ``tqdm``
are used when installed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence

import torch

__all__ = ["MB", "positive_int", "PeakMemory", "Sample", "current_rss", "interleaved_times", "markdown_table",
           "mean", "median", "plot_panels", "progress", "run_fresh", "run_fresh_many",
           "seed_everything", "sync", "time_calls", "write_text"]

MB = 2 ** 20  # the reports' "MB" are MiB
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seed_everything(seed: int, device: str = "cpu") -> torch.Generator:
    """Seed Python's and torch's global generators; return a fresh ``torch.Generator``.

    The returned generator lives on ``device`` and is seeded with ``seed``, for
    code that takes an explicit generator (e.g. random truncation draws).
    """
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)


def sync(device: str) -> None:
    """Wait for queued CUDA work on ``device`` (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Sample(NamedTuple):
    """One timed call: wall-clock seconds and this process's CPU seconds (all threads)."""

    wall: float
    cpu: float


def time_calls(fn: Callable[[], Any], repeats: int, device: str = "cpu",
               min_seconds: float = 0.0) -> List[Sample]:
    """Call ``fn`` at least ``repeats`` times, and until ``min_seconds`` of wall time have passed.

    Returns one :class:`Sample` per call; CUDA is synchronised around each
    call. ``min_seconds`` buys more samples for fast calls. For single-threaded
    CPU work, CPU time is less sensitive than wall time to other processes on a
    shared machine (time spent descheduled does not count); for GPU work it
    measures only the host side.
    """
    samples: List[Sample] = []
    while len(samples) < repeats or sum(s.wall for s in samples) < min_seconds:
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        samples.append(Sample(time.perf_counter() - wall, time.process_time() - cpu))
    return samples


def interleaved_times(fns: Dict[str, Callable[[], Any]], rounds: int, device: str = "cpu",
                      per_round: Optional[Dict[str, int]] = None,
                      min_seconds: float = 0.0) -> Dict[str, List[Sample]]:
    """Time several callables round-robin; return each one's list of :class:`Sample`.

    Each round calls every function once (``per_round[name]`` times where
    given), so background load on a shared machine hits all of them alike and
    their ratios stay meaningful. Runs ``rounds`` rounds, and more until
    ``min_seconds`` have passed in total.
    """
    times: Dict[str, List[Sample]] = {name: [] for name in fns}
    start, done = time.perf_counter(), 0
    while done < rounds or time.perf_counter() - start < min_seconds:
        for name, fn in fns.items():
            times[name] += time_calls(fn, (per_round or {}).get(name, 1), device)
        done += 1
    return times


def median(xs: Sequence[float]) -> float:
    """The median of ``xs``."""
    return statistics.median(xs)


def mean(xs: Sequence[float]) -> float:
    """The arithmetic mean of ``xs``."""
    return statistics.fmean(xs)


def current_rss() -> int:
    """The resident set size of this process now, in bytes."""
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """The high-water mark of this process's RSS in bytes (``ru_maxrss``).

    On Linux this is not only this process's own peak: at ``exec`` the kernel
    folds the peak of the address space being replaced into it, so a child
    started by ``subprocess`` begins with its *parent's* peak RSS, and
    ``/proc/self/clear_refs`` does not reset it. Prefer :func:`_vm_hwm`.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _vm_hwm() -> Optional[int]:
    """This address space's RSS high-water mark in bytes (``VmHWM``, Linux); ``None`` elsewhere.

    Unlike ``ru_maxrss`` it holds nothing inherited from the parent process,
    and writing ``5`` to ``/proc/self/clear_refs`` resets it to the current RSS.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``; no-op elsewhere)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0); ``False`` where that is unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Measure the peak memory of the enclosed code above the memory in use on entry.

    On CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` on
    entry (tensors only, not the caching allocator's reserve). On CPU: the
    process's peak RSS minus its RSS on entry (freed heap memory is first
    returned to the OS, so reused pages count). On Linux the peak is ``VmHWM``
    of ``/proc/self/status``, reset on entry through ``/proc/self/clear_refs``.
    Elsewhere, or where the kernel refuses the reset, it is ``ru_maxrss``, a
    high-water mark since process start that on Linux also includes the peak
    RSS of the parent process that started this one (the kernel carries it
    over at ``exec``); if that mark lies above the entry RSS, :attr:`exact` is
    ``False`` and the result is an upper bound. Measure in a fresh process
    (:func:`run_fresh`).

    Attributes (set on exit):
        peak_bytes: the peak above the entry level, in bytes.
        exact: ``False`` when the result is only an upper bound.
    """

    def __init__(self, device: str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.peak_bytes = 0
        self.exact = True

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _trim_heap()
            self._hwm = _reset_peak_rss() and _vm_hwm() is not None
            self._base = current_rss()
            self.exact = self._hwm or _peak_rss() <= self._base
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _vm_hwm() if self._hwm else _peak_rss()
        self.peak_bytes = max(0, peak - self._base)


def run_fresh(module: str, args: Sequence[str], timeout: Optional[float] = None) -> dict:
    """Run ``python -m module *args`` in a fresh process from the repository root.

    The child must print one JSON object as the last line of its stdout; it is
    returned as a dict. A failing child gives ``{"error": <last stderr line>}``.
    """
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, text=True,
                              capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        return {"error": err[-1]}
    return json.loads(lines[-1])


def run_fresh_many(module: str, arg_lists: Sequence[Sequence[str]], workers: int = 1,
                   desc: str = "") -> List[dict]:
    """:func:`run_fresh` for each argument list, ``workers`` processes at a time, in order.

    Only for measurements that concurrency does not disturb (per-process peak
    memory); time with one process at a time. Shows progress if ``tqdm`` is installed.
    """
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_fresh, module, args) for args in arg_lists]
        for _ in progress(futures, desc):
            pass
        return [f.result() for f in futures]


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                   align: Optional[str] = None) -> str:
    """Format ``rows`` as a GitHub Markdown table.

    ``align`` has one character per column, ``l`` or ``r`` (default: all ``l``).
    Cells are converted with ``str``; columns are padded to equal width.
    """
    rows = [[str(c) for c in r] for r in rows]
    align = align or "l" * len(headers)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w)
                                 for c, w, a in zip(cells, widths, align)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2))
                          for w, a in zip(widths, align)) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


def progress(items: Sequence[Any], desc: str = "") -> Iterable[Any]:
    """Iterate over ``items`` with a ``tqdm`` progress bar on stderr if ``tqdm`` is installed.

    ``concurrent.futures.Future`` items are waited for, in order, as they are yielded.
    """
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(_wait(items), desc=desc, total=len(items), file=sys.stderr, leave=False)


def _wait(items):
    for item in items:
        if hasattr(item, "result"):
            item.result()
        yield item


def write_text(path: str, text: str) -> str:
    """Write ``text`` (plus a final newline) to ``path``, creating its folder; return ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    return path


def plot_panels(path: str, panels: Sequence[Dict[str, Any]], ncols: int = 2,
                title: str = "", panel_size=(5.5, 4.0)) -> str:
    """Save a grid of line plots to ``path`` (PNG) with matplotlib's Agg backend; return ``path``.

    Each panel is a dict with ``series`` (``{label: (xs, ys)}``, drawn in
    order, one colour per label shared across panels) and optionally
    ``title``, ``xlabel``, ``ylabel``, ``logx``, ``logy`` (bools) and
    ``hlines`` (``{label: y}``, dashed grey reference lines).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter

    ncols = max(1, min(ncols, len(panels)))
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, squeeze=False,
                             figsize=(panel_size[0] * ncols, panel_size[1] * nrows))
    colors: Dict[str, str] = {}
    for ax, panel in zip(axes.flat, panels):
        for label, (xs, ys) in panel["series"].items():
            color = colors.setdefault(label, f"C{len(colors) % 10}")
            ax.plot(list(xs), list(ys), lw=1.2, marker=".", ms=3, color=color, label=label)
        for i, (label, y) in enumerate((panel.get("hlines") or {}).items()):
            ax.axhline(y, color="gray", ls=("--", ":", "-.")[i % 3], lw=1, label=label)
        if panel.get("logx"):
            ax.set_xscale("log")
        if panel.get("logy"):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # 3, not 3 x 10^0
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer >= 1")
    return value
