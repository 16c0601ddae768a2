"""The benchmarks' shared base: command line, timing, peak memory, fresh processes, reports, plots.

One timing path: :func:`interleave` runs rows round-robin, so that background load hits all alike.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

MB = 2 ** 20  # one MiB: the reports give memory in MiB
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- command line --------------------------------------------------------------------------
def _number(cast: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse type: ``cast(text)``, refused unless ``ok``; the message says what was ``expected``."""
    def parse_number(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {expected}")
        return value
    return parse_number


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a number > 0")
probability = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")  # UFOM's q


def add_sizes(p: argparse.ArgumentParser, sizes: Mapping[str, str]) -> None:
    """``--quick`` / ``--tiny`` (``args.size``, default ``"full"``; help from ``sizes``) and ``--device``."""
    size = p.add_mutually_exclusive_group()
    for s in ("quick", "tiny"):
        size.add_argument(f"--{s}", dest="size", action="store_const", const=s, help=sizes[s])
    p.set_defaults(size="full")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")


def parser(name: str, doc: str, sizes: Mapping[str, str]) -> argparse.ArgumentParser:
    """The options every benchmark shares; ``sizes`` describes ``quick`` and ``tiny`` for ``--help``."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc.splitlines()[0])
    add_sizes(p, sizes)
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default 1: steadier timings on a shared machine)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--out", default=os.path.join("results", name),
                   help=f"output folder (default results/{name})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse(p: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse ``argv``; reject an unavailable CUDA device; add ``argv``, ``start`` and ``basis``, the clock
    of ratios and targets: process CPU time on the CPU (descheduled time does not count), wall on CUDA."""
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda is not available in this torch build / machine")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.basis = "cpu" if args.device == "cpu" else "wall"
    args.start = time.perf_counter()
    return args


def choose(p: argparse.ArgumentParser, flag: str, text: str, known: Mapping[str, Any]) -> List[Any]:
    """The values of ``known`` named in the comma-separated ``text``, in order and without repeats;
    otherwise a usage error of ``flag`` that lists the names ``known`` accepts."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in known]
    if bad or not names:
        p.error(f"argument {flag}: invalid choice(s) {bad or [text]} "
                f"(choose from {', '.join(map(repr, known))})")
    return list(dict.fromkeys(known[s] for s in names))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``torch.set_num_threads(n)``, restoring the count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- timing --------------------------------------------------------------------------------
class Sample(NamedTuple):
    """One timed call: wall-clock seconds and this process's CPU seconds."""

    wall: float
    cpu: float


def sync(device: str) -> None:
    """Wait for queued CUDA work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn: Callable[[], Any], device: str = "cpu") -> Sample:
    """Time one call of ``fn``."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return Sample(time.perf_counter() - wall, time.process_time() - cpu)


def micro(fn: Callable[[], Any], number: int) -> Sample:
    """Per-call time of ``number`` calls by ``torch.utils.benchmark.Timer`` (wall; CPU by process time)."""
    import torch.utils.benchmark as tbench
    wall = tbench.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    cpu = tbench.Timer("fn()", globals={"fn": fn}, timer=time.process_time,
                       num_threads=torch.get_num_threads())
    return Sample(wall.timeit(number).median, cpu.timeit(number).median)


def interleave(rows: Mapping[str, Callable[[], Any]], rounds: int, device: str = "cpu",
               per_round: Optional[Mapping[str, int]] = None, micro_rows: Optional[Mapping[str, int]] = None,
               min_seconds: float = 0.0) -> Dict[str, List[Sample]]:
    """Time ``rows`` round-robin, ``rounds`` rounds and more until ``min_seconds`` passed; return each
    row's samples. A round calls every row once (``per_round[name]`` times where given), call by call:
    its ``i``-th pass calls each row that has an ``i``-th call, in the rows' order where ``i`` plus the
    round's index is even and in reverse where it is odd, so that rows with the same count alternate
    (A B, B A, ...; one call per round: A B in even rounds, B A in odd ones) and the ``k``-th calls of
    two such rows ran next to each other. A row in ``micro_rows`` gives one :func:`micro`
    sample of that many calls (sub-millisecond rows), in the first pass."""
    per_round, micro_rows = per_round or {}, micro_rows or {}
    times: Dict[str, List[Sample]] = {name: [] for name in rows}
    order = list(rows)
    passes = max([per_round.get(name, 1) for name in order] + [1])
    start, done = time.perf_counter(), 0
    while done < rounds or time.perf_counter() - start < min_seconds:
        for i in range(passes):
            for name in (order if (i + done) % 2 == 0 else order[::-1]):
                if name in micro_rows:
                    if i == 0:
                        times[name].append(micro(rows[name], micro_rows[name]))
                elif i < per_round.get(name, 1):
                    times[name].append(clock(rows[name], device))
        done += 1
    return times


def stats(samples: Sequence[Sequence[float]]) -> Dict[str, Any]:
    """Median and inter-quartile range of each clock: ``{"wall", "cpu", "wall_iqr", "cpu_iqr", "n"}``."""
    out: Dict[str, Any] = {"n": len(samples)}
    for i, name in enumerate(("wall", "cpu")):
        xs = [s[i] for s in samples]
        out[name] = statistics.median(xs)
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0], xs[0], xs[0]]
        out[f"{name}_iqr"] = [q[0], q[2]]
    return out


