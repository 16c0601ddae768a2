"""``benchmarks/throughput.py`` (the meta-batch, conv4 and HVP sections of speed.py), at tiny sizes.

Timings on a shared machine say nothing here: the test checks that every row
ran, that the conv4 rows report the path ``backward_batch`` took, that the
targets are computed from the samples, and that the two HVPs agree in float64.
"""
import statistics

import pytest
import torch

pytestmark = pytest.mark.slow  # benchmark runs


def test_throughput_tiny_measures_every_row():
    from benchmarks import throughput

    raw = throughput.measure("tiny", seed=0, device="cpu")
    for mode in ("fom", "ufom", "exact"):
        assert raw["meta_batch"][f"{mode}/loop"] and raw["meta_batch"][f"{mode}/batch"]
    for mode in ("fom", "exact"):
        assert raw["conv4"][f"{mode}/loop"] and raw["conv4"][f"{mode}/batch"]
        path = raw["conv4_path"][f"{mode}/batch"]
        assert path == "vectorised" or path.startswith("per-task fallback: ")
    for model in ("mlp", "sinusoid"):
        assert raw["hvp"][model]["rel_err_float64"] < 1e-10
        assert set(raw["hvp"][model]["times"]) == {"hvp/revrev", "hvp/fwdrev", "step/revrev", "step/fwdrev"}
    a = throughput.analyse(raw, "cpu")
    loop = statistics.median(s[1] for s in raw["meta_batch"]["exact/loop"])
    batch = statistics.median(s[1] for s in raw["meta_batch"]["exact/batch"])
    assert a["meta_batch"]["batch_vs_loop"]["exact"] == pytest.approx(loop / batch)
    target = a["targets"][1]
    assert target.value == pytest.approx(loop / batch) and target.holds == (loop / batch >= 2.0)


def test_conv4_is_the_maml_omniglot_network():
    from benchmarks import problems

    for stats in (True, False):
        model = problems.conv4(5, track_running_stats=stats)
        assert model(torch.rand(3, 1, 28, 28)).shape == (3, 5)
        convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
        norms = [m for m in model if isinstance(m, torch.nn.BatchNorm2d)]
        assert len(convs) == len(norms) == 4
        assert all(c.out_channels == 64 and c.padding == (1, 1) for c in convs)
        assert all(n.track_running_stats == stats for n in norms)
        assert (len(list(model.buffers())) > 0) == stats


def test_a_fallback_warning_is_reported_as_the_path():
    from benchmarks import throughput

    def batch():
        import warnings
        warnings.warn("MetaOptimizer.backward_batch runs the per-task loop: no batching rule", stacklevel=1)

    paths = throughput.warm_up({"fom/batch": batch, "fom/loop": lambda: None})
    assert paths == {"fom/batch": "per-task fallback: no batching rule"}


def test_throughput_rejects_bad_arguments():
    from benchmarks import throughput

    with pytest.raises(SystemExit) as exc:
        throughput.main(["--device", "tpu"])
    assert exc.value.code == 2
