"""The main job: run every benchmark and write one report.

    python -m benchmarks --quick              # small sizes, under 10 minutes on 2 CPU cores
    python -m benchmarks                      # full sizes
    python -m benchmarks --only memory toy    # a subset
    python -m benchmarks --tiny               # seconds: a smoke test of every script

Each benchmark writes its Markdown report and plots into ``<out>/<name>/``;
this runner then writes ``<out>/report.md`` with every report and plot in one
place. A benchmark that fails is reported and the others still run; the exit
status is non-zero if any failed.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
import traceback
from typing import List

BENCHMARKS = ("memory", "speed", "toy", "sinusoid", "digits", "hyper")


def bench_args(name: str, size: str, device: str, out: str) -> List[str]:
    """Command-line arguments for one benchmark's ``main``."""
    folder = os.path.join(out, name)
    args = [] if size == "full" else [f"--{size}"]
    if name == "memory":
        return args + ["--device", device, "--out", os.path.join(folder, "memory.md")]
    if name == "toy":
        return args + ["--out", folder, "--no-progress"]
    return args + ["--device", device, "--out", folder]


def collect(out: str, names: List[str], status: dict) -> str:
    """One Markdown report from the benchmarks' own reports and plots."""
    lines = ["# torch_ufom benchmark report", ""]
    for name in names:
        folder = os.path.join(out, name)
        lines += [f"## {name}", "", f"_{status[name]}_", ""]
        md = os.path.join(folder, f"{name}.md")
        if os.path.exists(md):
            with open(md) as f:
                body = f.read().strip()
            # Demote the benchmark's own headings below this section's, and point
            # its relative image links into its folder.
            body = re.sub(r"!\[([^\]]*)\]\((?!https?:|/)([^)]+)\)", rf"![\1]({name}/\2)", body)
            lines += [("#" + ln) if ln.startswith("#") else ln for ln in body.splitlines()] + [""]
        else:
            pngs = sorted(p for p in os.listdir(folder) if p.endswith(".png"))
            lines += [line for png in pngs for line in (f"![{name}: {png}]({name}/{png})", "")]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the selected benchmarks; return the number that failed."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="size", const="quick",
                      help="small sizes (the main job: under 10 minutes on 2 CPU cores)")
    size.add_argument("--tiny", action="store_const", dest="size", const="tiny",
                      help="the smallest sizes, for a smoke test")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS),
                   metavar="NAME", help=f"benchmarks to run, from: {', '.join(BENCHMARKS)}")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    size_name = args.size or "full"
    os.makedirs(args.out, exist_ok=True)
    status, failed = {}, 0
    for name in args.only:
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
        start = time.perf_counter()
        print(f"== {name} ({size_name}) ==", flush=True)
        try:
            importlib.import_module(f"benchmarks.{name}").main(
                bench_args(name, size_name, args.device, args.out))
            status[name] = f"{size_name} run, {time.perf_counter() - start:.0f} s"
        except SystemExit as e:  # argparse errors and explicit exits
            ok = e.code in (0, None)
            failed += not ok
            status[name] = (f"{size_name} run, {time.perf_counter() - start:.0f} s" if ok
                            else f"FAILED (exit {e.code})")
        except Exception:  # noqa: BLE001 - report and go on with the others
            traceback.print_exc()
            failed += 1
            status[name] = "FAILED: " + traceback.format_exc().strip().splitlines()[-1]
        print(f"-- {name}: {status[name]}", flush=True)
    path = os.path.join(args.out, "report.md")
    with open(path, "w") as f:
        f.write(collect(args.out, args.only, status))
    print(f"report: {path}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
