"""Issue 15's benchmarks at tiny sizes: the equal-compute few-shot study and the toy's optimal q.

They check the data the benchmarks write (JSON) against independent computations, not the wording.
"""
import json
import math

import pytest
import torch

import matplotlib  # noqa: F401  (the test extra: a missing one fails, not skips)
import sklearn  # noqa: F401


# -- fewshot --------------------------------------------------------------------------------
def test_split_keeps_every_rotation_of_a_digit_on_one_side_and_6_with_9():
    from benchmarks import fewshot

    train, test = set(fewshot.TRAIN_DIGITS), set(fewshot.TEST_DIGITS)
    assert train.isdisjoint(test) and train | test == set(range(10))
    assert {6, 9} <= train or {6, 9} <= test
    train_c = set(fewshot.classes_of(fewshot.TRAIN_DIGITS))
    test_c = set(fewshot.classes_of(fewshot.TEST_DIGITS))
    assert train_c.isdisjoint(test_c) and len(train_c | test_c) == 40
    assert all(c // fewshot.ROTATIONS in train for c in train_c)


def test_rotated_classes_are_turned_copies_resized_to_28():
    from benchmarks import fewshot, problems

    data = fewshot.rotated_digits()
    raw = problems.load_digits_by_class()
    assert sorted(data) == list(range(40))
    for d in (0, 6):
        base = data[4 * d]
        assert base.shape == (raw[d].shape[0], 1, 28, 28)
        # bilinear resizing of a square grid commutes with turning it by 180 degrees
        torch.testing.assert_close(data[4 * d + 2], torch.flip(base, dims=(2, 3)), atol=1e-6, rtol=0)
        # a 90-degree turn: the same pixels, in another place
        torch.testing.assert_close(data[4 * d + 1].sum((1, 2, 3)), base.sum((1, 2, 3)), atol=1e-4, rtol=1e-5)


def _expected(law, cost):
    """E[cost(K)] from the survival function: cost(0) + sum_k P(K >= k) (cost(k) - cost(k-1))."""
    surv = law.survival(len(cost) - 1)
    return cost[0] + sum(surv[k] * (cost[k] - cost[k - 1]) for k in range(1, len(cost)))


def test_geometric_rows_cost_what_q_0_2_costs():
    from benchmarks import fewshot

    r = fewshot.STEPS
    c_f, c_x = fewshot.authors_costs()
    assert (c_f, c_x) == (r + 1, r * (r - 1) // 2 + r)
    evals = [fewshot.evals_cost(K) for K in range(r + 1)]
    assert evals[0] == c_f and evals[-1] == c_x and all(a < b for a, b in zip(evals, evals[1:]))
    law = fewshot.match_geometric(evals, c_f + 0.2 * (c_x - c_f))
    assert _expected(law, evals) == pytest.approx(c_f + 0.2 * (c_x - c_f), rel=1e-9)
    steep = [1.0, 5.0] + [5.0 + k for k in range(1, r)]  # K = 1 already costs more than the target
    law = fewshot.match_geometric(steep, 1.0 + 0.2 * (steep[-1] - 1.0))
    assert law.q < 1 and _expected(law, steep) == pytest.approx(1.0 + 0.2 * (steep[-1] - 1.0), rel=1e-9)


def test_interval_is_student_t_over_seeds_and_normal_over_tasks_with_one_seed():
    from benchmarks import fewshot

    mean, half, method = fewshot.interval([0.5, 0.7, 0.6], [0.0] * 10)
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.303 * 0.1 / math.sqrt(3)) and "t" in method
    mean, half, _ = fewshot.interval([0.6], [0.0, 1.0, 1.0, 0.0])
    assert mean == 0.5 and half == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)


def test_paired_difference_is_seed_by_seed():
    from benchmarks import fewshot

    mean, half = fewshot.paired([0.80, 0.70, 0.90], [0.75, 0.66, 0.84])
    assert mean == pytest.approx(0.05) and half == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    assert fewshot.paired([0.5], [0.25]) == (0.25, 0.0)


