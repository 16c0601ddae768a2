"""The memory benchmark and the main-job runner (``python -m benchmarks``), at tiny sizes.

They check the data the benchmarks write (JSON), not the reports' wording.
"""
import json

import pytest

pytestmark = pytest.mark.slow  # benchmark runs (subprocesses, memory)

import matplotlib  # noqa: E402,F401  (the test extra: a missing one fails, not skips)


def test_memory_tiny_measures_every_row(tmp_path):
    from benchmarks import memory

    data = memory.main(["--tiny", "--out", str(tmp_path), "--no-progress"])
    assert json.loads((tmp_path / "memory.json").read_text())["rows"] == data["rows"]
    rows = data["rows"]
    short = {"inplace/-@2", "higher/-@2", "fom/-@2", "ufomK/store@2", "ufomK/checkpoint@2"}
    short |= {f"{r}@2" for r in memory.ITEM_3_ROWS}
    short |= {f"{m}/{s}@2" for m in ("ufom", "exact") for s in memory.MEMORIES}
    short |= {f"{m}+{rule}/store@2" for rule in memory.RULES for m in ("exact", "ufomK")}
    short |= {f"{m}+{rule}/-@2" for rule in memory.FOM_RULES for m in ("inplace", "fom", "higher")}
    budgets = {f"exact/{b}@3" for b in ("store", memory.DEFAULT_MEMORY, *memory.OTHER_BUDGETS)}
    assert set(rows) == short | budgets
    for key, r in rows.items():
        assert r["wall"] > 0 and r["cpu"] > 0 and r["peak_mb"] >= 0, key
        if not r.get("one_call"):  # --tiny times the other budgets by one call in their peak process
            lo, hi = r["cpu_iqr"]
            assert lo <= hi
    assert {k for k, r in rows.items() if r.get("one_call")} == {f"exact/{b}@3" for b in memory.OTHER_BUDGETS}
    for s in memory.MEMORIES:  # ufom: the expectation over both branches, from draws that took both
        assert rows[f"ufom/{s}@2"]["expected"] and rows[f"ufom/{s}@2"]["n_exact"] >= 1
    # the samples kept: ufom's first-order draws of the rounds against fom's (its extra rounds after
    # them ran beside calls of fom that are not fom's samples)
    samples = data["samples"]
    fom = samples["fom/-@2"]
    assert fom["in_rounds"] == len(fom["times"]) == len(fom["truncations"])
    for s in memory.MEMORIES:
        u = samples[f"ufom/{s}@2"]
        assert u["in_rounds"] == fom["in_rounds"] <= len(u["times"]) == len(u["truncations"])
        assert u["truncations"].count(2) >= memory.MIN_EXACT
    # item 3's checkpointing pair replays: its forward pass is run again in the sweep
    assert rows["exact/slots8@2"]["fwd"] == rows["exact/store@2"]["fwd"] == 0  # 2 steps fit 8 slots
    for key, r in rows.items():  # ufomK and exact run every inner step with a graph
        if key.startswith(("ufomK", "exact")):
            assert r["rev"] == int(key.split("@")[1]), key
    for rule in memory.FOM_RULES:  # fom with momentum or Adam: a forward pass, no step in reverse
        assert rows[f"fom+{rule}/-@2"]["rev"] == 0 and rows[f"fom+{rule}/-@2"]["fwd"] == 2
    assert [t["holds"] for t in data["targets"]] == [None] * 7  # steps 100 and 1000 are not run by --tiny


def test_memory_targets_follow_from_the_rows():
    from benchmarks import memory

    d = memory.DEFAULT_MEMORY
    row = {"cpu": 1.0, "peak_mb": 10.0}
    short = ("fom/-", f"ufom/{d}") + memory.ITEM_3_ROWS
    results = {f"{r}@{memory.AT}": dict(row) for r in short}
    results |= {f"exact/{m}@{memory.LONG}": dict(row) for m in ("store", d)}
    results[f"ufomK/store@{memory.AT}"].update(cpu=1.02, peak_mb=10.6)  # time holds, peak does not
    results[f"ufom/{d}@{memory.AT}"]["cpu"] = 1.4
    results[f"exact/{d}@{memory.LONG}"].update(cpu=1.9, peak_mb=2.0)
    got = [(t.value, t.holds) for t in memory.targets(results, "cpu")]
    assert got == [(pytest.approx(1.02), True), (pytest.approx(1.06), False), (1.0, True), (1.0, True),
                   (pytest.approx(1.4), False), (pytest.approx(0.2), True), (pytest.approx(1.9), True)]


