"""``benchmarks/small_batches.py`` at its tiny size.

Timings on a shared machine say nothing here: the test checks that every cell ran under the three
settings, that the report says what ``"auto"`` ran, and that the target is computed from the times.
"""
import json
import os

import pytest

pytestmark = pytest.mark.slow  # benchmark runs


@pytest.mark.fewest_tasks
def test_small_batches_tiny_reports_every_cell(tmp_path):
    from benchmarks import small_batches

    out = small_batches.main(["--tiny", "--out", str(tmp_path), "--no-progress"])
    records = out["records"]
    cells = {(p, m) for p in (False, True) for m in ("fom", "exact")}
    assert {(r["per_step"], r["mode"]) for r in records} == cells
    for r in records:
        assert set(r["times"]) == {"True", "False", "auto"} and all(t > 0 for t in r["times"].values())
        assert r["auto_path"].startswith("per-task loop: vectorising groups of fewer than")  # 2 tasks
    worst = max(r["times"]["auto"] / min(r["times"]["True"], r["times"]["False"]) for r in records)
    (target,) = out["targets"]
    assert target["value"] == pytest.approx(worst)
    with open(os.path.join(tmp_path, "small_batches.json")) as f:
        assert json.load(f)["records"] == json.loads(json.dumps(records))
    assert "| mode  | B |" in open(os.path.join(tmp_path, "small_batches.md")).read()
