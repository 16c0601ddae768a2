"""Bad input: a clear error naming the argument, and nothing changed."""
import math

import pytest
import torch

import torch_ufom
from helpers import mlp_problem


def snapshot(model, opt, gen):
    return ([p.detach().clone() for p in model.parameters()],
            [p.grad for p in model.parameters()], opt.state_dict(), gen.get_state(),
            torch.get_rng_state())


def assert_unchanged(before, model, opt, gen):
    params, grads, opt_state, gen_state, rng = before
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert all(g is None for g in grads) and all(p.grad is None for p in model.parameters())
    assert opt.state_dict() == opt_state
    assert torch.equal(gen.get_state(), gen_state)
    assert torch.equal(torch.get_rng_state(), rng)


def build(**kw):
    model, loss, data = mlp_problem(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = {"inner_lr": 0.1, "steps": 3, "mode": "exact", **kw}
    return model, loss, data, opt, kw


@pytest.mark.parametrize("kw, arg", [
    ({"mode": "second"}, "mode"), ({"memory": "disk"}, "memory"),
    ({"mode": "ufom", "q": 0.0}, "q"), ({"mode": "ufom", "q": 1.5}, "q"),
    ({"mode": "ufom", "q": -0.1}, "q"), ({"steps": 0}, "steps"),
    ({"inner_lr": -0.1}, "inner_lr|lr"), ({"inner_lr": {"nope": torch.tensor(0.1)}}, "lr"),
    ({"slots": 0}, "slots"), ({"mode": "truncated", "k": 4}, "k"), ({"mode": "truncated"}, "k"),
])
def test_constructor_rejects_bad_hyperparameters(kw, arg):
    model, _, _, opt, kw = build(**kw)
    with pytest.raises(ValueError, match=arg):
        torch_ufom.MetaOptimizer(model, opt, **kw)
    with pytest.raises(ValueError, match=arg):
        torch_ufom.hypergrad(model, lambda f, b: f(b[0]).sum(), lambda f, b: f(b[0]).sum(),
                             None, None, **kw)


@pytest.mark.parametrize("kw, arg", [({"steps": 2.5}, "steps"), ({"steps": "3"}, "steps"),
                                     ({"slots": 2.0}, "slots"), ({"mode": 1}, "mode"),
                                     ({"inner_lr": "0.1"}, "inner_lr"),
                                     ({"mode": "truncated", "k": 1.0}, "k")])
def test_constructor_rejects_hyperparameters_of_the_wrong_type_with_a_type_error(kw, arg):
    # (review GA, session 26: these were ValueErrors; torch_ufom.checks has the convention)
    model, _, _, opt, kw = build(**kw)
    with pytest.raises(TypeError, match=f"Invalid {arg}"):
        torch_ufom.MetaOptimizer(model, opt, **kw)
    with pytest.raises(TypeError, match=arg):
        torch_ufom.hypergrad(model, lambda f, b: f(b[0]).sum(), lambda f, b: f(b[0]).sum(),
                             None, None, **kw)


def test_error_message_lists_accepted_values():
    model, _, _, opt, kw = build(mode="second")
    with pytest.raises(ValueError, match="fom, ufom, exact"):
        torch_ufom.MetaOptimizer(model, opt, **kw)


def test_optimizer_must_hold_every_model_parameter():
    model, _, _, _, kw = build()
    opt = torch.optim.SGD(list(model.parameters())[:-1], lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer.*4\.bias"):
        torch_ufom.MetaOptimizer(model, opt, **kw)


def bad_calls(loss, data):
    """(support, query, inner_loss, outer_loss, error, message) cases that must change nothing."""
    nan_at_2 = lambda f, b: loss(f, b) * (math.nan if b is data[1] else 1.0)  # noqa: E731
    return [
        (torch_ufom.StepBatches([data[0], data[1]]), data[3], loss, loss, ValueError, "support.*steps=3"),
        (data[0], data[3], lambda f, b: (f(b[0]) - b[1]) ** 2, loss, ValueError, "inner_loss.*scalar"),
        (data[0], data[3], loss, lambda f, b: (f(b[0]) - b[1]) ** 2, ValueError, "outer_loss.*scalar"),
        (data.__getitem__, data[3], nan_at_2, loss, FloatingPointError, "inner step 2"),
        (data[0], data[3], loss, lambda f, b: loss(f, b) * math.inf, FloatingPointError, "outer_loss"),
    ]


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("memory", ["recompute", "store"])
def test_bad_call_changes_nothing(case, memory):
    model, loss, data, opt, kw = build(mode="ufom", q=0.5, memory=memory)
    gen = torch.Generator().manual_seed(0)
    meta = torch_ufom.MetaOptimizer(model, opt, generator=gen, **kw)
    support, query, inner, outer, error, message = bad_calls(loss, data)[case]
    before = snapshot(model, opt, gen)
    with pytest.raises(error, match=message):
        meta.backward(inner, outer, support, query)
    assert_unchanged(before, model, opt, gen)
    with pytest.raises(error, match=message):
        torch_ufom.hypergrad(model, inner, outer, support, query, generator=gen, **kw)
    assert_unchanged(before, model, opt, gen)
    # The global generator is restored too when no generator is given.
    rng = torch.get_rng_state()
    with pytest.raises(error, match=message):
        torch_ufom.hypergrad(model, inner, outer, support, query, **kw)
    assert torch.equal(torch.get_rng_state(), rng)


def test_force_truncation_is_checked():
    model, loss, data, opt, kw = build(mode="fom")
    meta = torch_ufom.MetaOptimizer(model, opt, **kw)
    with pytest.raises(ValueError, match="force_truncation"):
        meta.backward(loss, loss, data[0], data[1], force_truncation=4)
    with pytest.raises(ValueError, match="force_truncation"):
        meta.backward(loss, loss, data[0], data[1], force_truncation=2)
    assert all(p.grad is None for p in model.parameters())


def test_non_finite_hypergradient_names_the_meta_parameter_and_writes_nothing():
    model, loss, data, _, kw = build()
    w = torch.tensor(0.0, requires_grad=True)  # d sqrt(w) / dw = inf at 0, the loss stays finite
    opt = torch.optim.SGD(list(model.parameters()) + [w], lr=0.1)
    meta = torch_ufom.MetaOptimizer(model, opt, **kw)
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[6\]"):
        meta.backward(loss, lambda f, b: loss(f, b) + torch.sqrt(w), data[0], data[1])
    assert w.grad is None and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", ["fom", "exact"])
def test_a_finite_hypergradient_whose_norm_overflows_is_written(mode):
    # The finiteness check reads one 2-norm per tensor; huge finite entries overflow it, and the
    # element-wise look that follows must clear them instead of raising. A power of two scales every
    # cotangent exactly, so the scaled call's gradients are the plain call's times the scale.
    scale = 2.0 ** 600  # float64: entries ~2**600 are finite, their squares are not
    grads = []
    for s in (1.0, scale):
        model, loss, data, opt, kw = build(mode=mode)
        assert next(model.parameters()).dtype == torch.float64
        meta = torch_ufom.MetaOptimizer(model, opt, **kw)
        meta.backward(loss, lambda f, b: loss(f, b) * s, data[0], data[1])
        grads.append([p.grad for p in model.parameters()])
    assert not math.isfinite(sum(float(g.double().square().sum()) for g in grads[1]))
    assert all(torch.equal(a * scale, b) for a, b in zip(*grads, strict=True))


def test_a_non_finite_hypergradient_raises_the_exported_class_and_writes_nothing():
    # docs/porting.md's GradScaler recipe catches torch_ufom.NonFiniteHypergradient (a scale
    # too large overflows the sweep; here sqrt at 0 has an infinite derivative).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    v = torch.zeros((), requires_grad=True)
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD([*model.parameters(), v], lr=0.1),
                                    inner_lr=0.1, steps=3, mode="exact")
    batch = (torch.randn(5, 3), torch.randn(5, 1))

    def loss(f, b):
        return ((f(b[0]) - b[1]) ** 2).mean()
    with pytest.raises(torch_ufom.NonFiniteHypergradient, match="nothing was written"):
        meta.backward(loss, lambda f, b: loss(f, b) + torch.sqrt(v), batch, batch)
    assert all(p.grad is None for p in [*model.parameters(), v])
    assert issubclass(torch_ufom.NonFiniteHypergradient, FloatingPointError)


class _Distances(torch.nn.Module):
    """A linear layer followed by torch.cdist's small-input kernel, whose backward
    torch does not differentiate (at most 25 rows)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Linear(5, 1)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.cdist(h, h))


@pytest.mark.parametrize("call", ["backward", "batch_vmap", "batch_loop", "hypergrad"])
def test_an_operator_without_a_second_derivative_says_what_needed_it_and_changes_nothing(call):
    # torch alone says "the derivative for '_cdist_backward' is not implemented", with
    # nothing on why a loss that trains fine needs it or what runs instead.
    torch.manual_seed(0)
    model = _Distances().double()

    def loss(fm, batch):
        x, y = batch
        return ((fm(x) - y) ** 2).mean()

    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(4, 5, 1, dtype=torch.float64)
    rng = torch.get_rng_state()
    meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), inner_lr=0.1,
                                    steps=2, mode="exact", vectorise=call != "batch_loop")
    with pytest.raises(NotImplementedError, match=r"derivative for '_cdist_backward' is not implemented: "
                                                  r"an exact hypergradient .* use mode='fom'"):
        if call == "backward":
            meta.backward(loss, loss, (x[0], y[0]), (x[0], y[0]))
        elif call == "hypergrad":
            torch_ufom.hypergrad(model, loss, loss, (x[0], y[0]), (x[0], y[0]), steps=2, inner_lr=0.1,
                                 mode="exact")
        else:
            meta.backward_batch(loss, loss, (x, y), (x, y))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert torch.equal(rng, torch.get_rng_state())
    meta.reconfigure(mode="fom")  # the same losses run without second derivatives
    meta.backward(loss, loss, (x[0], y[0]), (x[0], y[0]))
    assert all(p.grad is not None for p in model.parameters())


def test_hypergrad_names_a_complex_parameter_of_the_model_not_params_it_was_not_given():
    # Review EQ (session 23): a complex parameter that requires grad, not adapted, was refused as
    # "Invalid params[0]", naming an argument the caller never passed.
    class Complex(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 5, dtype=torch.complex128))
            self.head = torch.nn.Linear(3, 1).double()

        def forward(self, x):
            return self.head((x.to(torch.complex128) @ self.w.T).abs())

    def loss(f, b):
        return ((f(b[0]) - b[1]) ** 2).mean()

    model = Complex()
    batch = (torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64))
    head = lambda name: name.startswith("head")  # noqa: E731
    with pytest.raises(ValueError, match=r"Invalid model: its parameter 'w' is a torch.complex128 tensor "
                                         r"that requires grad.*pass params= without it"):
        torch_ufom.hypergrad(model, loss, loss, batch, batch, steps=2, inner_lr=0.1, inner_params=head)
    got = torch_ufom.hypergrad(model, loss, loss, batch, batch, steps=2, inner_lr=0.1, inner_params=head,
                               params=list(model.head.parameters()))
    assert len(got) == 2
