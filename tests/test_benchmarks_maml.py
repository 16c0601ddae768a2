"""Smoke tests of the MAML benchmarks (``benchmarks/sinusoid.py``, ``benchmarks/digits.py``).

Each script's ``main(["--tiny", ...])`` runs a few outer steps of every
method and must write its Markdown report, plots and CSV; a missing optional
peer (higher, torchopt) must skip its row with a note, and an unknown value
must be an argparse usage error that lists the accepted values.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import digits, maml_common, sinusoid  # noqa: E402


def test_sinusoid_tiny_writes_its_report(tmp_path):
    out = sinusoid.main(["--tiny", "--out", str(tmp_path)])
    for name in ("sinusoid.md", "sinusoid_steps.png", "sinusoid_time.png", "sinusoid.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    text = (tmp_path / "sinusoid.md").read_text()
    assert "meta-test MSE" in text and "| exact " in text
    summary = out["summary"]
    for label in ("fom", "ufom q=0.1", "exact"):
        assert summary[label]["final_mse"] > 0
    if "higher" in summary:
        # float64, same seeds: exact and higher's MAML follow the same trajectory.
        assert abs(summary["exact"]["vs_higher"]) < 1e-6
        assert [text for text, _ in out["checks"]]


def test_digits_tiny_writes_its_report(tmp_path):
    out = digits.main(["--tiny", "--out", str(tmp_path)])
    for name in ("digits.md", "digits.png", "digits.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    text = (tmp_path / "digits.md").read_text()
    assert "## 3-way 1-shot" in text and "## 3-way 5-shot" in text
    for setting in out["settings"].values():
        for label in ("fom", "ufom q=0.1", "exact"):
            assert 0.0 <= setting["summary"][label]["final_acc"] <= 1.0


def test_missing_peer_is_skipped_with_a_note(tmp_path, monkeypatch):
    real = maml_common.available
    monkeypatch.setattr(maml_common, "available", lambda kind: kind != "higher" and real(kind))
    out = sinusoid.main(["--tiny", "--methods", "fom,higher", "--out", str(tmp_path),
                         "--no-progress"])
    assert "higher" not in out["summary"] and "fom" in out["summary"]
    assert out["skipped"] == ["higher: skipped (higher is not installed)"]
    assert "higher: skipped" in (tmp_path / "sinusoid.md").read_text()


@pytest.mark.parametrize("module, argv, accepted", [
    (sinusoid, ["--methods", "fom,maml"], "'ufom q=0.1'"),
    (sinusoid, ["--dtype", "float16"], "float64"),
    (digits, ["--device", "tpu"], "cuda"),
    (digits, ["--model", "resnet"], "cnn"),
])
def test_unknown_values_are_usage_errors(module, argv, accepted, capsys):
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    assert exc.value.code == 2
    assert accepted in capsys.readouterr().err
