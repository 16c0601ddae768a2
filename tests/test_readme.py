"""The README's quick start runs as written (with a small Net and task stream)."""
import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_start_runs_and_fills_the_gradients():
    with open(os.path.join(ROOT, "README.md")) as f:
        code = re.findall(r"```python\n(.*?)```", f.read(), re.S)[0]
    g = torch.Generator().manual_seed(0)

    def batch():
        return torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)

    env = {"Net": lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                              torch.nn.Linear(8, 3)),
           "meta_batches": [[(batch(), batch()) for _ in range(2)] for _ in range(2)]}
    exec(compile(code, "README.md", "exec"), env)
    model = env["model"]
    assert all(p.grad is not None for p in model.parameters())
    assert env["meta"].steps == 20
