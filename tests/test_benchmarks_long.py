"""The long-inner-loop benchmarks ``benchmarks/hyper.py`` and ``benchmarks/speed.py``, at tiny sizes.

Each runs its ``main(["--tiny", ...])`` and checks the data it returns and
writes (JSON), not the reports' wording; tiny runs on a shared machine say
nothing about speed or memory, except that the exact hypergradients of the
methods that compute them agree.
"""
import importlib.util
import json

import pytest
import torch

pytestmark = pytest.mark.slow  # benchmark runs

import matplotlib  # noqa: E402,F401  (the test extra: a missing one fails, not skips)
import sklearn  # noqa: E402,F401


def test_hyper_tiny(tmp_path):
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
    # the conv4 ratio item 1 reads: the median of fom's CPU time over the loop's, call by call (both rows
    # run as many calls per round, alternated)
    raw = data["raw"]["conv4/1"]
    assert raw["fom/-"]["per_round"] == raw["inplace/-"]["per_round"] > 1
    ratio = statistics.median(a[1] / b[1] for a, b in zip(raw["fom/-"]["times"], raw["inplace/-"]["times"]))
    assert results["conv4/1"]["rows"]["fom/-"]["vs_inplace"] == pytest.approx(ratio)
    targets = speed.targets(dict(results, **{"conv4/20": results["conv4/1"]}), "cpu", 20)
    assert next(t for t in targets if "conv4/20" in t.name).value == pytest.approx(ratio)
    # every target needs what --tiny does not run: steps 5, 20, 100 on the mlp, conv4 at 100 (--quick: 20)
    # steps (review s32K F1: conv4 at 1 step was judged), meta-batches of 32 and 16 tasks
    held = [t["holds"] for t in data["targets"] if t["name"].startswith("item")]
    assert len(held) == 12 and held.count(None) == 12
    assert all(t["holds"] is None for t in data["targets"])


def test_the_floor_counts_each_step_once():
    """speed.py's floor: t_grad per first-order step, t_hvp per exact step (its forward, its gradient
    with a graph and the backward through it), one t_grad for the query; ufom's expectation."""
    from benchmarks import memory, speed

    assert speed.floor("fom", 10, 1.0, 3.0) == speed.floor("inplace", 10, 1.0, 3.0) == 11.0
    for method in ("exact", "higher", "unroll"):
        assert speed.floor(method, 10, 1.0, 3.0) == 31.0
    q = memory.Q
    assert speed.floor("ufom", 10, 1.0, 3.0) == pytest.approx(10 * ((1 - q) + q * 3.0) + 1.0)


def test_ufom_rows_summarise_the_rounds():
    """A ufom row's expectation takes its first-order draws from the rounds only (its extra draws
    after them ran at another moment than the other rows) and its exact draws from all."""
    from benchmarks import memory

    at = 4
    times = [[0.0, 2.0]] * 4 + [[0.0, 10.0]] + [[0.0, 1.0]] * 5  # 5 in the rounds, then faster extras
    ks = [0, 0, 0, 0, at, 0, 0, 0, 0, at]
    times[-1] = [0.0, 20.0]
    s = memory.summarise("ufom/store", at, {"times": times, "truncations": ks, "in_rounds": 5,
                                            "fwd": [0] * 10, "rev": [0] * 10})
    assert s["cpu"] == pytest.approx((1 - memory.Q) * 2.0 + memory.Q * 15.0)
    assert s["n"] == 5 and s["n_exact"] == 2 and s["raw_cpu"] == pytest.approx(18.0 / 5)


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


