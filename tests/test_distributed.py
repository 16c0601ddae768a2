"""Data parallelism: 2 gloo processes on this machine against one process."""
import contextlib
import copy
import datetime
import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torch_ufom
from helpers import mlp_problem, rel_err

pytestmark = pytest.mark.slow  # subprocesses / several processes

TASKS = [(0, 1, 0), (2, 3, 3), (4, 5, 3), (6, 7, 0)]  # (support, query, forced K)


def meta_for(model, **kw):
    return torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                    inner_lr=0.1, steps=3, mode="ufom", q=0.5, **kw)


@contextlib.contextmanager
def gloo(rank, world, init_file):
    """This process as ``rank`` of a gloo group of ``world`` processes, in float64."""
    torch.set_default_dtype(torch.float64)
    # The first torch.optim optimizer of a process imports torch._dynamo; done after
    # init_process_group, gloo's threads sometimes outlive destroy_process_group and the
    # process aborts at exit ("terminate called without an active exception", seen once
    # under load). Build one first, as benchmarks/distributed.py does.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a hang fails instead
    try:
        yield
    finally:
        gc.collect()  # free what still refers to the group (reference cycles) before tearing it down
        dist.destroy_process_group()


def worker(rank, world, init_file, out_dir):
    with gloo(rank, world, init_file):
        model, loss, data = mlp_problem(0)
        meta = meta_for(model, process_group=dist.group.WORLD, reduction="mean",
                        generator=torch.Generator().manual_seed(5))
        meta.zero_grad()
        for s, q, K in TASKS[rank::world]:
            meta.backward(loss, loss, data[s], data[q], force_truncation=K)
        total = meta.synchronize()
        again = meta.synchronize()  # a second call (a logging helper) used to sum the ranks again
        grads = [p.grad.clone() for p in model.parameters()]
        # A 5-step run with q="auto": each rank draws its own K, yet q and the
        # parameters stay identical on both ranks.
        meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                        inner_lr=0.1, steps=3, q="auto", q_min=0.3,
                                        process_group=dist.group.WORLD)
        for step in range(5):
            meta.zero_grad()
            for t in range(2):
                meta.backward(loss, loss, data[(4 * step + 2 * rank + t) % 8], data[8])
            meta.step()
        # Resuming: each rank's own dict restores its stream; rank 0's dict loaded on every
        # rank (the usual "save on rank 0") must not give every rank rank 0's stream.
        own = meta.state_dict()
        shared = [own]
        dist.broadcast_object_list(shared, src=0)
        meta.load_state_dict(own)
        resumed_own = torch.equal(meta.generator.get_state(), own["generator"])
        meta.load_state_dict({k: v for k, v in own.items() if k != "rank"})  # saved before "rank"
        resumed_own &= torch.equal(meta.generator.get_state(), own["generator"])
        meta.load_state_dict(shared[0])
        torch.save({"grads": grads, "total": total, "again": again,
                    "params": [p.detach() for p in model.parameters()],
                    "q_stats": meta.q_stats, "saved_rank": own["rank"], "resumed_own": resumed_own,
                    "saved_state": own["generator"], "shared_state": meta.generator.get_state(),
                    "seed": meta.generator.initial_seed()}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_gloo_ranks_equal_one_process_over_the_union_of_tasks(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model, loss, data = mlp_problem(0)
    meta = meta_for(model)
    meta.zero_grad()
    for s, q, K in TASKS:
        meta.backward(loss, loss, data[s], data[q], force_truncation=K)
    mean = [p.grad / len(TASKS) for p in model.parameters()]
    for r in ranks:
        assert r["total"] == r["again"] == len(TASKS)
        assert rel_err(r["grads"], mean) < 1e-10
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True))
    assert ranks[0]["q_stats"] == ranks[1]["q_stats"] and ranks[0]["q_stats"]["n_x"] > 0
    assert ranks[0]["seed"] != ranks[1]["seed"]  # each rank has its own stream
    assert [r["saved_rank"] for r in ranks] == [0, 1] and all(r["resumed_own"] for r in ranks)
    assert torch.equal(ranks[0]["shared_state"], ranks[0]["saved_state"])  # the saving rank resumes
    assert not torch.equal(ranks[1]["shared_state"], ranks[0]["shared_state"])  # a stream of its own