T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: Iterable[float], student: bool = False) -> Tuple[float, float]:
    """Mean and half-width of a 95 % interval, normal or Student's t (``student``); 0 for one value."""
    xs = [float(v) for v in values]
    if len(xs) < 2:
        return statistics.fmean(xs), 0.0
    z = T95.get(len(xs) - 1, 1.96) if student else 1.96
    return statistics.fmean(xs), z * statistics.stdev(xs) / len(xs) ** 0.5


def paired_ratio(a: Mapping[str, Any], b: Mapping[str, Any], basis: str) -> Tuple[float, float, float]:
    """``(median, q1, q3)`` of ``a``'s time over ``b``'s, paired where they ran side by side: rows
    with the same number of calls per round (:func:`interleave` alternates them call by call) pair
    their ``k``-th calls of each round; otherwise each row's median within the round pairs with the
    other's. Paired rows share whatever load their moment had, so the ratio does not move when the
    machine slows down. ``a`` and ``b``: a row's ``{"times", "per_round"}`` from
    :func:`benchmarks.memory.time_rows`."""
    i = ("wall", "cpu").index(basis)
    n, m = a.get("per_round", 1), b.get("per_round", 1)

    def rounds(r, k):
        xs = [t[i] for t in r["times"]]
        return [statistics.median(xs[j:j + k]) for j in range(0, len(xs) - k + 1, k)]

    if n == m:  # call by call
        ratios = [x[i] / y[i] for x, y in zip(a["times"], b["times"])]
    else:
        ratios = [x / y for x, y in zip(rounds(a, n), rounds(b, m))]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return statistics.median(ratios), q[0], q[2]


def spread(s: Mapping[str, Any], basis: str) -> str:
    """``"+-12%"``: half the inter-quartile range of ``basis`` relative to its median."""
    lo, hi = s[f"{basis}_iqr"]
    return f"+-{50 * (hi - lo) / s[basis]:.0f}%" if s[basis] > 0 else "-"


def keep_freed_memory() -> None:
    """Keep freed memory in the process (glibc: no heap trimming, blocks up to 32 MiB from the heap; a
    no-op elsewhere), so that no timed row pays page faults for memory the previous call gave back (their
    count varied between identical runs: docs/benchmarks.md). PyTorch's CPU tuning guide recommends a
    caching allocator for the same reason."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (its largest value)


# -- peak memory ---------------------------------------------------------------------------
def current_rss() -> int:
    """The resident set size of this process now, in bytes (``psutil`` where ``/proc`` is missing)."""
    if not os.path.exists("/proc/self/statm"):
        import psutil
        return psutil.Process().memory_info().rss
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm() -> Optional[int]:
    """``VmHWM`` in bytes (Linux, else ``None``): unlike ``ru_maxrss``, nothing inherited, and resettable."""
    try:
        with open("/proc/self/status") as f:
            return next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:")), None)
    except OSError:
        return None


def _reset_peak() -> bool:
    """Return freed heap to the OS and reset ``VmHWM``; ``False`` where the reset is unavailable."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _vm_hwm() is not None
    except OSError:
        return False


