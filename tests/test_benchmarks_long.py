"""Smoke tests of the long-inner-loop benchmarks: ``benchmarks/hyper.py`` and ``benchmarks/speed.py``.

Each runs its script's ``main(["--tiny", "--out", tmp_path])`` (tiny sizes, in
this process) and checks that it completes, returns its results and writes its
Markdown report and PNG plot. The numbers themselves are not checked (tiny
runs on a shared machine say nothing about speed or memory), except that the
exact hypergradients of the methods that compute them agree.
"""
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytest.importorskip("matplotlib")


def _check_files(out, name):
    report, plot = out / f"{name}.md", out / f"{name}.png"
    assert report.is_file() and plot.is_file()
    assert plot.stat().st_size > 1000
    text = report.read_text()
    assert text.startswith("# ") and "| method" in text and "Target:" in text
    return text


def test_hyper_tiny(tmp_path):
    pytest.importorskip("sklearn")
    from benchmarks import hyper

    res = hyper.main(["--tiny", "--out", str(tmp_path)])
    text = _check_files(tmp_path, "hyper")
    runs = res["runs"]
    for method in ("ufom", "exact", "fom"):
        r = runs[f"{method}/8"]
        assert "error" not in r, r
        assert len(r["val"]) == len(r["wall"]) == 3  # 2 outer steps: start, after 1, after 2
        assert r["peak_mb"] >= 0
    assert runs["exact/8"]["hypergrad_vs_exact"] == 0.0
    for peer in ("higher", "torch_maml"):
        if importlib.util.find_spec(peer) is None:
            assert f"{peer} is not installed" in text
            continue
        assert runs[f"{peer}/8"]["hypergrad_vs_exact"] < 1e-4  # float32 round-off
    assert res["target"]["holds"] is None  # steps=1000 is not run by --tiny
    assert os.path.samefile(res["report"], tmp_path / "hyper.md")


def test_speed_tiny(tmp_path):
    from benchmarks import speed

    res = speed.main(["--tiny", "--out", str(tmp_path)])
    _check_files(tmp_path, "speed")
    results = res["results"]
    assert set(results) == {"sinusoid/2", "sinusoid/4"}
    for r in results.values():
        assert r["micro"]["t_grad"] > 0 and r["micro"]["t_hvp"] > 0
        rows = r["rows"]
        for key in ("fom/checkpoint", "ufom/checkpoint", "ufom/store", "ufom/recompute",
                    "exact/checkpoint", "exact/store", "exact/recompute"):
            assert "error" not in rows[key], rows[key]
            assert rows[key]["cpu"] > 0 and rows[key]["vs_floor"] > 0
        assert rows["fom/checkpoint"]["vs_fom"] == pytest.approx(1.0)
    assert res["target"]["holds"] is None  # mlp at steps=100 is not run by --tiny


def test_bad_arguments_are_usage_errors(capsys):
    from benchmarks import hyper, speed

    for mod, argv in ((hyper, ["--methods", "nope"]), (speed, ["--models", "resnet"]),
                      (speed, ["--device", "tpu"]), (hyper, ["--steps", "0"])):
        with pytest.raises(SystemExit) as exc:
            mod.main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "ufom" in err and "torch_maml" in err  # the accepted methods are listed
    assert "sinusoid" in err and "cuda" in err
