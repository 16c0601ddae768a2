"""Fixtures shared by every test (helpers live in tests/helpers.py)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def _every_group_vectorises(request, monkeypatch):
    """``vectorise="auto"`` on a CPU runs a group of tasks (those that drew the same ``K``)
    smaller than ``FEWEST_TASKS_ON_CPU`` (``FEWEST_TASKS_BESIDE_ON_CPU`` beside a larger one)
    per task, where vmap does not pay. The tests of the
    meta-batch look, of what it finds and of the fallbacks use meta-batches of 2-5 tasks,
    drawing several ``K``: in them every group is vectorised under ``"auto"``, as in a larger
    meta-batch. Tests marked ``fewest_tasks`` see the library's own thresholds."""
    if request.node.get_closest_marker("fewest_tasks") is None:
        import torch_ufom.functional as functional
        every = dict.fromkeys(functional.FEWEST_TASKS_ON_CPU, 1)
        monkeypatch.setattr(functional, "FEWEST_TASKS_ON_CPU", every)
        monkeypatch.setattr(functional, "FEWEST_TASKS_BESIDE_ON_CPU", 1)
    yield
