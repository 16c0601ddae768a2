"""The MAML benchmarks (``benchmarks/sinusoid.py``, ``benchmarks/digits.py``) at tiny sizes.

Each ``main(["--tiny", ...])`` runs a few outer steps of every method; the
tests check the data it returns and writes (JSON): the summaries follow from
the histories, a missing optional peer is skipped with a note, a library
exception propagates, and an unknown value is an argparse usage error that
lists the accepted values.
"""
import json

import pytest
import torch

import torch_ufom
from benchmarks import digits, harness, maml, problems, sinusoid

pytestmark = pytest.mark.slow  # benchmark runs

import matplotlib  # noqa: E402,F401  (the test extra: a missing one fails, not skips)
import sklearn  # noqa: E402,F401


def test_sinusoid_tiny_summaries_follow_from_the_histories(tmp_path):
    out = sinusoid.main(["--tiny", "--q-study", "--out", str(tmp_path), "--no-progress"])
    assert json.loads((tmp_path / "sinusoid.json").read_text())["summary"].keys() == out["summary"].keys()
    assert (tmp_path / "sinusoid.png").stat().st_size > 1000
    summary, hist, iters = out["summary"], out["histories"], out["iters"]
    for m in maml.Q_STUDY:  # --q-study adds these rows
        assert m.label in summary, m.label
    for label, r in summary.items():
        h = hist[label]
        assert r["final_mse"] == h["mse"][-1] > 0
        assert len(h["grad_norm"]) == len(h["mse"]) and all(g > 0 for g in h["grad_norm"])
        assert r["grad_start"] == h["grad_norm"][0] and r["grad_end"] == h["grad_norm"][-1]
        assert r["grad_min"] == min(h["grad_norm"])
        assert r["grad_se_end"] == h["grad_se"][-1] and all(se > 0 for se in h["grad_se"])
        n = max(1, len(h["grad_norm"]) // 4)
        assert r["grad_tail"] == pytest.approx(sum(h["grad_norm"][-n:]) / n)
        # Time to target: the first evaluation from which the MSE stays below the target.
        target = r["target_mse"]
        assert target == pytest.approx(1.1 * summary["exact"]["final_mse"], rel=1e-12)
        i = next((i for i in range(len(h["mse"])) if all(m < target for m in h["mse"][i:])), None)
        assert r["target_step"] == (None if i is None else h["steps"][i])
        assert r["target_cpu_s"] == (None if i is None else h["cpu_s"][i])
        if label.startswith("ufom q="):  # q: one per outer step for the ufom rows, none for the others
            assert len(h["q"]) == iters
            tail = h["q"][-max(1, iters // 10):]
            assert r["q_mean_tail"] == pytest.approx(sum(tail) / len(tail))
            if "auto" not in label:
                assert set(h["q"]) == {float(label.split("=")[1])} and r["q_end"] == h["q"][-1]
            else:
                assert r["q_min"] in maml.Q_MIN.values() and r["q_min"] < r["q_end"] <= 1
        else:
            assert h["q"] == [] and r["q_end"] is None
    assert out["gradient_check"]["rel_diff"] < 1e-9  # the vectorised true gradient is torch_ufom's exact one
    names = [t["name"] for t in out["targets"]]
    assert "ufom q=auto (authors): q at end" in names
    if "higher" in summary:  # float64, same seeds: exact and higher's MAML follow the same trajectory
        assert abs(summary["exact"]["vs_higher"]) < 1e-6
        assert hist["exact"]["grad_norm"] == pytest.approx(hist["higher"]["grad_norm"], rel=1e-9)
        assert out["targets"][0]["holds"] is True


def test_first_below():
    assert harness.first_below([3.0, 1.0, 2.0, 0.5, 0.4], 1.0) == 3
    assert harness.first_below([3.0, 0.9, 0.5], 1.0) == 1
    assert harness.first_below([0.5, 0.4], 1.0) == 0
    assert harness.first_below([0.5, 1.0], 1.0) is None


def test_meta_gradient_is_torch_ufoms_exact_hypergradient():
    model = problems.seeded(1, lambda: problems.sinusoid_mlp(8), torch.float64)
    xs, ys, xq, yq = problems.sinusoid_tasks(3, 5, 7, torch.Generator().manual_seed(3))

    def per_task(mode):
        return [torch_ufom.hypergrad(model, problems.mse, problems.mse, (xs[i], ys[i]), (xq[i], yq[i]),
                                     steps=3,
                                     inner_lr=0.05, mode=mode) for i in range(3)]
    exact = per_task("exact")
    ref = maml.meta_gradient(model, problems.pred_mse, xs, ys, xq, yq, steps=3, lr=0.05, chunk=2)
    for j, (name, _) in enumerate(model.named_parameters()):
        assert torch.allclose(ref[name], sum(g[j] for g in exact) / 3, rtol=1e-10, atol=1e-12), name
    per = torch.stack([torch.cat([g.flatten() for g in gs]) for gs in exact])
    mean, se = maml.meta_gradient(model, problems.pred_mse, xs, ys, xq, yq, steps=3, lr=0.05, chunk=2,
                                  return_se=True)
    assert maml.grad_norm(mean) == pytest.approx(float(per.mean(0).norm()), rel=1e-10)
    assert se == pytest.approx(float((per.var(0).sum() / 3) ** 0.5), rel=1e-8)
    fom = per_task("fom")  # ... and it is not FOM's: the second-order terms matter at this inner lr
    assert maml.grad_norm({n: sum(g[j] for g in fom) / 3 - ref[n]
                           for j, (n, _) in enumerate(model.named_parameters())}) > 1e-6


def test_digits_tiny(tmp_path):
    out = digits.main(["--tiny", "--out", str(tmp_path), "--no-progress"])
    assert set(out["settings"]) == {"3-way 1-shot", "3-way 5-shot"}
    for setting in out["settings"].values():
        for label in ("fom", "ufom q=0.1", "exact"):
            r, h = setting["summary"][label], setting["histories"][label]
            assert 0.0 <= r["final_acc"] <= 1.0 and r["final_acc"] == pytest.approx(h["accuracy"][-1])
            assert r["best_acc"] == max(h["accuracy"])


def test_missing_peer_is_skipped_with_a_note(tmp_path, monkeypatch):
    real = maml.available
    monkeypatch.setattr(maml, "available", lambda kind: kind != "higher" and real(kind))
    out = sinusoid.main(["--tiny", "--methods", "fom,higher", "--out", str(tmp_path), "--no-progress"])
    assert "higher" not in out["summary"] and "fom" in out["summary"]
    assert out["skipped"] == ["higher: skipped (higher is not installed)"]


def test_a_library_exception_propagates(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise FloatingPointError("non-finite hypergradient")
    monkeypatch.setattr(torch_ufom.MetaOptimizer, "backward", broken)
    with pytest.raises(FloatingPointError):
        sinusoid.main(["--tiny", "--methods", "fom", "--out", str(tmp_path), "--no-progress"])


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


def test_cosine_decay_scales_every_methods_outer_lr(tmp_path, monkeypatch):
    f = maml.cosine_decay(10)
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    seen, real = [], maml.make_trainer

    def spy(*a, **kw):
        t = real(*a, **kw)
        step = t.step
        t.step = lambda tasks: (seen.append((t.method.label, t.outer.param_groups[0]["lr"])), step(tasks))
        return t
    monkeypatch.setattr(maml, "make_trainer", spy)
    sinusoid.main(["--tiny", "--methods", "fom,exact", "--lr-decay", "cosine", "--outer-lr", "0.01",
                   "--out", str(tmp_path), "--no-progress"])
    iters = sinusoid.SIZES["tiny"][0]
    for label in ("fom", "exact"):
        assert [lr for m, lr in seen if m == label] == pytest.approx(
            [0.01 * maml.cosine_decay(iters)(k) for k in range(iters)])