def test_paired_ratio_follows_the_rounds_not_the_drift():
    """Rows with different calls per round: the median of per-round ratios (each row's median in
    the round); a machine that slows down between rounds moves both rows alike and leaves the ratio."""
    from benchmarks.harness import paired_ratio

    slow = [1.0, 1.0, 3.0, 3.0, 3.0]  # the machine slows down 3x after two rounds
    a = {"times": [[0.0, 1.2 * x] for x in slow], "per_round": 1}
    b = {"times": [[0.0, x] for x in slow for _ in range(3)], "per_round": 3}
    b["times"][1][1] = 100.0  # one outlier call in the first round
    median, q1, q3 = paired_ratio(a, b, "cpu")
    assert median == pytest.approx(1.2) and q1 == pytest.approx(1.2) and q3 == pytest.approx(1.2)
    # one round where a neighbour's load fell on one row only moves a quartile, not the median
    a["times"][2][1] = 1.2
    median, q1, q3 = paired_ratio(a, b, "cpu")
    assert median == pytest.approx(1.2) and q1 == pytest.approx(0.8)


def test_paired_ratio_pairs_calls_that_ran_side_by_side():
    """Rows with as many calls per round pair call by call: load that changes from one call to
    the next (within a round) moves both calls of a pair alike."""
    from benchmarks.harness import paired_ratio

    load = [1.0, 3.0, 1.0, 2.0, 5.0, 1.0]  # per pair of calls: 2 rounds of 3 calls
    a = {"times": [[0.0, 1.1 * x] for x in load], "per_round": 3}
    b = {"times": [[0.0, x] for x in load], "per_round": 3}
    assert paired_ratio(a, b, "cpu") == pytest.approx((1.1, 1.1, 1.1))
    # two of a's calls swapped within round 1: the rounds' medians would not notice; the pairs show
    # it in the quartiles, not the median
    a["times"][0][1], a["times"][1][1] = a["times"][1][1], a["times"][0][1]
    median, q1, q3 = paired_ratio(a, b, "cpu")
    assert median == pytest.approx(1.1) and q3 > 1.5


def test_interleave_alternates_the_rows_call_by_call():
    from benchmarks.harness import interleave

    calls = []
    rows = {name: (lambda name=name: calls.append(name)) for name in "ABC"}
    times = interleave(rows, 2, per_round={"A": 3, "B": 3})
    # C runs once per round, in the first pass; A and B alternate: A B C, B A, A B; the next round
    # starts the other way round, so that a row with one call per round leads every other round
    assert calls == ["A", "B", "C", "B", "A", "A", "B"] + ["C", "B", "A", "A", "B", "B", "A"]
    assert [len(times[n]) for n in "ABC"] == [6, 6, 2]


def test_the_unroll_row_computes_what_higher_and_exact_do():
    """speed.py's hand-written exact unroll is an exact hypergradient (float32 round-off)."""
    from benchmarks import memory

    prob = memory.problem("sinusoid", 0, "cpu")
    unroll = memory.outer_step("unroll", "-", 4, prob)()
    higher = memory.outer_step("higher", "-", 4, prob)()
    model = prob[0]
    model.zero_grad(set_to_none=True)
    memory.outer_step("exact", "store", 4, prob)()
    exact = [p.grad for p in model.parameters()]
    for a, b, c in zip(unroll, higher, exact):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6) and torch.allclose(a, c, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule", ["momentum", "adam"])
def test_the_inplace_rule_rows_compute_what_fom_does(rule):
    """memory.py's inplace+rule rows (torch.optim's rule) compute fom+rule's hypergradient."""
    from benchmarks import memory

    prob = memory.problem("sinusoid", 0, "cpu")
    inplace = memory.outer_step(f"inplace+{rule}", "-", 4, prob)()
    model = prob[0]
    model.zero_grad(set_to_none=True)
    memory.outer_step(f"fom+{rule}", "-", 4, prob)()
    for a, p in zip(inplace, model.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-6)


def test_the_higher_momentum_row_computes_what_exact_does():
    """memory.py's higher+momentum row is exact+momentum's hypergradient (higher's Adam places eps
    differently, so only its time is compared)."""
    from benchmarks import memory

    prob = memory.problem("sinusoid", 0, "cpu")
    peer = memory.outer_step("higher+momentum", "-", 4, prob)()
    model = prob[0]
    model.zero_grad(set_to_none=True)
    memory.outer_step("exact+momentum", "store", 4, prob)()
    for a, p in zip(peer, model.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-6)
