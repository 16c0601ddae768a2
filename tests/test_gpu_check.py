"""The GPU check's tiny CPU run passes, and each kind of gated check fails when made to fail."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_check
import torch_ufom
from torch_ufom.unroll import InnerLoop

pytestmark = pytest.mark.slow  # subprocess runs of the GPU check

ROOT = Path(__file__).resolve().parents[1]


def read(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def items(data: dict, part: str) -> list:
    return [c for c in data["checks"] if c["part"] == part]


def test_the_tiny_cpu_run_passes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "tests/gpu_check.py", "--device", "cpu", "--tiny",
                          "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = read(tmp_path)
    assert set(data["parts"]) == set(gpu_check.PARTS)
    assert data["failed"] == 0 and data["gated_skipped"] == 0 and data["meta"]["finished"]
    assert all(c["status"] != "skip" for c in data["checks"])
    exact = items(data, "exactness")
    for name in gpu_check.EXACT_MODELS:
        for mode in ("exact", "fom"):
            (row,) = [c for c in exact if c["name"] == f"{name} {mode} vs oracle"]
            assert row["status"] == "pass" and max(row["rel_err"].values()) < 1e-9
    replay = items(data, "replay")
    assert len(replay) == 2 * len(gpu_check.REPLAY_MODELS)
    assert all(c["status"] == "pass" and all(c["bit_identical"].values()) for c in replay)
    memory = items(data, "memory")
    for name in gpu_check.MEMORY_MODELS:
        for method in gpu_check.MEMORY_ORDER:
            for steps in gpu_check.TINY.memory_steps:
                (row,) = [c for c in memory if c["name"] == f"{name} {method} steps={steps}"]
                assert row["status"] == "report"
    flat = [c for c in memory if c["name"].endswith("flatness")]
    assert [c["status"] for c in flat] == ["n/a", "n/a"]  # no peak measure on the CPU
    speed = items(data, "speed")
    assert all(c["status"] == "report" and c["ratio"]["fom/loop"] > 0 for c in speed[:-1])
    assert set(speed[-1]["path"]) == {"fom", "exact"} and set(speed[-1]["speedup"]) == {"fom", "exact"}
    assert all(c["dispatch_total_per_task"] >= 0 for c in items(data, "sync"))
    assert all(c["status"] == "report" and "runs" in c for c in items(data, "precision"))
    assert "no gated check failed" in (tmp_path / "report.md").read_text()


def test_a_wrong_hypergradient_fails_the_exactness_check(monkeypatch, tmp_path, capsys):
    backward = torch_ufom.MetaOptimizer.backward

    def wrong(self, *args, **kwargs):  # one part in a million off, on one tensor
        out = backward(self, *args, **kwargs)
        with torch.no_grad():
            self.meta_parameters()[0].grad.mul_(1 + 1e-6)
        return out

    monkeypatch.setattr(torch_ufom.MetaOptimizer, "backward", wrong)
    assert gpu_check.main(["--device", "cpu", "--tiny", "--parts", "exactness",
                           "--out", str(tmp_path)]) == 1
    data = read(tmp_path)
    oracle = [c for c in items(data, "exactness") if c["name"].endswith("vs oracle")]
    assert len(oracle) == 2 * len(gpu_check.EXACT_MODELS)
    assert all(c["status"] == "fail" and 1e-7 < max(c["rel_err"].values()) < 1e-5 for c in oracle)
    batch = [c for c in items(data, "exactness") if "backward_batch" in c["name"]]
    assert batch and all(c["status"] == "fail" for c in batch)  # the loop runs backward
    assert data["failed"] >= len(oracle) and "FAILED" in (tmp_path / "report.md").read_text()
    assert "gated failure" in capsys.readouterr().out


def test_a_replay_that_draws_other_masks_fails_the_replay_check(monkeypatch, tmp_path):
    # Without its own random stream per step, a replayed step draws other dropout masks: the
    # check's comparison finds them, or the library's own replay check refuses the call.
    monkeypatch.setattr(InnerLoop, "_seed", lambda self, j: None)
    assert gpu_check.main(["--device", "cpu", "--tiny", "--parts", "replay",
                           "--out", str(tmp_path)]) == 1
    replay = items(read(tmp_path), "replay")
    assert len(replay) == 2 * len(gpu_check.REPLAY_MODELS)
    assert all(c["status"] == "fail" and not all(c["bit_identical"].values())
               or c["status"] == "error" and "inner_loss gave another value when a step was evaluated again"
               in c["error"] for c in replay)


def test_flatness_allows_three_state_copies_of_growth_and_no_more():
    copy, steps = 1000, (10, 100, 1000)
    ok = gpu_check.flatness({10: 1, 100: 50_000, 1000: 53_000}, copy, steps)
    assert ok["status"] == "pass" and ok["growth_state_copies"] == 3.0 and ok["steps"] == [100, 1000]
    bad = gpu_check.flatness({10: 1, 100: 50_000, 1000: 53_001}, copy, steps)
    assert bad["status"] == "fail" and bad["growth_bytes"] == 3001
    assert gpu_check.flatness({10: None, 100: None, 1000: None}, copy, steps)["status"] == "n/a"
    # review EI (session 22): a peak that raised (out of memory at 1000 steps) made it compare the
    # two steps that were measured, and pass
    for peaks in ({10: 1, 100: 50_000}, {}):
        assert gpu_check.flatness(peaks, copy, steps)["status"] == "fail"


def test_a_cuda_device_without_an_index_is_made_current(monkeypatch, tmp_path):
    # Review EI (session 22): torch.cuda.set_device(torch.device("cuda")) raises (no index): the GPU
    # run would have ended before its first item. The CUDA calls are stood in for on the CPU.
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d)))

    def stop(*args, **kwargs):
        raise SystemExit(7)
    monkeypatch.setattr(gpu_check, "describe", stop)  # (the first CUDA query after it)
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cuda", "--tiny", "--parts", "sync", "--out", str(tmp_path)])
    assert chosen == [torch.device("cuda", 0)]
    # torch's own check, which the stand-in replaces: no index is refused before any CUDA call
    with pytest.raises(ValueError, match="specified index"):
        torch.cuda._utils._get_device_index(torch.device("cuda"), optional=False)


def test_a_check_that_raises_fails_and_an_unfinished_run_says_so(tmp_path, capsys):
    report = gpu_check.Report(tmp_path, {"device_name": "x", "commit": "c", "torch": "t",
                                         "cuda": None, "python": "p", "started": "s", "argv": []})
    part = gpu_check.Part(report, "exactness", budget=60, deadline=None)

    def broken():
        raise RuntimeError("no kernel for this")

    row = part.item("broken", broken, gated=True)
    assert row["status"] == "error" and "RuntimeError: no kernel for this" in row["error"]
    assert report.failed() == [row]
    assert "run in progress or cut short" in (tmp_path / "report.md").read_text()
    assert "ERROR" in capsys.readouterr().out


def test_a_spent_time_limit_skips_every_item_and_exits_3(tmp_path):
    assert gpu_check.main(["--device", "cpu", "--tiny", "--parts", "exactness", "--time-limit", "0",
                           "--out", str(tmp_path)]) == 3
    data = read(tmp_path)
    assert data["checks"] and all(c["status"] == "skip" for c in data["checks"])
    assert "INCOMPLETE" in (tmp_path / "report.md").read_text()


def test_sizes_and_parts_are_checked():
    assert gpu_check.sized(gpu_check.Size(), ["memory_steps=10,100", "rounds=3"]).memory_steps == (10, 100)
    with pytest.raises(ValueError, match="expected integers"):
        gpu_check.sized(gpu_check.Size(), ["rounds=three"])
    with pytest.raises(ValueError, match="NAME=VALUE"):
        gpu_check.sized(gpu_check.Size(), ["width=3"])
    with pytest.raises(SystemExit):
        gpu_check.parse(["--parts", "exactness,speeed"])