@pytest.mark.slow  # a benchmark run: 14 s of the quick loop's 110
def test_fewshot_tiny_spends_equal_budgets(tmp_path):
    from benchmarks import fewshot

    data = fewshot.main(["--tiny", "--out", str(tmp_path), "--no-progress"])
    saved = json.loads((tmp_path / "fewshot.json").read_text())
    assert saved["budgets"] == pytest.approx(data["budgets"])
    assert (tmp_path / "fewshot.png").is_file()
    cfg, budgets, costs = data["config"], data["budgets"], data["costs_cpu_s"]
    r, (c_f, c_x) = fewshot.STEPS, fewshot.authors_costs()
    assert budgets["evals"] == cfg["fom_steps"] * cfg["meta_batch"] * c_f
    assert budgets["time"] == pytest.approx(cfg["fom_steps"] * cfg["meta_batch"] * costs["fom"][0])
    assert set(data["runs"]) == {row.label for row in fewshot.ROWS}
    step_max = {"evals": cfg["meta_batch"] * c_x,
                "time": cfg["meta_batch"] * max(max(v) for v in costs.values())}
    for label, runs in data["runs"].items():
        assert len(runs) == cfg["seeds"]
        for run in runs:
            finals = {c["measure"]: c for c in run["checkpoints"] if c["fraction"] == 1.0}
            assert set(finals) == {"evals", "time"}
            for m, c in finals.items():  # the budget is reached, by less than one outer step's cost
                assert budgets[m] * (1 - 1e-12) <= c["charge"] < budgets[m] + step_max[m], (label, m)
                assert len(c["accuracy"]) == cfg["test_tasks"]
                assert all(0.0 <= a <= 1.0 for a in c["accuracy"])
            assert run["outer_steps"] == max(c["outer_steps"] for c in finals.values())
    fom = data["summary"]["fom"]
    assert fom["evals"]["outer_steps"] == cfg["fom_steps"] == fom["time"]["outer_steps"]
    assert data["summary"]["exact"]["exact_share"] == 1.0 and data["summary"]["fom"]["exact_share"] == 0.0
    # exact tasks are charged c_x each: the evals budget buys ceil(budget / (meta_batch c_x)) outer steps
    exact_steps = math.ceil(budgets["evals"] / (cfg["meta_batch"] * c_x))
    assert data["summary"]["exact"]["evals"]["outer_steps"] == exact_steps
    geo = data["geometric"]
    law = fewshot.Geometric(geo["evals"]["q"], geo["evals"]["rho"])
    assert _expected(law, data["evals_cost"]) == pytest.approx(c_f + 0.2 * (c_x - c_f), rel=1e-6)
    u = costs["ufom"]
    law = fewshot.Geometric(geo["time"]["q"], geo["time"]["rho"])
    assert _expected(law, u) == pytest.approx(u[0] + 0.2 * (u[r] - u[0]), rel=1e-6)
    for label, s in data["summary"].items():  # paired differences, recomputed from the per-seed accuracies
        for m in ("evals", "time"):
            diff = [a - b for a, b in zip(s[m]["per_seed"], data["summary"]["fom"][m]["per_seed"])]
            assert s[m]["vs_fom"][0] == pytest.approx(sum(diff) / len(diff))
    for name, d in data["diagnose"].items():
        assert d["A"] > 0 and d["D"] >= 0 and 0.01 <= d["q_ufom"] <= 1 and 0.05 <= d["q_authors"] <= 1, name


# -- toy_q ---------------------------------------------------------------------------------
def test_derivatives_match_autograd_of_the_toy_loss():
    from benchmarks import toy, toy_q

    a, b = 1.5, 10.0
    x = torch.tensor([-20.0, -3.0, 0.5, 6.0, 6.7, 14.0, 15.1, 16.5, 40.0], dtype=torch.float64)
    x = x.requires_grad_(True)
    (d1,) = torch.autograd.grad(toy.piecewise_loss(x, a, b, toy_q.A_QUAD).sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    f64 = torch.float64
    ours = toy_q.derivatives(x.detach(), torch.tensor(a, dtype=f64), torch.tensor(b, dtype=f64))
    torch.testing.assert_close(ours[0], d1.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], d2, rtol=1e-12, atol=1e-12)


def _unrolled_gradient(x: float, alpha: float):
    """The exact gradient of the average ABLO objective by autograd through the inner loop."""
    from benchmarks import toy, toy_q

    x0 = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    total = 0.0
    for a, b in toy_q.TASKS:
        xi = x0
        for _ in range(toy_q.STEPS):
            (g,) = torch.autograd.grad(toy.piecewise_loss(xi, a, b, toy_q.A_QUAD), xi, create_graph=True)
            xi = xi - alpha * g
        (d,) = torch.autograd.grad(toy.piecewise_loss(xi, a, b, toy_q.A_QUAD), x0)
        total += float(d) / len(toy_q.TASKS)
    return total