def test_uninitialised_process_group_is_rejected_before_any_work():
    model, loss, data = mlp_problem(0)
    with pytest.raises(ValueError, match="process_group.*not initialised"):
        meta_for(model, process_group=True)


def retry_worker(rank, world, init_file, out_dir):
    with gloo(rank, world, init_file):
        model, loss, data = mlp_problem(0)
        extra = torch.zeros(1, requires_grad=True)  # a meta-parameter only rank 0's task reaches
        meta = torch_ufom.MetaOptimizer(model, torch.optim.SGD([*model.parameters(), extra], lr=0.1),
                                        inner_lr=0.1, steps=3, mode="exact", process_group=True)
        meta.zero_grad()
        meta.backward(loss, (lambda f, b: loss(f, b) + extra.sum()) if rank == 0 else loss,
                      data[rank], data[2 + rank])
        before = None if extra.grad is None else extra.grad.clone()
        step = meta.optimizer.step

        def fail(*args, **kwargs):
            raise RuntimeError("transient")
        meta.optimizer.step = fail
        with pytest.raises(RuntimeError, match="transient"):
            meta.step()  # the reduction summed the ranks, then the optimizer failed: kept, as reduced
        # (review s37DW F2: put back, a rank whose optimizer alone failed reduced again alone at the retry)
        kept = before is None if rank == 1 else torch.equal(before, torch.ones(1))
        kept &= torch.equal(extra.grad, torch.ones(1)) and meta.state_dict()["reduced"]
        meta.optimizer.step = step
        meta.step()
        torch.save({"kept": kept, "extra": extra.detach().clone()},
                   os.path.join(out_dir, f"retry{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_a_retried_step_sums_the_ranks_once(tmp_path):
    # A gradient that was None on one rank used to keep the summed value after a failed
    # step, and the retry summed it again.
    mp.spawn(retry_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"retry{r}.pt") for r in range(2)]
    assert all(r["kept"] for r in ranks)
    for r in ranks:  # one task reached extra with gradient 1: SGD at lr 0.1 moves it by -0.1
        assert torch.equal(r["extra"], torch.tensor([-0.1]))


def carried_worker(rank, world, init_file, out_dir):
    with gloo(rank, world, init_file):
        model, loss, data = mlp_problem(0)
        meta = meta_for(model, process_group=True, reduction="mean")
        meta.reconfigure(mode="exact")
        meta.zero_grad()
        meta.backward(loss, loss, data[rank], data[2 + rank])
        meta.step()  # no zero_grad after it: .grad carries this step's mean into the next
        sum_gradients = torch_ufom.distributed.sum_gradients

        def broken(params, tasks, group):  # a rank gone part-way through the all-reduce
            with torch.no_grad():
                next(p for p in params if p.grad is not None).grad.mul_(3.0)
            raise RuntimeError("Connection closed by peer")
        if rank == 0:
            meta.backward(loss, loss, data[4], data[5])  # rank 1 runs no task this step
        before = [p.grad.clone() for p in model.parameters()]
        torch_ufom.distributed.sum_gradients = broken
        try:
            with pytest.raises(RuntimeError, match="closed by peer"):
                meta.step()
        finally:
            torch_ufom.distributed.sum_gradients = sum_gradients
        restored = all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
        meta.step()
        torch.save({"restored": restored, "params": [p.detach().clone() for p in model.parameters()]},
                   os.path.join(out_dir, f"carried{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_a_rank_without_tasks_keeps_what_its_gradients_carried_and_a_failed_all_reduce_changes_nothing(
        tmp_path):
    # Review DW (session 21): a rank that ran no task since the last step all-reduced and divided
    # the gradients it carried (the step before's, not cleared), and the other rank added its own
    # back: both ranks 17 % off and apart. And an all-reduce that failed part-way (a rank gone)
    # left .grad summed or without its carried part, the tasks pending, so a retry reduced again.
    mp.spawn(carried_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"carried{r}.pt") for r in range(2)]
    model, loss, data = mlp_problem(0)  # one process running both ranks' tasks
    meta = meta_for(model, reduction="mean")
    meta.reconfigure(mode="exact")
    meta.zero_grad()
    for rank in (0, 1):
        meta.backward(loss, loss, data[rank], data[2 + rank])
    meta.step()
    meta.backward(loss, loss, data[4], data[5])
    meta.step()
    assert all(r["restored"] for r in ranks)
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True))
    assert rel_err(ranks[0]["params"], [p.detach() for p in model.parameters()]) < 1e-12