def test_memory_table_compares_rule_rows_only_with_peers_that_compute_the_same():
    # Review s32K F2: higher's Adam (eps before the bias correction) is another update with another
    # hypergradient, and no peer learns the rates of the +lr rows: their / higher (and +lr's / inplace)
    # cells are n/a; momentum's are ratios.
    from benchmarks import memory

    row = {"wall": 1.0, "cpu": 1.0, "cpu_iqr": [1.0, 1.0], "peak_mb": 10.0, "peak_exact": True}
    names = ["higher/-", "inplace/-", "higher+adam/-", "inplace+adam/-", "higher+momentum/-",
             "inplace+momentum/-", "exact+adam/store", "exact+momentum/store", "exact+lr/store"]
    results = {f"{n}@100": dict(row) for n in names}
    for n in ("exact+adam/store", "exact+momentum/store", "exact+lr/store"):
        results[f"{n}@100"]["cpu"] = 2.0
    short, _ = memory.tables(results, "cpu", 1000)
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[7:9]]
             for line in short.splitlines() if line.startswith("| ") and "@" not in line}
    assert cells["exact+momentum/store"] == ["2.00x", "2.00x"]
    assert cells["exact+adam/store"] == ["n/a", "2.00x"]
    assert cells["exact+lr/store"] == ["n/a", "n/a"]


def test_runner_writes_one_report_with_working_image_links(tmp_path):
    from benchmarks.__main__ import BUDGETS, main

    assert sum(BUDGETS.values()) <= 8 * 60
    assert main(["--tiny", "--only", "sinusoid", "toy", "--out", str(tmp_path)]) == 0
    status = json.loads((tmp_path / "report.json").read_text())["benchmarks"]
    assert set(status) == {"sinusoid", "toy"} and all(s["exit_status"] == 0 for s in status.values())
    report = (tmp_path / "report.md").read_text()
    links = [ln.split("](", 1)[1].rstrip(")") for ln in report.splitlines() if ln.startswith("![")]
    assert len(links) == 2 and all((tmp_path / link).is_file() for link in links)
    for name in status:
        assert json.loads((tmp_path / name / f"{name}.json").read_text())["size"] == "tiny"
    # what produced it: the checkout's commit (CI runs a clone), Python, torch, threads
    import subprocess
    import torch
    from benchmarks.harness import ROOT
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    info = json.loads((tmp_path / "report.json").read_text())["provenance"]
    assert info["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert info["torch"] == torch.__version__ and info["torch_threads"] >= 1
    assert f"Commit `{info['commit'] or 'not a git checkout'}`" in report
    for name in status:
        own = json.loads((tmp_path / name / f"{name}.json").read_text())["provenance"]
        assert own["commit"] == info["commit"]


def test_a_failing_benchmark_fails_the_main_job(tmp_path):
    import torch

    from benchmarks.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert main(["--tiny", "--only", "toy", "--device", "cuda", "--out", str(tmp_path)]) == 1
    status = json.loads((tmp_path / "report.json").read_text())["benchmarks"]
    assert status["toy"]["exit_status"] == 2


def test_memory_time_targets_pair_the_rounds():
    """With the rows' samples, item 3's and 4's time ratios pair the rows round by round,
    and ufom's expectation takes its first-order draws against fom in the same round and its
    exact part from its exact draws and the forced row under the same memory setting."""
    from benchmarks import memory

    d, at, q = memory.DEFAULT_MEMORY, memory.AT, memory.Q
    load = [1.0, 1.0, 3.0, 3.0, 3.0]  # the machine slows down 3x after two rounds

    def row(factor, per_round=1, ks=None):
        times = [[0.0, factor * x] for x in load for _ in range(per_round)]
        return {"times": times, "per_round": per_round, "truncations": ks or [0] * len(times)}

    ks = [0, 0, 0, 0, at, 0, 0, 0, 0, 0]  # ufom: 2 draws per round, one exact draw in round 2
    ufom = row(1.1, 2, ks)
    ufom["times"][4][1] = 5.0  # the exact draw (in round 2)
    samples = {f"fom/-@{at}": row(1.0, 2), f"ufom/{d}@{at}": ufom,
               f"exact/store@{at}": row(1.0), f"ufomK/store@{at}": row(1.02),
               f"exact/slots8@{at}": row(1.0), f"ufomK/slots8@{at}": row(1.2),
               f"ufomK/checkpoint@{at}": row(1.2)}
    results = {k: {"cpu": 1.0, "peak_mb": 10.0} for k in samples}
    got = {t.name.split(" at ")[0]: t.value for t in memory.targets(results, "cpu", samples)}
    assert got["item 3: ufomK/store cpu time / exact/store"] == pytest.approx(1.02)
    assert got["item 3: ufomK/slots8 cpu time / exact/slots8"] == pytest.approx(1.2)
    # first-order draws 1.1x fom in every round; the exact calls over fom's median call (3.0): ufom's
    # exact draw (5.0) pooled with the forced row under the same memory (ufomK/checkpoint: 1.2, 1.2,
    # 3.6, 3.6, 3.6), median 3.6
    assert d == "checkpoint"
    assert got[f"item 4: ufom/{d} (default) cpu time / fom"] == pytest.approx((1 - q) * 1.1 + q * 3.6 / 3.0)
    # without the forced row, the exact draw alone
    del samples[f"ufomK/{d}@{at}"]
    got = {t.name.split(" at ")[0]: t.value for t in memory.targets(results, "cpu", samples)}
    assert got[f"item 4: ufom/{d} (default) cpu time / fom"] == pytest.approx((1 - q) * 1.1 + q * 5.0 / 3.0)