def test_unroll_true_gradient_matches_autograd():
    from benchmarks import toy_q

    xs = torch.tensor([-9.0, 1.0, 4.0, 12.0, 29.0], dtype=torch.float64)
    for alpha in (0.001, 0.05):
        _, _, true = toy_q.unroll(xs, torch.tensor(alpha, dtype=torch.float64))
        for x, t in zip(xs.tolist(), true.tolist()):
            assert t == pytest.approx(_unrolled_gradient(x, alpha), rel=1e-10, abs=1e-12)


def test_exact_a_and_d_match_the_library_at_the_minimiser():
    import torch_ufom
    from benchmarks import toy, toy_q

    alpha = 0.03
    A, D = toy_q.exact_stats(alpha)
    p = [(1 - alpha * a) ** toy_q.STEPS for a in toy_q.CURVATURES]
    x_star = sum(a * pi ** 2 * b / a for (a, b), pi in zip(toy_q.TASKS, p)) / sum(
        a * pi ** 2 for a, pi in zip(toy_q.CURVATURES, p))
    assert _unrolled_gradient(x_star, alpha) == pytest.approx(0.0, abs=1e-12)
    model = toy.Scalar(x_star)
    gr, g0 = [], []
    for task in toy_q.TASKS:
        for mode, out in (("exact", gr), ("fom", g0)):
            (g,) = torch_ufom.hypergrad(model, toy_q.t3_loss, toy_q.t3_loss, task, task, steps=toy_q.STEPS,
                                        inner_lr=alpha, mode=mode)
            out.append(float(g))
    assert A == pytest.approx(sum(g * g for g in gr) / 2, rel=1e-10)
    assert D == pytest.approx(sum((g - h) ** 2 for g, h in zip(gr, g0)) / 2, rel=1e-10)


def test_steps_to_stay_below():
    from benchmarks import toy_q

    rms = torch.tensor([[3.0, 3.0, 3.0], [0.5, 2.0, 3.0], [2.0, 0.5, 3.0], [0.5, 0.5, 0.5]])
    got = toy_q.steps_to_stay_below(rms, [0, 10, 20, 30], 1.0).tolist()
    assert got == [30.0, 20.0, 30.0]
    rms[-1, 2] = 1.0
    assert math.isinf(toy_q.steps_to_stay_below(rms, [0, 10, 20, 30], 1.0)[2])


def test_toy_q_tiny_reports_best_q_and_a_replayed_trajectory(tmp_path):
    from benchmarks import toy_q
    from torch_ufom import adaptive

    data = toy_q.main(["--tiny", "--out", str(tmp_path), "--no-progress"])
    assert json.loads((tmp_path / "toy_q.json").read_text())["cross_check"] == data["cross_check"]
    assert data["cross_check"]["max_rel_diff"] <= 1e-12 and data["cross_check"]["iters"] >= 50
    assert len(data["rates"]) == 3 and data["q_grid"] == [round(0.05 * i, 2) for i in range(1, 21)]
    alphas = [r["alpha"] for r in data["rates"]]
    assert alphas[0] == pytest.approx(0.001) and alphas[-1] == pytest.approx(0.05)
    for r in data["rates"]:
        A, D = toy_q.exact_stats(r["alpha"])
        assert r["q_ufom"] == adaptive.optimal_q(A, D, 11, 44, 0.01)
        assert len(r["cost_per_q"]) == 20
        finite = [(c, q) for c, q in zip(r["cost_per_q"], data["q_grid"]) if math.isfinite(c)]
        if finite:  # the best q is the cheapest
            assert r["q_best"] == min(finite)[1] and r["cost_best"] == min(finite)[0]
        else:
            assert r["q_best"] is None
        if r["fom_stall"] > data["threshold"]:  # fom cannot get below its fixed point's true gradient
            assert math.isinf(r["fom_cost"])


def test_a_geometric_law_matches_any_target_between_the_costs_of_k_0_and_k_r():
    # Both of match_geometric's branches: the target below K = 1's cost (q solved at
    # rho = 0.5) and above it (rho by bisection); costs non-decreasing in K, as calibrate
    # makes them.
    from benchmarks import fewshot

    cost = [1.0, 3.0, 3.0, 3.5, 4.0, 4.0, 5.0, 5.0, 5.5, 6.0, 7.0]
    for target in (1.2, 2.9, 3.2, 4.5, 6.9):
        law = fewshot.match_geometric(cost, target)
        assert _expected(law, cost) == pytest.approx(target, rel=1e-6), target
