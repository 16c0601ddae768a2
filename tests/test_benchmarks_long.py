"""The long-inner-loop benchmarks ``benchmarks/hyper.py`` and ``benchmarks/speed.py``, at tiny sizes.

Each runs its ``main(["--tiny", ...])`` and checks the data it returns and
writes (JSON), not the reports' wording; tiny runs on a shared machine say
nothing about speed or memory, except that the exact hypergradients of the
methods that compute them agree.
"""
import importlib.util
import json

import pytest

pytestmark = pytest.mark.slow  # benchmark runs

pytest.importorskip("matplotlib")


def test_hyper_tiny(tmp_path):
    pytest.importorskip("sklearn")
    from benchmarks import hyper

    data = hyper.main(["--tiny", "--out", str(tmp_path), "--no-progress"])
    assert (tmp_path / "hyper.png").stat().st_size > 1000
    assert json.loads((tmp_path / "hyper.json").read_text())["runs"].keys() == data["runs"].keys()
    runs = data["runs"]
    for method in ("ufom", "exact", "fom"):
        r = runs[f"{method}/8"]
        assert len(r["val"]) == len(r["wall"]) == 3  # 2 outer steps: start, after 1, after 2
        assert r["peak_mb"] >= 0 and len(r["truncations"]) == 2
    assert runs["exact/8"]["hypergrad_vs_exact"] == 0.0
    assert runs["fom/8"]["hypergrad_vs_exact"] > 1e-3  # fom's bias
    for peer in ("higher", "torch_maml"):
        if importlib.util.find_spec(peer) is None:
            assert f"{peer}/8" not in runs
            continue
        assert runs[f"{peer}/8"]["hypergrad_vs_exact"] < 1e-4  # float32 round-off
    assert data["targets"][0]["holds"] is None  # steps=1000 is not run by --tiny


def test_speed_tiny(tmp_path):
    import statistics

    from benchmarks import speed

    data = speed.main(["--tiny", "--out", str(tmp_path), "--no-progress"])
    assert (tmp_path / "speed.png").stat().st_size > 1000
    results = data["results"]
    assert set(results) == {"sinusoid/2", "sinusoid/4", "conv4/1"}
    for key in ("sinusoid/2", "sinusoid/4"):
        r = results[key]
        assert r["micro"]["t_grad"] > 0 and r["micro"]["t_hvp"] > 0
        rows = r["rows"]
        for row in ("inplace/-", "fom/-", "ufom/checkpoint", "ufom/store", "ufom/recompute",
                    "exact/checkpoint", "exact/store", "exact/recompute"):
            assert rows[row]["cpu"] > 0 and rows[row]["vs_floor"] > 0
        assert rows["fom/-"]["vs_fom"] == pytest.approx(1.0)
        assert rows["inplace/-"]["vs_inplace"] == pytest.approx(1.0)
    assert set(results["conv4/1"]["rows"]) == {"inplace/-", "fom/-"} and data["conv4_steps"] == 1
    paths = data["throughput_raw"]["conv4_path"]
    assert set(paths) == {"fom/batch", "exact/batch"}
    # item 1 on conv4 is evaluated at the steps run (1 here): fom's median CPU time over the loop's
    raw = data["raw"]["conv4/1"]
    ratio = (statistics.median(t[1] for t in raw["fom/-"]["times"])
             / statistics.median(t[1] for t in raw["inplace/-"]["times"]))
    targets = {t["name"]: t for t in data["targets"]}
    assert targets["item 1: fom cpu time / inplace (conv4/1)"]["value"] == pytest.approx(ratio)
    # the others need steps 5, 20, 100 on the mlp and meta-batches of 32 and 16 tasks: not run by --tiny
    held = [t["holds"] for t in data["targets"] if t["name"].startswith("item")]
    assert len(held) == 12 and held.count(None) == 11


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
