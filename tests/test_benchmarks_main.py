"""The memory benchmark and the main-job runner (``python -m benchmarks``), at tiny sizes.

They check the data the benchmarks write (JSON), not the reports' wording.
"""
import json

import pytest

pytestmark = pytest.mark.slow  # benchmark runs (subprocesses, memory)

pytest.importorskip("matplotlib")


def test_memory_tiny_measures_every_row(tmp_path):
    from benchmarks import memory

    data = memory.main(["--tiny", "--out", str(tmp_path), "--no-progress"])
    assert json.loads((tmp_path / "memory.json").read_text())["rows"] == data["rows"]
    rows = data["rows"]
    expected = {"plain/-@2", "higher/-@2"} | {f"{m}/{s}@2" for m in memory.MODES for s in memory.MEMORIES}
    assert set(rows) == expected
    for key, r in rows.items():
        assert r["wall"] > 0 and r["cpu"] > 0 and r["peak_mb"] >= 0, key
        lo, hi = r["cpu_iqr"]
        assert lo <= hi
    for s in memory.MEMORIES:  # ufom: the expectation over both branches, from draws that took both
        assert rows[f"ufom/{s}@2"]["expected"] and rows[f"ufom/{s}@2"]["n_exact"] >= 1
    assert [t["holds"] for t in data["targets"]] == [None] * 5  # steps=100 is not run by --tiny


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


def test_a_failing_benchmark_fails_the_main_job(tmp_path):
    import torch

    from benchmarks.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert main(["--tiny", "--only", "toy", "--device", "cuda", "--out", str(tmp_path)]) == 1
    status = json.loads((tmp_path / "report.json").read_text())["benchmarks"]
    assert status["toy"]["exit_status"] == 2
