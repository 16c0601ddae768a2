"""Smoke tests of the memory benchmark and of the main-job runner (``python -m benchmarks``)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def test_memory_tiny_measures_every_row(tmp_path):
    from benchmarks import memory

    out = tmp_path / "memory.md"
    memory.main(["--tiny", "--out", str(out)])
    text = out.read_text()
    for row in ("plain FO loop", "higher", "fom", "ufom (q=0.1)", "exact"):
        assert f"| {row} " in text, row
    for setting in ("checkpoint", "recompute", "store"):
        assert f"| {setting} " in text, setting
    assert "error" not in text.lower()


def test_runner_writes_one_report_with_working_image_links(tmp_path):
    from benchmarks.__main__ import main

    assert main(["--tiny", "--only", "sinusoid", "toy", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "## sinusoid" in report and "## toy" in report and "tiny run" in report
    links = [ln.split("](", 1)[1].rstrip(")") for ln in report.splitlines() if ln.startswith("![")]
    assert links and all((tmp_path / link).is_file() for link in links)