def user_grad_worker(rank, world, init_file, out_dir):
    with gloo(rank, world, init_file):
        out = {}
        # the rank's own term, written after or before its tasks; "kept": before them, on rank 0
        # only, and .grad not cleared between the steps (review EF)
        for when in ("after", "before", "kept"):
            model, loss, data = mlp_problem(0)
            meta = meta_for(model, process_group=True)
            meta.reconfigure(mode="exact")
            for step in range(2):
                if when != "kept" or step == 0:
                    meta.zero_grad()
                term = 0.01 * sum((p ** 2).sum() for p in model.parameters())
                if when == "before" or (when == "kept" and rank == 0):
                    term.backward()
                if rank == 0 or step == 0:  # rank 1's task failed at step 1: it steps on without one
                    meta.backward(loss, loss, data[2 * step + rank], data[4])
                if when == "after":
                    term.backward()
                meta.step()
            out[when] = [p.detach().clone() for p in model.parameters()]
        torch.save(out, os.path.join(out_dir, f"user{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_a_rank_without_tasks_sums_a_gradient_its_own_loss_wrote_since_zero_grad(tmp_path):
    # Review EA (session 21): the fix above took everything an idle rank's .grad held as carried,
    # so a regulariser's backward() of its own after zero_grad() stayed out of the sum there while
    # the rank with tasks summed it: the ranks came 1.2e-3 apart. Review ED: the next fix summed
    # it on the idle rank, while a rank with tasks kept one written before its tasks out: 1.1e-3
    # apart. With a process group only what .grad holds untouched since the last step is kept.
    mp.spawn(user_grad_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"user{r}.pt") for r in range(2)]
    model, loss, data = mlp_problem(0)  # one process: every rank's tasks and terms
    meta = meta_for(model)
    meta.reconfigure(mode="exact")
    for step in range(2):
        meta.zero_grad()
        for rank in (0, 1) if step == 0 else (0,):
            meta.backward(loss, loss, data[2 * step + rank], data[4])
        for _ in range(2):
            (0.01 * sum((p ** 2).sum() for p in model.parameters())).backward()
        meta.step()
    for when in ("after", "before"):
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][when], ranks[1][when], strict=True)), when
        assert rel_err(ranks[0][when], [p.detach() for p in model.parameters()]) < 1e-12, when
    model, loss, data = mlp_problem(0)  # "kept": the first step's reduced gradient stays in .grad
    meta = meta_for(model)
    meta.reconfigure(mode="exact")
    meta.zero_grad()
    for step in range(2):
        (0.01 * sum((p ** 2).sum() for p in model.parameters())).backward()
        for rank in (0, 1) if step == 0 else (0,):
            meta.backward(loss, loss, data[2 * step + rank], data[4])
        meta.step()
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["kept"], ranks[1]["kept"], strict=True))
    assert rel_err(ranks[0]["kept"], [p.detach() for p in model.parameters()]) < 1e-12


MISMATCHES = {  # what rank 1 builds otherwise than rank 0, and the name the error gives
    "shape": ({"model": lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))},
              "the meta-parameters"),
    "reduction": ({"reduction": "sum"}, "reduction"),
    "mode": ({"mode": "exact"}, "the estimator"),
    "q": ({"q": 0.25}, "the estimator"),
    "alike": ({"truncation": torch_ufom.truncation.Bernoulli(0.5), "mode": None, "q": None}, ""),
    "auto-q": ({"q": "auto"}, "q='auto'"),
    "track-buffers": ({"track_buffers": True}, "track_buffers"),
    # review s34D (session 34): another inner rate, adapted set or outer rate ran (0.76 / 0.15 off
    # every single-process run; the outer rate stepped the ranks apart)
    "inner-lr": ({"inner_lr": 0.2}, "the inner rule"),
    "inner-params": ({"inner_params": ["2.weight", "2.bias"]}, "inner_params"),
    "outer-lr": ({"outer_lr": 0.2}, "the outer optimizer's hyperparameters"),
    "alike-rule": ({"inner": torch_ufom.inner.SGD(0.1), "inner_lr": None}, ""),
}


