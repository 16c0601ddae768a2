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
        assert path.startswith(("vectorised", "per-task loop: "))
    for model in ("mlp", "sinusoid"):
        assert raw["hvp"][model]["rel_err_float64"] < 1e-10
        assert set(raw["hvp"][model]["times"]) == {"hvp/revrev", "hvp/fwdrev", "step/revrev", "step/fwdrev"}
    assert set(raw["meta_batch_path"]) == {"fom/batch", "ufom/batch", "exact/batch"}
    paths = raw["meta_batch_path"].values()
    assert all(p.startswith(("vectorised", "per-task loop: ")) for p in paths)
    a = throughput.analyse(raw, "cpu")
    ratio = {}
    cases = (("meta_batch", "fom"), ("meta_batch", "exact"), ("conv4", "fom"), ("conv4", "exact"))
    for section, mode in cases:
        loop = statistics.median(s[1] for s in raw[section][f"{mode}/loop"])
        batch = statistics.median(s[1] for s in raw[section][f"{mode}/batch"])
        ratio[section, mode] = loop / batch
        assert a[section]["batch_vs_loop"][mode] == pytest.approx(loop / batch)
    item5 = [t for t in a["targets"] if t.name.startswith("item 5")]
    assert len(item5) == 4 and all(t.value is None for t in item5)  # tiny meta-batches: not evaluated
    # at the meta-batch sizes the same samples give the targets (>= 5x sinusoid, >= 0.95x conv4)
    a = throughput.analyse({**raw, "tasks": 32, "conv4_tasks": 16}, "cpu")
    item5 = [t for t in a["targets"] if t.name.startswith("item 5")]
    expected = [ratio[c] for c in cases]
    assert [t.value for t in item5] == pytest.approx(expected)
    assert [t.holds for t in item5] == [r >= lim for r, lim in zip(expected, (5, 5, 0.95, 0.95))]


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


def test_the_path_comes_from_the_results():
    from types import SimpleNamespace

    from benchmarks import throughput

    def batch():
        import warnings
        warnings.warn("MetaOptimizer.backward_batch runs the per-task loop: no batching rule", stacklevel=1)
        return [SimpleNamespace(batch_path="per-task loop: no batching rule")]

    paths = throughput.warm_up({"fom/batch": batch, "fom/loop": lambda: None})
    assert paths == {"fom/batch": "per-task loop: no batching rule"}


def test_throughput_rejects_bad_arguments():
    from benchmarks import throughput

    with pytest.raises(SystemExit) as exc:
        throughput.main(["--device", "tpu"])
    assert exc.value.code == 2
