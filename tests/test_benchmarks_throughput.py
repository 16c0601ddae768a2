"""Smoke test of ``benchmarks/throughput.py`` (the meta-batch and HVP sections of speed.py).

Timings on a shared machine say nothing here; the test checks that every row ran,
that the report carries the targets' lines computed from the samples, and that the
two Hessian-vector products agree in float64.
"""
import re

import pytest


def test_throughput_tiny_reports_every_row():
    from benchmarks import throughput

    raw = throughput.measure("tiny", seed=0, device="cpu", threads=1)
    rows = raw["meta_batch"]
    for mode in ("fom", "ufom", "exact"):
        assert rows[f"{mode}/loop"] and rows[f"{mode}/batch"]
    for model in ("mlp", "sinusoid"):
        assert raw["hvp"][model]["rel_err_float64"] < 1e-10
        assert set(raw["hvp"][model]["times"]) == {"hvp/revrev", "hvp/fwdrev", "step/revrev", "step/fwdrev"}
    text = throughput.report(raw, "cpu")
    ratio = throughput.analyse_meta_batch(rows, "cpu")["speedup"]["exact"]["vs_loop"]
    line = re.search(r"faster than our per-task loop: ([0-9.]+)x", text)
    assert line and float(line.group(1)) == pytest.approx(ratio, abs=0.006)
    assert "HVP revrev" in text


def test_throughput_rejects_bad_arguments(capsys):
    from benchmarks import throughput

    with pytest.raises(SystemExit):
        throughput.parse_args(["--device", "tpu"])
    assert "invalid choice" in capsys.readouterr().err
