"""Independent reference: brute-force unrolled autograd (use it in float64).

``brute_force(..., k)`` returns ``G_k``: the hypergradient obtained by
differentiating through the last ``k`` inner SGD steps exactly and through the
first ``steps - k`` with the inner gradient held constant (``UFOM.md``). The
whole unroll is one autograd graph; nothing of the library is used.
"""
import torch
from torch.func import functional_call


def brute_force(model, inner_loss, outer_loss, batch, query, steps, lr, params, k):
    """``G_k`` by one unrolled graph; ``batch(j)`` gives step ``j``'s batch (0-based).

    ``lr`` is a float, a tensor or a dict name -> tensor.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    buffers = dict(model.named_buffers())
    phi = {n: p for n, p in named}

    def call(phi):
        return lambda *a: functional_call(model, (phi, buffers), a)

    for j in range(steps):
        loss = inner_loss(call(phi), batch(j))
        exact = j >= steps - k
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=exact)
        phi = {n: p - (lr[n] if isinstance(lr, dict) else lr) * (g if exact else g.detach())
               for (n, p), g in zip(phi.items(), grads)}
    loss = outer_loss(call(phi), query)
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))
