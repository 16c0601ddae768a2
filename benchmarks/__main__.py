"""The main job: run every benchmark, each in its own process, and write one report.

    python -m benchmarks [--quick | --tiny] [--only memory toy]   # --quick: the main job

Each benchmark writes its report, JSON and plots into ``<out>/<name>/``; then ``<out>/report.md``
collects them and ``<out>/report.json`` holds each one's exit status, seconds and ``--quick`` budget.
The exit status is the number of benchmarks that failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

from benchmarks.harness import ROOT, add_sizes, provenance, provenance_line

# Each benchmark's --quick budget in seconds on 2 CPU cores (one torch thread each), at most 480 s in
# all: one main-job run on a shared machine, rounded up. The main job runs sinusoid and digits with
# fewer outer steps (QUICK_ARGS), so that their own --quick keeps the figures docs/benchmarks.md quotes.
# memory times exact at steps=1000 (store and the default checkpointing) for issue 13's rows; memory and
# speed time their targets' pairs of rows 3 times per round.
BUDGETS = {"memory": 140, "speed": 120, "toy": 43, "sinusoid": 45, "digits": 34, "hyper": 52,
           "fewshot": 31, "toy_q": 15}
QUICK_ARGS = {"sinusoid": ["--iters", "100", "--eval-every", "20"],
              "digits": ["--iters", "50", "--eval-every", "10"]}
BENCHMARKS = tuple(BUDGETS)


def collect(out: str, names, status: dict, source: str = "") -> str:
    """One Markdown report from the benchmarks' own reports, image links pointed into their folders;
    ``source``: what produced it (:func:`~benchmarks.harness.provenance_line`)."""
    lines = ["# torch_ufom benchmark report", ""] + ([source, ""] if source else [])
    for name in names:
        lines += [f"## {name}", "", f"_{status[name]['text']}_", ""]
        md = os.path.join(out, name, f"{name}.md")
        if os.path.exists(md):
            with open(md) as f:
                text = f.read().strip()
            body = re.sub(r"!\[([^\]]*)\]\((?!https?:|/)([^)]+)\)", rf"![\1]({name}/\2)", text)
            lines += [("#" + ln) if ln.startswith("#") else ln for ln in body.splitlines()] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the selected benchmarks; return the number that failed."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    add_sizes(p, {"quick": f"the main job: budgets {BUDGETS} s on 2 CPU cores", "tiny": "a smoke test"})
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), metavar="NAME",
                   help=f"benchmarks to run, from: {', '.join(BENCHMARKS)}")
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    size, status, failed = args.size, {}, 0
    os.makedirs(args.out, exist_ok=True)
    for name in args.only:
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--device", args.device, "--no-progress",
               "--out", os.path.abspath(os.path.join(args.out, name))]
        cmd += [] if size == "full" else [f"--{size}"] + (QUICK_ARGS.get(name, []) if size == "quick" else [])
        print(f"== {name} ({size}) ==", flush=True)
        start = time.perf_counter()
        code = subprocess.run(cmd, cwd=ROOT, check=False).returncode
        seconds = time.perf_counter() - start
        failed += code != 0
        text = (f"{size} run, {seconds:.0f} s" + (f" (budget {BUDGETS[name]} s)" if size == "quick" else "")
                if code == 0 else f"FAILED (exit status {code}) after {seconds:.0f} s")
        status[name] = {"exit_status": code, "seconds": seconds, "budget_s": BUDGETS[name],
                        "over_budget": size == "quick" and seconds > BUDGETS[name], "text": text}
        print(f"-- {name}: {text}", flush=True)
    info = provenance()
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(collect(args.out, args.only, status, provenance_line(info)))
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump({"size": size, "provenance": info, "benchmarks": status}, f, indent=1)
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
