"""The ``.grad`` contract of :mod:`torch_ufom.grads`, on its own: written as autograd
accumulates, all or nothing, and put back exactly."""
import pytest
import torch

from torch_ufom.grads import accumulate_grads, grad_copies, put_back, writable


def test_a_new_grad_is_laid_out_as_its_parameter_and_an_existing_one_added_to_in_place():
    p = torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    q = torch.zeros(3, requires_grad=True)
    q.grad = torch.ones(3)
    old = q.grad
    accumulate_grads([(p, torch.ones(2, 3, 4, 5, dtype=torch.float64)), (q, torch.full((3,), 2.0))])
    assert p.grad.stride() == p.stride() and p.grad.dtype == p.dtype
    assert q.grad is old and q.grad.tolist() == [3.0, 3.0, 3.0]


def test_a_grad_that_cannot_take_the_sum_in_place_is_replaced_by_it():
    q = torch.zeros(3, requires_grad=True)
    q.grad = torch.ones(1).expand(3)  # its elements share memory
    assert not writable(q.grad)
    old = q.grad
    accumulate_grads([(q, torch.tensor([1.0, 2.0, 3.0]))])
    assert q.grad is not old and q.grad.tolist() == [2.0, 3.0, 4.0]


def test_a_sum_that_fails_writes_nothing():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    c = torch.zeros(3, requires_grad=True)
    c.grad = torch.ones(3)
    with pytest.raises(RuntimeError):
        accumulate_grads([(a, torch.ones(3)), (b, torch.ones(3)), (c, torch.ones(3))])  # b: another shape
    assert a.grad is None and b.grad is None and c.grad.tolist() == [1.0, 1.0, 1.0]


def test_grads_put_back_exactly_none_and_sparse_included():
    e = torch.zeros(4, 2, requires_grad=True)
    e.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 2), (4, 2))
    d = torch.zeros(3, requires_grad=True)
    saved = grad_copies([e, d])
    e.grad = e.grad.to_dense() * 3  # what a reduction may leave: dense, and a .grad where none was
    d.grad = torch.ones(3)
    put_back(saved)
    assert d.grad is None and e.grad.layout == torch.sparse_coo
    assert torch.equal(e.grad.to_dense(), saved[0][1].to_dense())


def test_a_dense_grad_changed_in_place_is_put_back_in_place():
    """H2 F7: the copy must be a copy (a grad scaled in place after it is saved comes back as it was), and
    a dense .grad of the same layout is written back into the same tensor (an optimizer may hold it)."""
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    held = p.grad
    saved = grad_copies([p])
    p.grad.mul_(5)
    put_back(saved)
    assert p.grad is held and p.grad.tolist() == [1.0, 2.0, 3.0]


def test_an_assignment_that_fails_undoes_the_ones_before_it():
    """H2 F7: the rollback of accumulate_grads: a .grad whose assignment raises (here a parameter type whose
    setter refuses) leaves the gradients assigned before it as they were."""
    class Refusing(torch.Tensor):
        @property
        def grad(self):
            return torch.Tensor.grad.__get__(self)

        @grad.setter
        def grad(self, value):
            raise RuntimeError("this parameter refuses a new .grad")

    a = torch.zeros(3, requires_grad=True)
    r = torch.zeros(3).as_subclass(Refusing).requires_grad_()
    with pytest.raises(RuntimeError, match="refuses a new .grad"):
        accumulate_grads([(a, torch.ones(3)), (r, torch.ones(3))])
    assert a.grad is None