def mismatch_worker(rank, world, init_file, out_dir):
    with gloo(rank, world, init_file):
        out = {}
        for case, (change, _) in MISMATCHES.items():
            model, loss, data = mlp_problem(0)
            kw = dict(reduction="mean", mode="ufom", q=0.5, track_buffers=False, inner_lr=0.1, outer_lr=0.1)
            if rank == 1:
                kw.update({k: v for k, v in change.items() if k != "model"})
                kw = {k: v for k, v in kw.items() if v is not None}
                model = change.get("model", lambda: model)()
            outer = torch.optim.SGD(model.parameters(), lr=kw.pop("outer_lr"))
            meta = torch_ufom.MetaOptimizer(model, outer, steps=3, process_group=True, **kw)
            meta.backward(loss, loss, data[rank], data[2 + rank])
            before = [p.detach().clone() for p in model.parameters()] + \
                [p.grad.clone() for p in model.parameters()]
            try:
                meta.step()
                out[case] = "stepped"
            except ValueError as err:
                after = [p.detach() for p in model.parameters()] + [p.grad for p in model.parameters()]
                out[case] = str(err) + (" (unchanged)" if all(map(torch.equal, before, after)) else "")
        torch.save(out, os.path.join(out_dir, f"mismatch{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ranks_set_up_otherwise_get_one_error_on_every_rank_instead_of_an_abort_a_hang_or_drift(tmp_path):
    # Review DW (session 21): other parameter shapes aborted both processes inside gloo, q="auto"
    # or track_buffers on one rank only waited for the group's timeout, and another reduction or
    # mode stepped the ranks apart, silently.
    mp.spawn(mismatch_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        out = torch.load(tmp_path / f"mismatch{r}.pt")
        for case, (_, name) in MISMATCHES.items():
            if not name:  # the same estimator written otherwise (review EA, session 21: refused)
                assert out[case] == "stepped", (case, out[case])
                continue
            assert out[case].startswith("Invalid process_group: the ranks' MetaOptimizers differ in "), case
            assert name in out[case] and out[case].endswith("(unchanged)"), (case, out[case])


def buffers_worker(rank, world, init_file, out_dir):
    with gloo(rank, world, init_file):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(),
                                    torch.nn.Linear(4, 2))
        _, loss, data = mlp_problem(0)
        meta = meta_for(model, process_group=True, track_buffers=True, reduction="mean")
        for s, q, K in TASKS[:2] if rank == 0 else ():  # rank 1 runs no task this step
            meta.backward(loss, loss, data[s], data[q], force_truncation=K)
        meta.step()
        member = dist.new_group([0])  # every rank calls new_group; rank 1 is left out
        refused = ""
        if rank == 1:
            try:
                meta_for(model, process_group=member)
            except ValueError as err:
                refused = str(err)
        torch.save({"buffers": {n: b.clone() for n, b in model.named_buffers()}, "refused": refused},
                   os.path.join(out_dir, f"buffers{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_track_buffers_averages_the_tasks_of_every_rank(tmp_path):
    # Each rank averaged its own tasks' running statistics: ranks ended with different
    # buffers, and a rank without tasks kept its old ones.
    mp.spawn(buffers_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"buffers{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 2)).double()
    _, loss, data = mlp_problem(0)
    finals = []  # one process's tasks, by hand: each task's inner loop from the module's buffers
    for s, q, K in TASKS[:2]:
        net = copy.deepcopy(model)
        params = dict(net.named_parameters())
        for _ in range(3):  # steps=3 of SGD at 0.1 on the support loss, in train mode
            out = torch.func.functional_call(net, params, (data[s][0],))
            grads = torch.autograd.grad(((out - data[s][1]) ** 2).mean(), list(params.values()))
            params = {n: p - 0.1 * g for (n, p), g in zip(params.items(), grads)}
        with torch.no_grad():  # and the outer loss's forward, at the adapted parameters (review KB F1)
            torch.func.functional_call(net, params, (data[q][0],))
        finals.append(dict(net.named_buffers()))
    for name in ("1.running_mean", "1.running_var"):
        want = (finals[0][name] + finals[1][name]) / 2
        for r in ranks:
            assert rel_err([r["buffers"][name]], [want]) < 1e-12, name
    assert all(int(r["buffers"]["1.num_batches_tracked"]) == 4 for r in ranks)
    assert "not a member" in ranks[1]["refused"]


def sparse_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(5, 3, sparse=True), torch.nn.Tanh(), torch.nn.Linear(3, 1))


def sparse_loss(f, batch):
    return ((f(batch[0]).squeeze(-1) - batch[1]) ** 2).mean()


def sparse_task(i):
    g = torch.Generator().manual_seed(i)
    return ((torch.randint(0, 5, (4,), generator=g), torch.randn(4, generator=g)),
            (torch.randint(0, 5, (3,), generator=g), torch.randn(3, generator=g)))


SPARSE_RANKS = {"both": ([0], [1]), "one": ([0, 1], [])}  # the tasks of rank 0 and rank 1


def sparse_worker(rank, world, init_file, out_dir):
    with gloo(rank, world, init_file):
        out = {}
        for case, tasks in SPARSE_RANKS.items():
            model = sparse_model()
            meta = meta_for(model, process_group=True, reduction="mean")
            meta.reconfigure(mode="exact")
            for i in tasks[rank]:
                meta.backward(sparse_loss, sparse_loss, *sparse_task(i))
            meta.synchronize()
            out[case] = [p.grad.clone() for p in model.parameters()]
        # An outer step that raises after the reduction keeps the reduced .grad, as after
        # synchronize() (review s37DW F2): on both ranks the sum, dense, of rank 0's sparse gradient.
        model = sparse_model()
        meta = torch_ufom.MetaOptimizer(model, Failing(model.parameters(), lr=0.1), inner_lr=0.1, steps=3,
                                        mode="exact", process_group=True)
        for i in SPARSE_RANKS["one"][rank]:
            meta.backward(sparse_loss, sparse_loss, *sparse_task(i))
        before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        with pytest.raises(RuntimeError, match="the outer step failed"):
            meta.step()
        out["before"] = [None if a is None else a.to_dense() for a in before]
        out["after"] = [None if p.grad is None else p.grad.to_dense() for p in model.parameters()]
        out["reduced"] = meta.state_dict()["reduced"]
        torch.save(out, os.path.join(out_dir, f"sparse{rank}.pt"))


class Failing(torch.optim.SGD):
    def step(self, closure=None):
        raise RuntimeError("the outer step failed")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_sparse_gradients_are_summed_when_a_rank_has_none(tmp_path):
    # A rank without tasks sent a dense zero gradient where the other sent a sparse one:
    # gloo cannot pair them, and both ranks waited until the group's timeout.
    mp.spawn(sparse_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"sparse{r}.pt") for r in range(2)]
    model = sparse_model()  # one process running both tasks (float64: the autouse fixture)
    meta = meta_for(model, reduction="mean")
    meta.reconfigure(mode="exact")
    for i in (0, 1):
        meta.backward(sparse_loss, sparse_loss, *sparse_task(i))
    meta.synchronize()
    want = [p.grad.to_dense() for p in model.parameters()]
    summed = [sum(g for g in pair if g is not None) for pair in zip(ranks[0]["before"], ranks[1]["before"])]
    for r in ranks:  # after the failed outer step: the reduced sum, kept
        assert r["reduced"] and all(torch.equal(a, b) for a, b in zip(r["after"], summed, strict=True))
    for r in ranks:
        assert r["both"][0].is_sparse and not r["one"][0].is_sparse  # sparse where every rank is
        for case in SPARSE_RANKS:
            assert rel_err([g.to_dense() for g in r[case]], want) < 1e-12, case


def test_a_distributed_data_parallel_model_is_refused_naming_the_fix(tmp_path):
    # Its reducer hooks the module's own parameters, which the library never differentiates:
    # nothing was all-reduced and the replicas drifted apart, silently.
    with gloo(0, 1, tmp_path / "init"):
        model, loss, data = mlp_problem(0)
        for wrapped, where in [(nn.parallel.DistributedDataParallel(model), "DistributedDataParallel"),
                               (nn.Sequential(nn.parallel.DistributedDataParallel(model)),
                                "DistributedDataParallel at '0'")]:
            opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
            with pytest.raises(ValueError, match=rf"Invalid model: a data-parallel wrapper \({where}\).*"
                                                 r"pass the wrapped module \(ddp.module\)"):
                torch_ufom.MetaOptimizer(wrapped, opt, inner_lr=0.1, steps=2)
            with pytest.raises(ValueError, match="Invalid model: a data-parallel wrapper"):
                torch_ufom.hypergrad(wrapped, loss, loss, data[0], data[1], steps=2, inner_lr=0.1)


def _term(model):
    return 0.01 * sum((p ** 2).sum() for p in model.parameters())


def _carried_meta(model, how, **kw):
    """The MetaOptimizer of workflow ``how`` (exact), its model converted or a parameter frozen."""
    if how == "unfrozen-and-added":  # the last bias frozen at first, then added (below)
        model[4].bias.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    meta = torch_ufom.MetaOptimizer(model, opt, inner_lr=0.1, steps=3, mode="exact", **kw)
    if how == "converted-after-build":  # autograd makes new gradient accumulators
        model.float()
        model.double()
    return meta


def _carried_run(model, loss, data, meta, ranks, how, rank=None):
    """Two outer steps of workflow ``how``, the tasks of ``ranks`` here (one process: all of
    them, and every rank's own loss once); ``rank``: this process's rank in a group."""
    opt = meta.optimizer
    for step in range(2):
        if how in ("converted-after-build", "unfrozen-and-added"):
            if step == 0:
                meta.zero_grad()
            else:
                if how == "unfrozen-and-added":
                    model[4].bias.requires_grad_(True)
                    opt.add_param_group({"params": [model[4].bias]})
                opt.zero_grad()
                for _ in ranks:  # every rank's own loss (one process: each of them)
                    _term(model).backward()
        elif how == "cleared-after-a-change-by-hand":  # review EN: the refusal outlived the clear
            if step == 1:
                for _ in ranks:
                    _term(model).backward()
                for p in model.parameters():
                    p.grad.mul_(2)
                for _ in ranks:
                    _term(model).backward()  # (its pre-hook sees the change)
                opt.zero_grad()
        elif how == "zeroed-after-the-first-gradient":  # .grad carried at step 1, then cleared
            if step == 1:
                for _ in ranks:
                    _term(model).backward()
                opt.zero_grad(set_to_none=False)  # (what the term and the carried part held is gone)
                for _ in ranks:
                    _term(model).backward()
        elif how == "zero-in-place-term-on-rank-0":
            opt.zero_grad(set_to_none=False)
            if rank in (0, None):
                _term(model).backward()
        elif how == "data-zero":
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.data.zero_()  # (keeps the version: seen by no version check)
        elif step == 0:  # clip-after-synchronize, .grad not cleared between the steps
            meta.zero_grad()
        for r in ranks:
            meta.backward(loss, loss, data[2 * step + r], data[8])
        if how == "clip-after-synchronize":
            meta.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        meta.step()
    return [p.detach().clone() for p in model.parameters()]


CARRIED = ("zero-in-place-term-on-rank-0", "data-zero", "clip-after-synchronize", "converted-after-build",
           "unfrozen-and-added", "zeroed-after-the-first-gradient", "cleared-after-a-change-by-hand")


def carried_rules_worker(rank, world, init_file, out_dir):
    with gloo(rank, world, init_file):
        out = {}
        for how in CARRIED:
            model, loss, data = mlp_problem(0)
            meta = _carried_meta(model, how, process_group=True)
            out[how] = _carried_run(model, loss, data, meta, [rank], how, rank)
        # a backward of the user's after synchronize() would stay this rank's: refused at step()
        model, loss, data = mlp_problem(0)
        meta = meta_for(model, process_group=True)
        meta.backward(loss, loss, data[rank], data[8], force_truncation=0)
        meta.synchronize()
        _term(model).backward()
        before = [p.detach().clone() for p in model.parameters()]
        try:
            meta.step()
            out["after-synchronize"] = "stepped"
        except RuntimeError as err:
            out["after-synchronize"] = str(err) + (
                " (unchanged)" if all(map(torch.equal, before, model.parameters())) else "")
        # .grad scaled by hand after the step's first gradient while it carries the last
        # reduction's: which part the ranks would sum is ambiguous (review EM): refused
        model, loss, data = mlp_problem(0)
        meta = meta_for(model, process_group=True)
        meta.backward(loss, loss, data[rank], data[8], force_truncation=0)
        meta.step()
        _term(model).backward()
        for p in model.parameters():
            p.grad = p.grad * 2
        meta.backward(loss, loss, data[2 + rank], data[8], force_truncation=0)
        try:
            meta.step()
            out["by-hand"] = "stepped"
        except ValueError as err:
            out["by-hand"] = str(err)
        # generator= on one rank only: one error on every rank (the seed's broadcast hung)
        try:
            meta_for(model, process_group=True,
                     generator=torch.Generator().manual_seed(1) if rank == 0 else None)
            out["generator"] = "built"
        except ValueError as err:
            out["generator"] = str(err)
        # models seeded otherwise on each rank: one error at the first step, nothing changed
        model, loss, data = mlp_problem(rank)
        meta = meta_for(model, process_group=True)
        meta.backward(loss, loss, data[0], data[8], force_truncation=0)
        params = list(model.parameters())
        before = [p.detach().clone() for p in params] + [p.grad.clone() for p in params]
        try:
            meta.step()
            out["seeded-otherwise"] = "stepped"
        except ValueError as err:
            unchanged = all(map(torch.equal, before, [p.detach() for p in params] + [p.grad for p in params]))
            out["seeded-otherwise"] = str(err) + (" (unchanged)" if unchanged else "")
        torch.save(out, os.path.join(out_dir, f"rules{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_what_grad_carries_is_what_it_held_when_the_first_new_gradient_arrived(tmp_path):
    # Review EG (session 22): the carried part was judged by the .grad tensor's identity, version
    # and zeros: zeroing in place and then a backward of the user's, .data.zero_(), a sparse
    # gradient (replaced, not added to) and a clip after synchronize() made the ranks drift apart
    # or agree on a wrong sum (relative errors 0.7 % to 15x). Now a pre-hook on each meta-
    # parameter's gradient accumulator copies what .grad holds when the first gradient since the
    # last reduction arrives; every reduction checks the ranks' parameters and carried parts. Review
    # EL: a model converted after the build (new accumulators, 11-54 % off) or a parameter added
    # later (its first gradient carried, 10-28 % off): the accumulators are watched again at every
    # zero_grad, task, reduction and step. Review EM: a clear after the step's first gradient
    # left the carried copy to be subtracted (90 % off): a copy whose .grad was cleared is dropped.
    mp.spawn(carried_rules_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rules{r}.pt") for r in range(2)]
    for how in CARRIED:
        model, loss, data = mlp_problem(0)  # one process: every rank's tasks
        want = _carried_run(model, loss, data, _carried_meta(model, how), [0, 1], how)
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][how], ranks[1][how], strict=True)), how
        assert rel_err(ranks[0][how], want) < 1e-12, how
    for r in ranks:
        after = r["after-synchronize"]
        assert after.startswith("Invalid call: a backward() added to .grad after synchronize()")
        assert after.endswith("(unchanged)")
        assert r["generator"].startswith("Invalid generator: some ranks of the process group pass one")
        assert r["by-hand"].startswith("Invalid .grad: the gradients of '0.weight'")
        assert "the meta-parameters' values" in r["seeded-otherwise"]
        assert r["seeded-otherwise"].endswith("(unchanged)")


def resume_worker(rank, world, init_file, out_dir):
    # Review s32M F1, F2: a dict saved between tasks and loaded into a MetaOptimizer that stepped since
    # (a rollback) took the .grad put back for one carried from its own last reduction (refused at
    # step(), or neither summed nor divided); one saved after synchronize() was refused at step().
    with gloo(rank, world, init_file):
        out = {}
        for case in ("rollback", "synchronized"):
            model, loss, data = mlp_problem(0)
            start = copy.deepcopy(model.state_dict())
            meta = meta_for(model, process_group=True, reduction="mean")
            meta.reconfigure(mode="exact")
            meta.zero_grad()
            for t in (0, 1):
                meta.backward(loss, loss, data[2 * rank + t], data[8])
            if case == "synchronized":
                meta.synchronize()
            saved, grads = copy.deepcopy(meta.state_dict()), [p.grad.clone() for p in model.parameters()]
            model, loss, data = mlp_problem(0)
            meta = meta_for(model, process_group=True, reduction="mean")
            meta.reconfigure(mode="exact")
            if case == "rollback":  # an outer step of its own first
                meta.zero_grad()
                meta.backward(loss, loss, data[7], data[8])
                meta.step()
                model.load_state_dict(start)
            meta.load_state_dict(saved)
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            if case == "rollback":
                meta.backward(loss, loss, data[4 + rank], data[8])
            meta.step()
            out[case] = [p.detach().clone() for p in model.parameters()]
        torch.save(out, os.path.join(out_dir, f"resume{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_a_resumed_step_sums_the_ranks_tasks_once(tmp_path):
    mp.spawn(resume_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"resume{r}.pt") for r in range(2)]
    torch.set_default_dtype(torch.float64)
    for case, tasks in (("rollback", (0, 1, 4, 2, 3, 5)), ("synchronized", (0, 1, 2, 3))):
        model, loss, data = mlp_problem(0)  # one process over the union of the ranks' tasks
        meta = meta_for(model, reduction="mean")
        meta.reconfigure(mode="exact")
        meta.zero_grad()
        for t in tasks:
            meta.backward(loss, loss, data[t], data[8])
        meta.step()
        want = [p.detach() for p in model.parameters()]
        for r in ranks:
            assert rel_err(r[case], want) < 1e-12, case


def copied_worker(rank, world, init_file, out_dir):
    with gloo(rank, world, init_file):
        grads = []
        for copied in (False, True):
            model, loss, data = mlp_problem(0)
            meta = meta_for(model, process_group=True, reduction="mean")
            meta.reconfigure(mode="exact")
            meta.backward(loss, loss, data[rank], data[2 + rank])
            meta.step()  # no zero_grad after it: .grad carries this step's mean into the next
            meta.backward(loss, loss, data[4 + rank], data[6 + rank])
            if copied:  # between the tasks of an outer step
                model, meta = copy.deepcopy((model, meta))
            meta.backward(loss, loss, data[6 - rank], data[4])
            meta.synchronize()
            grads.append([p.grad.clone() for p in model.parameters()])
        torch.save(grads, os.path.join(out_dir, f"copied{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_a_copy_between_tasks_keeps_what_grad_carries_from_the_last_reduction(tmp_path):
    # Review s35S F1 (session 35): a copy of a MetaOptimizer with a process_group dropped the record
    # of the gradient .grad carried from the last reduction, and summed and divided it again (28 % off).
    mp.spawn(copied_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        plain, copied = torch.load(tmp_path / f"copied{r}.pt")
        assert rel_err(copied, plain) < 1e-12, r


def one_rank_fails_worker(rank, world, init_file, out_dir):
    import warnings
    with gloo(rank, world, init_file):
        model, loss, data = mlp_problem(0)
        for p in model.parameters():  # .grad held before the constructor: it warns
            p.grad = torch.zeros_like(p)

        def build():
            return torch_ufom.MetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), inner_lr=0.1,
                                            steps=2, mode="exact", process_group=True, reduction="mean")
        if rank == 1:  # the warning raised as an error on one rank, then built again (review s37DW F1)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with pytest.raises(UserWarning, match="process_group: .grad already holds gradients"):
                    build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = build()
        meta.zero_grad()
        for i in (2 * rank, 2 * rank + 1):
            meta.backward(loss, loss, data[i], data[4 + i])
        warned = []
        if rank == 1:  # its outer optimizer alone fails, after the all-reduce (s37DW F2, F3)
            def fail(optimizer, args, kwargs):
                raise RuntimeError("transient")
            handle = meta.optimizer.register_step_pre_hook(fail)
            with pytest.raises(RuntimeError, match="transient"):
                meta.step()
            handle.remove()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                meta.step()
            warned = [str(w.message) for w in caught]
        else:
            meta.step()
        torch.save({"params": [p.detach().clone() for p in model.parameters()], "warned": warned},
                   os.path.join(out_dir, f"fails{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_one_rank_failing_a_warning_or_its_outer_step_then_retrying_stays_in_step(tmp_path):
    # Review s37DW: F1 the constructor warned after its collective: raised as an error on one rank, the
    # rebuild ran it again, out of step (gloo aborted); F2 a step() whose outer optimizer failed on one rank
    # after the all-reduce put back that rank's own sum, and its retry reduced again alone; F3 a restore
    # under a process_group warned at the retry of a change of the user's.
    from oracle import brute_force
    mp.spawn(one_rank_fails_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"fails{r}.pt") for r in range(2)]
    model, loss, data = mlp_problem(0)
    params = list(model.parameters())
    grads = [brute_force(model, loss, loss, lambda j, i=i: data[i], data[4 + i], 2, 0.1, params, 2)
             for i in range(4)]
    want = [p.detach() - 0.1 * sum(g) / 4 for p, g in zip(params, zip(*grads), strict=True)]
    for r in ranks:
        assert rel_err(r["params"], want) < 1e-10
        assert r["warned"] == []
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True))