class PeakMemory:
    """The peak memory of the enclosed code above the memory in use on entry (CUDA: allocated; CPU:
    RSS, ``VmHWM`` reset on entry, else ``ru_maxrss``). Measure in a fresh process.

    Attributes (set on exit):
        peak_bytes: the peak above the entry level, in bytes.
        exact: ``False`` when the result is only an upper bound (``ru_maxrss`` above the entry RSS).
    """

    def __init__(self, device: str = "cpu"):
        self.device, self.cuda = device, torch.device(device).type == "cuda"
        self.peak_bytes, self.exact = 0, True

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._hwm = _reset_peak()
            self._base = current_rss()
            self.exact = self._hwm or self._maxrss() <= self._base
        return self

    @staticmethod
    def _maxrss() -> int:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _vm_hwm() if self._hwm else self._maxrss()
        self.peak_bytes = max(0, peak - self._base)


# -- fresh processes -----------------------------------------------------------------------
class FreshProcessError(RuntimeError):
    """A measurement in a fresh process failed; the message ends with its stderr."""


def run_fresh(module: str, args: Sequence[str]) -> dict:
    """Run ``python -m module *args`` from the repository root; return the JSON of its last stdout line.

    Raises:
        FreshProcessError: the process failed.
    """
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, text=True,
                          capture_output=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise FreshProcessError(f"python -m {module} {' '.join(args)} exited with {proc.returncode}:\n"
                                + proc.stderr[-4000:])
    return json.loads(lines[-1])


