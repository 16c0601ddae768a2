"""Independent reference: brute-force unrolled autograd (use it in float64).

``brute_force(..., k)`` returns ``G_k``: the hypergradient obtained by
differentiating through the last ``k`` inner steps exactly and through the
first ``steps - k`` with the inner gradient held constant (``docs/maths.md#the-estimators-g_k``). The
whole unroll is one autograd graph; nothing of the library is used. The inner
rule is plain SGD with ``lr``, or one of the reference rules below, written
from ``torch.optim``'s documented formulas (``tests/test_inner.py`` checks
them against ``torch.optim`` too).
"""
import math

import torch
from torch.func import functional_call


def _pick(value, name):
    return value[name] if isinstance(value, dict) else value


def ref_sgd(lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    """``torch.optim.SGD``'s step for one parameter: ``(name, t, p, g, buf) -> (p, buf)``."""
    def step(name, t, p, g, buf):
        d = g + _pick(weight_decay, name) * p
        mom = _pick(momentum, name)
        if nesterov or not (isinstance(mom, float) and mom == 0.0):
            buf = d if t == 0 else mom * buf + (1 - _pick(dampening, name)) * d
            d = d + mom * buf if nesterov else buf
        return p - _pick(lr, name) * d, buf
    return step


def _sqrt0(v):
    """``sqrt(v)`` with derivative 0 where ``v <= 0``: the convention the library documents for
    Adam's and RMSprop's denominators (the subgradient of ``|g|`` at 0), written here on its own.
    Plain ``sqrt`` gives ``inf * 0 = NaN`` there, as soon as some gradient entry is exactly 0."""
    positive = v > 0
    return torch.where(positive, v, torch.ones_like(v)).sqrt() * positive


def ref_adam(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """``torch.optim.Adam``'s step for one parameter; the state is ``(m, v)``."""
    def step(name, t, p, g, mv):
        b1, b2 = _pick(betas[0], name), _pick(betas[1], name)
        d = g + _pick(weight_decay, name) * p
        m, v = (torch.zeros_like(p), torch.zeros_like(p)) if mv is None else mv
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
        denom = _sqrt0(v) / c2 ** 0.5 + _pick(eps, name)
        return p - _pick(lr, name) / c1 * m / denom, (m, v)
    return step


def brute_force(model, inner_loss, outer_loss, batch, query, steps, lr, params, k, rule=None):
    """``G_k`` by one unrolled graph; ``batch(j)`` gives step ``j``'s batch (0-based).

    ``lr`` is a float, a tensor or a dict name -> tensor (plain SGD), unless a
    reference ``rule`` (``ref_sgd(...)``, ``ref_adam(...)``) is given. The
    losses get a functional model called like the module (positional and
    keyword arguments) whose ``parameters()`` / ``named_parameters()`` are the
    current inner parameters followed by the frozen ones. Buffers are state:
    each step works on a copy of the previous step's buffers (BatchNorm's
    running statistics move with the inner loop; the module's own buffers are
    never written). A tensor of ``params`` that does not require a gradient
    gets zeros.
    """
    rule = ref_sgd(lr) if rule is None else rule
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    phi = {n: p for n, p in named}
    state = {n: None for n, _ in named}

    class call:  # noqa: N801 - the functional model at phi, like the library's
        def __init__(self, phi, buffers):
            self.phi, self.buffers = phi, {n: b.clone() for n, b in buffers.items()}

        def __call__(self, *a, **kw):
            return functional_call(model, ({**self.phi, **frozen}, self.buffers), a, kw)

        def named_parameters(self):
            return iter({**self.phi, **frozen}.items())

        def parameters(self):
            return (p for _, p in self.named_parameters())

    for j in range(steps):
        fm = call(phi, buffers)
        loss = inner_loss(fm, batch(j))
        buffers = fm.buffers
        exact = j >= steps - k
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=exact)
        new = {}
        for (n, p), g in zip(phi.items(), grads):
            new[n], state[n] = rule(n, j, p, g if exact else g.detach(), state[n])
        phi = new
    loss = outer_loss(call(phi, buffers), query)
    return _grads(loss, params)


def _grads(loss, params):
    """``d loss / d params``, zeros for tensors it does not reach or that need no grad."""
    live = [p for p in params if p.requires_grad]
    grads = iter(torch.autograd.grad(loss, live, allow_unused=True))
    out = []
    for p in params:
        g = next(grads) if p.requires_grad else None
        out.append(torch.zeros_like(p) if g is None else g)
    return tuple(out)


def telescope(G, survival, K):
    """The randomized-telescope estimate for a truncation point ``K``:
    ``G_0 + sum_{k=1..K} (G_k - G_{k-1}) / P_k`` with ``P_k = survival[k]``
    (``docs/maths.md#truncation-laws-and-telescope-weights``); ``G`` is the list
    ``[G_0, ..., G_r]`` of tuples of tensors."""
    out = list(G[0])
    for k in range(1, K + 1):
        out = [o + (a - b) / survival[k] for o, a, b in zip(out, G[k], G[k - 1])]
    return tuple(out)


def ref_adamw(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, decoupled=True):
    """``torch.optim.AdamW``'s step for one parameter; the state is ``(m, v, v_max)``.

    With ``decoupled=False`` the decay is added to the gradient instead:
    ``torch.optim.Adam``'s step, with its ``amsgrad`` option.
    """
    def step(name, t, p, g, state):
        b1, b2, wd = _pick(betas[0], name), _pick(betas[1], name), _pick(weight_decay, name)
        lr_ = _pick(lr, name)
        m, v, v_max = (torch.zeros_like(p),) * 3 if state is None else state
        if decoupled:
            shrunk = p * (1 - lr_ * wd)
        else:
            shrunk, g = p, g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if amsgrad:
            v_max = torch.maximum(v_max, v)
        c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
        denom = _sqrt0(v_max if amsgrad else v) / c2 ** 0.5 + _pick(eps, name)
        return shrunk - lr_ / c1 * m / denom, (m, v, v_max)
    return step


def ref_rmsprop(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False):
    """``torch.optim.RMSprop``'s step for one parameter; the state is ``(s, a, buf)``:
    the mean square, the mean gradient (``centered``) and the momentum buffer."""
    def step(name, t, p, g, state):
        a_ = _pick(alpha, name)
        s, a, buf = (torch.zeros_like(p),) * 3 if state is None else state
        g = g + _pick(weight_decay, name) * p
        s = a_ * s + (1 - a_) * g * g
        if centered:
            a = a_ * a + (1 - a_) * g
            avg = _sqrt0(s - a * a)
        else:
            avg = _sqrt0(s)
        avg = avg + _pick(eps, name)
        mom = _pick(momentum, name)
        if isinstance(mom, float) and mom == 0.0:
            return p - _pick(lr, name) * g / avg, (s, a, buf)
        buf = mom * buf + g / avg
        return p - _pick(lr, name) * buf, (s, a, buf)
    return step


def ref_sgd_per_step(rates):
    """Plain SGD with one rate per parameter and per inner step (MAML++'s LSLR):
    step ``t`` of parameter ``name`` uses ``rates[name][t]``."""
    def step(name, t, p, g, buf):
        return p - rates[name][t] * g, buf
    return step


def brute_force_partial(model, inner_loss, outer_loss, batch, query, steps, params, k, rule,
                        adapted):
    """``G_k`` when the inner loop adapts only the parameters named in ``adapted``.

    As :func:`brute_force`, but every other parameter (ANIL's body, BatchNorm's
    affine parameters) keeps its module value at every inner step, as the very
    leaf tensor: those that require a gradient are differentiated through the
    last ``k`` steps' inner gradients (the first ``steps - k`` hold the inner
    gradient constant, so their influence through it is dropped there) and
    through the outer loss. ``rule`` is a reference step such as
    ``ref_sgd(lr)`` or ``ref_sgd_per_step(rates)``.
    """
    adapted = set(adapted)
    phi = {n: p for n, p in model.named_parameters() if n in adapted}
    others = {n: p for n, p in model.named_parameters() if n not in adapted}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    state = {n: None for n in phi}

    def call(phi, buffers):
        """The losses' model at ``phi``; returns it and the buffers it writes into."""
        fresh = {n: b.clone() for n, b in buffers.items()}

        class FModel:
            def __call__(self, *a, **kw):
                return functional_call(model, ({**phi, **others}, fresh), a, kw)

            def named_parameters(self):
                return iter({**phi, **others}.items())

            def parameters(self):
                return (p for _, p in self.named_parameters())
        return FModel(), fresh

    def scalar(out):
        return out[0] if isinstance(out, tuple) else out

    for j in range(steps):
        fm, buffers = call(phi, buffers)
        loss = scalar(inner_loss(fm, batch(j)))
        exact = j >= steps - k
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=exact)
        new = {}
        for (n, p), g in zip(phi.items(), grads):
            new[n], state[n] = rule(n, j, p, g if exact else g.detach(), state[n])
        phi = new
    fm, _ = call(phi, buffers)
    loss = scalar(outer_loss(fm, query))
    return _grads(loss, params)


def q_ufom_rule(A, D, c_f, c_x, q_min):
    """The ufom rule's q from docs/maths.md, written out here (not torch_ufom.adaptive's):
    ``sqrt(c_f D / (c_x (A - D)))`` clipped to ``[q_min, 1]``; 1 if ``A <= D``; ``q_min`` if
    ``A = D = 0``."""
    if A == 0.0 and D == 0.0:
        return q_min
    if A <= D:
        return 1.0
    return min(1.0, max(q_min, math.sqrt(c_f * D / (c_x * (A - D)))))


def q_authors_rule(A, D, c_f, c_x, q_min):
    """The authors' rule's q from docs/maths.md, written out here: the root in (0, 1) of
    ``(A - D) c_x q^2 - D c_x q - 2 D c_f``, or 1 once ``D >= c_x A / (2 (c_f + c_x))``; at
    least ``q_min``; ``q_min`` if ``A = D = 0``."""
    if A == 0.0 and D == 0.0:
        return q_min
    if D >= c_x * A / (2 * (c_f + c_x)):
        return 1.0
    root = (D * c_x + math.sqrt(D * D * c_x * c_x + 8 * (A - D) * c_x * c_f * D)) / (2 * (A - D) * c_x)
    return max(q_min, root)
