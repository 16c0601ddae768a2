"""The recipes in ``examples/`` run at their tiny size and print what they promise.

Each example runs in a subprocess with this interpreter (``--tiny``; the
data-parallel one under ``python -m torch.distributed.run``, which is
``torchrun``), and the test reads the figures it prints: adaptation beats the
unadapted model, ANIL leaves the body as it is, the learned rates moved, stay
non-negative and lowered the validation loss, the ranks end with identical
parameters. A static check keeps the examples on the public API and within
about 100 lines; the benchmarks too keep to the public API.
"""
import ast
import os
import re
import subprocess
import sys

import pytest
import torch.distributed as dist

import torch_ufom

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TESTED = {"few_shot_digits.py", "anil.py", "learned_rates.py", "data_parallel.py"}
FLOAT = r"(\d+(?:\.\d+)?(?:e-?\d+)?)"


def run(*args, timeout=300):
    """Run ``python *args`` from the repository root with this tree's torch_ufom; its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def public_names(module):
    return set(getattr(module, "__all__", ())) or {n for n in vars(module) if not n.startswith("_")}


def assert_public_api_only(name, source):
    """Every ``torch_ufom`` name that ``source`` imports or reads is public, private names
    of its public modules too (``adaptive._choose``, ``torch_ufom.adaptive._choose``)."""
    tree = ast.parse(source)
    modules = {"torch_ufom"} | {alias.asname or alias.name for node in ast.walk(tree)
                                if isinstance(node, ast.ImportFrom) and node.module == "torch_ufom"
                                for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            assert not (isinstance(root, ast.Name) and root.id in modules), (name, ast.unparse(node))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch_ufom":
            module = node.module.split(".")
            assert len(module) == 1 or module[1] in public_names(torch_ufom), (name, node.module)
            target = torch_ufom if len(module) == 1 else getattr(torch_ufom, module[1])
            for alias in node.names:
                assert alias.name in public_names(target), (name, node.module, alias.name)
        if isinstance(node, ast.Import):
            for alias in node.names:
                module = alias.name.split(".")
                assert module[0] != "torch_ufom" or len(module) == 1 or module[1] in public_names(
                    torch_ufom), (name, alias.name)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "torch_ufom":
            assert node.attr in public_names(torch_ufom), (name, node.attr)


def test_every_example_is_tested_short_and_uses_the_public_api_only():
    files = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py"))
    assert set(files) == TESTED
    for name in files:
        with open(os.path.join(EXAMPLES, name), encoding="utf-8") as f:
            source = f.read()
        assert len(source.splitlines()) <= 110, name
        assert "--tiny" in source, name
        assert_public_api_only(name, source)


def test_the_public_api_check_sees_private_names_of_public_modules():
    for source in ("from torch_ufom import adaptive\nadaptive._choose(1, 2)",
                   "import torch_ufom\ntorch_ufom.adaptive._debiased(1, 2, 3)",
                   "from torch_ufom.adaptive import _debiased"):
        with pytest.raises(AssertionError):
            assert_public_api_only("snippet", source)
    assert_public_api_only("snippet", "from torch_ufom import adaptive\nadaptive.optimal_q(1, 0, 1, 1, 0.1)")


def test_the_benchmarks_use_the_public_api_only():
    folder = os.path.join(ROOT, "benchmarks")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    assert "speed.py" in files
    for name in files:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            assert_public_api_only(name, f.read())


@pytest.mark.slow
def test_few_shot_digits_adapts_and_reports_accuracy_through_aux():
    out = run("examples/few_shot_digits.py", "--tiny")
    train = re.findall(rf"^outer step \d+: query accuracy after 5 inner steps {FLOAT} \((\d+)/4 exact",
                       out, re.M)
    assert len(train) == 5, out
    assert all(0.0 <= float(a) <= 1.0 and 0 <= int(e) <= 4 for a, e in train), out
    found = re.search(rf"accuracy {FLOAT} before adaptation, {FLOAT} after 10 inner steps", out)
    assert found, out
    before, after = map(float, found.groups())
    assert 0.0 <= before < after <= 1.0, out


@pytest.mark.slow
def test_anil_adapts_the_head_only_and_meta_learns_the_body():
    out = run("examples/anil.py", "--tiny")
    norms = re.search(r"meta-gradient norm at step 0 \(summed over the meta-batch; step\(\) takes the "
                      rf"mean\): body {FLOAT}, head {FLOAT}", out)
    assert norms and float(norms.group(1)) > 0 and float(norms.group(2)) > 0, out
    line = re.search(r"^largest change by adaptation: (.*)$", out, re.M)
    assert line, out
    change = {n: float(v) for n, v in re.findall(rf"([\w.]+) {FLOAT}", line.group(1))}
    assert set(change) == {"body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias",
                           "head.weight", "head.bias"}, out
    assert all(v == 0.0 for n, v in change.items() if n.startswith("body.")), out
    assert all(v > 0.0 for n, v in change.items() if n.startswith("head.")), out
    accuracy = re.search(rf"5-way 5-shot: accuracy {FLOAT} after 10 inner steps", out)
    assert accuracy and 0.0 <= float(accuracy.group(1)) <= 1.0, out


@pytest.mark.slow
def test_learned_rates_move_per_weight_and_per_step_with_checkpointing():
    out = run("examples/learned_rates.py", "--tiny")
    for name in ("meta-sgd", "lslr"):  # 20 inner steps > 8 slots: replays, every step rebuilt
        mse = re.search(rf"^{name}: validation query MSE after 20 inner steps {FLOAT} before, {FLOAT} after",
                        out, re.M)
        assert mse and 0.0 < float(mse.group(2)) < float(mse.group(1)), out
        counts = re.search(rf"^{name}: 20 inner steps per task, (\d+) run forward .*, (\d+) rebuilt",
                           out, re.M)
        assert counts and int(counts.group(1)) > 20 and int(counts.group(2)) == 20, out
    per_weight = re.findall(rf"^meta-sgd rate (\S+): mean {FLOAT}, min {FLOAT}, max {FLOAT}", out, re.M)
    assert len(per_weight) == 6, out
    for name, mean, low, high in per_weight:
        assert 0.0 <= float(low) <= float(mean) <= float(high), out
        if name.endswith("weight"):  # one rate per weight: they spread out
            assert float(low) < float(high), out
    per_step = re.findall(rf"^lslr rate (\S+): step 0 {FLOAT}, step 10 {FLOAT}, step 19 {FLOAT}",
                          out, re.M)
    assert len(per_step) == 6, out
    rates = [float(v) for _, *values in per_step for v in values]
    assert all(v >= 0.0 for v in rates) and any(v != 0.01 for v in rates), out
    assert any(len(set(values)) > 1 for _, *values in per_step), out  # rates differ by step


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not built in")
def test_data_parallel_ranks_end_with_identical_parameters():
    out = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "examples/data_parallel.py", "--tiny")
    sums = dict(re.findall(r"^rank (\d): final parameters sha256 ([0-9a-f]{16})$", out, re.M))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"], out
    assert "identical parameters on all 2 ranks: yes" in out, out
    losses = re.findall(rf"^outer step \d+: query MSE {FLOAT} \(mean over 4 tasks on 2 ranks\)", out, re.M)
    assert len(losses) == 3, out