def run_fresh_many(module: str, arg_lists: Sequence[Sequence[str]], workers: int = 1,
                   desc: str = "", show: bool = True) -> List[dict]:
    """:func:`run_fresh` per argument list, ``workers`` at a time (not for timings), results in order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_fresh, module, a) for a in arg_lists]
        return [f.result() for f in progress(futures, desc, show)]


def worker_args(spec: Mapping[str, Any]) -> List[str]:
    """The command line of a worker process: ``--worker`` and ``spec`` as JSON (the benchmark parses it)."""
    return ["--worker", json.dumps(spec)]


def progress(items: Sequence[Any], desc: str = "", show: bool = True) -> Iterable[Any]:
    """``items`` (futures waited for, in order) with a ``tqdm`` bar on stderr when ``show`` and installed."""
    def wait(xs):
        for x in xs:
            if hasattr(x, "result"):
                x.result()
            yield x
    try:
        from tqdm import tqdm
    except ImportError:
        show = False
    if not show:
        return wait(items)
    return tqdm(wait(items), desc=desc, total=len(items), file=sys.stderr, leave=False, mininterval=0.5)


# -- reports -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A target of the project: ``value op limit`` (``op``: ``"<="``, ``">="`` or ``"in"`` with
    ``limit = (low, high)``, low excluded); ``value`` ``None``: not evaluated (rows not run)."""

    name: str
    value: Optional[float]
    limit: Any
    op: str = "<="

    @property
    def holds(self) -> Optional[bool]:
        """Whether the target holds; ``None`` when not evaluated."""
        if self.value is None:
            return None
        if self.op == "in":
            return self.limit[0] < self.value <= self.limit[1]
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    @property
    def text(self) -> str:
        """``"<name> <value> <op> <limit>: holds|MISSED"`` (or ``not evaluated``)."""
        if self.value is None:
            return f"{self.name}: not evaluated (rows not run)"
        limit = f"({self.limit[0]:g}, {self.limit[1]:g}]" if self.op == "in" else f"{self.limit:g}"
        return f"{self.name} {self.value:.4g} {self.op} {limit}: {'holds' if self.holds else 'MISSED'}"

    def as_dict(self) -> Dict[str, Any]:
        """The target as JSON-able data, with ``holds`` and ``text``."""
        return {**asdict(self), "holds": self.holds, "text": self.text}


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A GitHub Markdown table; ``align`` has one ``l`` or ``r`` per column (default all ``l``)."""
    rows = [[str(c) for c in r] for r in rows]
    align = align or "l" * len(headers)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w)
                                 for c, w, a in zip(cells, widths, align)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" if a == "r" else "-" * (w + 2)
                          for w, a in zip(widths, align)) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


def fmt(x: Optional[float], spec: str = ".4g", unit: str = "", none: str = "-") -> str:
    """``format(x, spec) + unit``, or ``none`` for ``None``."""
    return none if x is None else f"{x:{spec}}{unit}"


def provenance() -> Dict[str, Any]:
    """What produced a report: the commit of the checkout (``None`` outside git), whether files
    tracked by git differ from it (``dirty``), Python, torch, and the thread settings."""
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=30,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {"commit": commit, "dirty": None if status is None else bool(status),
            "python": sys.version.split()[0], "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "env": env}


def provenance_line(info: Mapping[str, Any]) -> str:
    """:func:`provenance` in one line of Markdown."""
    commit = info["commit"] or "not a git checkout"
    dirty = " (with uncommitted changes to tracked files)" if info["dirty"] else ""
    env = ", ".join(f"{k}={v}" for k, v in info["env"].items() if v is not None) or "no thread variables set"
    return (f"Commit `{commit}`{dirty}; Python {info['python']}, torch {info['torch']}, "
            f"{info['torch_threads']} torch thread(s) in the reporting process, {env}.")


def write_report(args, name: str, template: str, fields: Mapping[str, Any], data: Mapping[str, Any],
                 targets: Sequence[Target] = (), figures: Sequence[str] = ()) -> Dict[str, Any]:
    """Write ``<out>/<name>.md`` (``template`` filled from ``fields``, ``command``, ``torch``, ``device``
    and ``threads``, then the targets, :func:`provenance`, time, load and figures) and
    ``<out>/<name>.json`` (``data``, the targets, the command and the provenance); return the JSON data."""
    os.makedirs(args.out, exist_ok=True)
    command = " ".join([f"python -m benchmarks.{name}"] + args.argv)
    text = template.format(**{**fields, "command": command, "device": args.device, "threads": args.threads,
                              "torch": torch.__version__}).rstrip() + "\n"
    if targets:
        text += "\n" + "\n".join(f"- Target: {t.text}" for t in targets) + "\n"
    seconds, load = time.perf_counter() - args.start, os.getloadavg()
    info = provenance()
    text += f"\n{provenance_line(info)}\n"
    text += f"\nTotal {seconds:.0f} s; load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}.\n"
    text += "".join(f"\n![{os.path.basename(f)}]({os.path.basename(f)})\n" for f in figures)
    out = {"command": command, "size": args.size, "seconds": seconds, "load_average": load,
           "provenance": info, **data,
           "targets": [t.as_dict() for t in targets]}
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(out, f, default=float)
    print(text)
    return out


def plot_panels(path: str, panels: Sequence[Dict[str, Any]], ncols: int = 2, title: str = "",
                panel_size=(5.5, 4.0)) -> str:
    """Save a grid of line plots to ``path`` (PNG); return ``path``. Each panel: ``series`` (``{label:
    (xs, ys)}``, one colour per label across panels) and optional ``styles`` (``{label: line style}``),
    ``title``, ``xlabel``, ``ylabel``, ``logx``, ``logy`` and ``hlines`` (``{label: y}``, grey lines)."""
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
            ax.plot(list(xs), list(ys), lw=1.2, marker=".", ms=3, color=color, label=label,
                    ls=panel.get("styles", {}).get(label, "-"))
        for i, (label, y) in enumerate((panel.get("hlines") or {}).items()):
            ax.axhline(y, color="gray", ls=("--", ":", "-.")[i % 3], lw=1, label=label)
        if panel.get("logx"):
            ax.set_xscale("log")
        if panel.get("logy"):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def first_below(values: Sequence[float], target: float) -> Optional[int]:
    """The first index from which every value is below ``target`` (``None`` if the last one is not)."""
    i = len(values)
    while i and values[i - 1] < target:
        i -= 1
    return i if i < len(values) else None
