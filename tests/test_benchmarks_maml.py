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
    out = sinusoid.main(["--tiny", "--q-study", "--out", str(tmp_path), "--no-progress"])
    for name in ("sinusoid.md", "sinusoid_steps.png", "sinusoid_time.png", "sinusoid_grad.png",
                 "sinusoid.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    text = (tmp_path / "sinusoid.md").read_text()
    assert "meta-test MSE" in text and "| exact " in text
    assert "|true grad| at end" in text and "time to target" in text
    summary, hist = out["summary"], out["histories"]
    for m in maml_common.Q_STUDY:  # --q-study adds these rows
        assert m.label in summary, m.label
    iters = out["args"]["iters"]
    for label in ("fom", "ufom q=0.1", "exact"):
        assert summary[label]["final_mse"] > 0
    for label, r in summary.items():
        h = hist[label]
        # The gradient norms are measured at every evaluation and summarised from them.
        assert len(h["grad_norm"]) == len(h["mse"]) and all(g > 0 for g in h["grad_norm"])
        assert r["grad_start"] == h["grad_norm"][0] and r["grad_end"] == h["grad_norm"][-1]
        assert r["grad_min"] == min(h["grad_norm"])
        assert r["grad_se_end"] == h["grad_se"][-1] and all(se > 0 for se in h["grad_se"])
        n = max(1, len(h["grad_norm"]) // 4)
        assert r["grad_tail"] == pytest.approx(sum(h["grad_norm"][-n:]) / n)
        # Time to target: the first evaluation from which the MSE stays at or below the target.
        target = r["target_mse"]
        assert target == pytest.approx(1.1 * summary["exact"]["final_mse"], rel=1e-12)
        i = next((i for i in range(len(h["mse"])) if all(m <= target for m in h["mse"][i:])), None)
        assert r["target_step"] == (None if i is None else h["steps"][i])
        assert r["target_cpu_s"] == (None if i is None else h["cpu_s"][i])
        # q: one per outer step for the ufom rows, none for the others.
        if label.startswith("ufom q="):
            assert len(h["q"]) == iters
            tail = h["q"][-max(1, iters // 10):]
            assert r["q_mean_tail"] == pytest.approx(sum(tail) / len(tail))
            if "auto" not in label:
                assert set(h["q"]) == {float(label.split("=")[1])} and r["q_end"] == h["q"][-1]
            else:
                assert r["q_min"] is not None and r["q_min"] < r["q_end"] <= 1
        else:
            assert h["q"] == [] and r["q_end"] is None
    # The vectorised true gradient agrees with torch_ufom's exact hypergradient.
    assert out["gradient_check"]["rel_diff"] < 1e-9
    assert "cross-checked" in text
    if "higher" in summary:
        # float64, same seeds: exact and higher's MAML follow the same trajectory.
        assert abs(summary["exact"]["vs_higher"]) < 1e-6
        assert hist["exact"]["grad_norm"] == pytest.approx(hist["higher"]["grad_norm"], rel=1e-9)
        assert [text for text, _ in out["checks"]]
    checks = [t for t, _ in out["checks"]]
    assert any(t.startswith("ufom q=auto (authors): q at end") for t in checks)


def test_first_staying_below():
    assert sinusoid.first_staying_below([3.0, 1.0, 2.0, 1.0, 0.5], 1.0) == 3
    assert sinusoid.first_staying_below([3.0, 1.0, 0.5], 1.0) == 1
    assert sinusoid.first_staying_below([0.5, 0.4], 1.0) == 0
    assert sinusoid.first_staying_below([0.5, 1.5], 1.0) is None


def test_meta_gradient_is_torch_ufoms_exact_hypergradient():
    import torch
    import torch_ufom

    model = sinusoid.make_model(1, hidden=8)
    g = torch.Generator().manual_seed(3)
    xs, ys, xq, yq = sinusoid.sample_tasks(3, 5, 7, g)
    ref = maml_common.meta_gradient(model, sinusoid._pred_mse, xs, ys, xq, yq, steps=3, lr=0.05,
                                    chunk=2)
    total = None
    for i in range(3):
        h = torch_ufom.hypergrad(model, sinusoid.mse, sinusoid.mse, (xs[i], ys[i]), (xq[i], yq[i]),
                                 steps=3, inner_lr=0.05, mode="exact")
        total = list(h) if total is None else [a + b for a, b in zip(total, h)]
    for (name, _), t in zip(model.named_parameters(), total):
        assert torch.allclose(ref[name], t / 3, rtol=1e-10, atol=1e-12), name
    # The standard error over the tasks, from the per-task gradients.
    per = [torch.cat([g.flatten() for g in torch_ufom.hypergrad(
        model, sinusoid.mse, sinusoid.mse, (xs[i], ys[i]), (xq[i], yq[i]), steps=3, inner_lr=0.05,
        mode="exact")]) for i in range(3)]
    per = torch.stack(per)
    mean, se = maml_common.meta_gradient(model, sinusoid._pred_mse, xs, ys, xq, yq, steps=3,
                                         lr=0.05, chunk=2, return_se=True)
    assert maml_common.grad_norm(mean) == pytest.approx(float(per.mean(0).norm()), rel=1e-10)
    assert se == pytest.approx(float((per.var(0).sum() / 3) ** 0.5), rel=1e-8)
    # ... and it is not FOM's: the second-order terms matter at this inner lr.
    fom = [sum(torch_ufom.hypergrad(model, sinusoid.mse, sinusoid.mse, (xs[i], ys[i]),
                                    (xq[i], yq[i]), steps=3, inner_lr=0.05, mode="fom")[j]
               for i in range(3)) / 3 for j in range(len(total))]
    assert maml_common.grad_norm({str(j): f - ref[n] for j, (f, (n, _)) in
                                  enumerate(zip(fom, model.named_parameters()))}) > 1e-6


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


def test_cosine_decay_scales_every_methods_outer_lr(tmp_path):
    f = maml_common.cosine_decay(10)
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    seen = []
    real = maml_common.make_trainer

    def spy(*a, **kw):
        t = real(*a, **kw)
        step = t.step
        t.step = lambda tasks: (seen.append((t.method.label, t.outer.param_groups[0]["lr"])),
                                step(tasks))
        return t

    import unittest.mock
    with unittest.mock.patch.object(maml_common, "make_trainer", spy):
        sinusoid.main(["--tiny", "--methods", "fom,exact", "--lr-decay", "cosine",
                       "--outer-lr", "0.01", "--out", str(tmp_path), "--no-progress"])
    iters = sinusoid.SIZES["tiny"][0]
    for label in ("fom", "exact"):
        lrs = [lr for m, lr in seen if m == label]
        assert lrs == pytest.approx([0.01 * maml_common.cosine_decay(iters)(k) for k in range(iters)])
    assert "cosine decay" in (tmp_path / "sinusoid.md").read_text()
