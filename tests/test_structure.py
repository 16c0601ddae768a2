"""The wiring rules of issue 11, checked by ``tools/check_structure.py``.

The library must have no violation; each rule is also shown to fire on a
small synthetic package, so that the check cannot pass vacuously.
"""
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_structure", ROOT / "tools" / "check_structure.py")
cs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cs)

# A tiny package: `pub` and `Pub` are public, everything else internal.
INIT = 'from .a import pub, Pub\n__all__ = ["pub", "Pub"]\n'
CONFIG = """
from dataclasses import dataclass
from .truncation import Bernoulli

@dataclass(frozen=True)
class Settings:
    mode: str = "ufom"
    q: float = 0.1

def law(q):
    return Bernoulli(q)
"""
TRUNCATION = """
class Bernoulli:
    def __init__(self, q):
        self.q = q

def half():
    return Bernoulli(0.5)
"""


def violations(a_source, allow=None):
    """The checker's lines for module ``a.py`` in the tiny package, keeping only a.py's."""
    sources = {"pkg/__init__.py": INIT, "pkg/config.py": CONFIG, "pkg/truncation.py": TRUNCATION,
               "pkg/a.py": textwrap.dedent(a_source)}
    return [line for line in cs.check(sources, allow={} if allow is None else allow)
            if line.startswith("pkg/a.py:")]


NINE = "a, b, c, d, e, f, g, h, i"
P9 = "takes 9 parameters (at most 8)"
W = "on an object it did not create"
R4 = "(...) outside config.py"


def test_library_has_no_violation():
    package = sorted((ROOT / "torch_ufom").glob("*.py"))
    found = cs.check({f"torch_ufom/{p.name}": p.read_text() for p in package})
    assert found == [], "\n".join(found)


def test_command_line_exit_status(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text(f"def _f({NINE}):\n    pass\n")
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "check_structure.py"), str(pkg)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stdout.startswith("pkg/a.py:1: R1 _f: takes 9 parameters")
    (pkg / "a.py").write_text("def _f(a):\n    pass\n")
    good = subprocess.run([sys.executable, str(ROOT / "tools" / "check_structure.py"), str(pkg)],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stdout


@pytest.mark.parametrize("source, expected", [
    (f"def _f({NINE}):\n    pass\n", ["pkg/a.py:1: R1 _f: " + P9]),
    (f"def helper(*, {NINE}):\n    pass\n", ["pkg/a.py:1: R1 helper: " + P9]),
    (f"class _C:\n    def m(self, {NINE}):\n        pass\n", ["pkg/a.py:2: R1 _C.m: " + P9]),
    (f"class Pub:\n    def _m(self, {NINE}):\n        pass\n", ["pkg/a.py:2: R1 Pub._m: " + P9]),
    (f"def pub():\n    def inner({NINE}):\n        pass\n",
     ["pkg/a.py:2: R1 pub.inner: " + P9]),
    (f"f = lambda {NINE}: a\n", ["pkg/a.py:1: R1 <lambda>: " + P9]),
    (f"def _f(a, *rest, {NINE[6:]}, **kw):\n    pass\n", ["pkg/a.py:1: R1 _f: " + P9]),
    # Public signatures, self, and at most 8 parameters pass.
    (f"def pub({NINE}):\n    pass\n\nclass Pub:\n    def __init__(self, {NINE}):\n        pass\n"
     f"    def run(self, {NINE}):\n        pass\n", []),
    ("def _f(self, a, b, c, d, e, f, g, h):\n    pass\n", []),
], ids=["function", "keyword-only", "method", "private-method", "nested", "lambda", "star-args", "public",
        "eight"])
def test_r1_params(source, expected):
    assert violations(source) == expected


@pytest.mark.parametrize("source, expected", [
    ("def _f(**kw):\n    return g(**kw)\n", ["pkg/a.py:2: R2 _f: relays kw to g()"]),
    ("def pub(x, **extra):\n    return g(x, extra)\n", ["pkg/a.py:2: R2 pub: relays extra to g()"]),
    ("def _f(options):\n    return g(opts=options)\n", ["pkg/a.py:2: R2 _f: relays options to g()"]),
    ("def _f(**kw):\n    return lambda: g(**kw)\n", ["pkg/a.py:2: R2 _f: relays kw to g()"]),
    ("def _f(q):\n    return g({'mode': 'ufom', 'q': q})\n",
     ["pkg/a.py:2: R2 _f: passes a dict of knobs to g()"]),
    ("def _f(q):\n    return g(**dict(q=q))\n", ["pkg/a.py:2: R2 _f: passes a dict of knobs to g()"]),
    ("def _f(q):\n    d = {'q': q}\n    return g(**d)\n",
     ["pkg/a.py:3: R2 _f: passes a dict of knobs to g()"]),
    ("def _f(s):\n    return g(**vars(s))\n", ["pkg/a.py:2: R2 _f: passes a dict of knobs to g()"]),
    # Reading a **kw, or a dict without knob names, is no relay.
    ("def _f(**kw):\n    return kw.get('x')\n\ndef _g(x):\n    return h(**{'x': x})\n", []),
], ids=["star-star", "as-dict", "options", "closure", "dict-display", "dict-call", "local-dict", "vars",
        "not-relayed"])
def test_r2_relay(source, expected):
    assert violations(source) == expected


def test_r2_allow_list_and_stale_entry():
    source = "def _f(**kw):\n    return g(**kw)\n"
    assert violations(source, allow={("a.py", "_f", "R2"): "reason"}) == []
    assert violations("def _f():\n    pass\n", allow={("a.py", "_f", "R2"): "reason"}) == [
        "pkg/a.py:1: R2 _f: allow-list entry matches nothing; remove it"]


@pytest.mark.parametrize("source, expected", [
    ("def _f(loop):\n    loop.exact_after = 3\n", ["pkg/a.py:2: R3 _f: writes loop.exact_after " + W]),
    ("def _f(loop):\n    loop.count += 1\n", ["pkg/a.py:2: R3 _f: writes loop.count " + W]),
    ("def _f(loop):\n    del loop.x\n", ["pkg/a.py:2: R3 _f: writes loop.x " + W]),
    ("def _f(loop):\n    loop.a, b = 1, 2\n", ["pkg/a.py:2: R3 _f: writes loop.a " + W]),
    ("def _f(loop):\n    setattr(loop, 'x', 1)\n",
     ["pkg/a.py:2: R3 _f: writes loop.<setattr> " + W]),
    ("class _C:\n    def m(self, o):\n        self.o.x = 1\n",
     ["pkg/a.py:3: R3 _C.m: writes self.o.x " + W]),
    ("import torch\ntorch.flag = True\n", ["pkg/a.py:2: R3 <module>: writes torch.flag " + W]),
    ("from .config import Settings\ndef _f():\n    s = Settings()\n    s.q = 1\n",
     ["pkg/a.py:4: R3 _f: writes s.q " + W]),
    # self/cls, objects created here, torch's .grad slot and item writes pass.
    ("class _C:\n    def __init__(self):\n        self.x = 1\n        object.__setattr__(self, 'y', 2)\n"
     "    def __setattr__(self, n, v):\n        super().__setattr__(n, v)\n"
     "    @classmethod\n    def make(cls):\n        c = cls.__new__(cls)\n        c.x = 1\n        return c\n"
     "def _f(p, d):\n    c = _C()\n    c.x = 2\n    p.grad = None\n    d.items[0] = 1\n", []),
], ids=["assign", "augmented", "delete", "tuple", "setattr", "nested-owner", "module-level",
        "other-module-class", "allowed"])
def test_r3_attribute_write(source, expected):
    assert violations(source) == expected


@pytest.mark.parametrize("source, expected", [
    ("from .truncation import Bernoulli\ndef _f(q):\n    return Bernoulli(q)\n",
     ["pkg/a.py:3: R4 _f: builds Bernoulli" + R4]),
    ("from . import inner\ndef _f(lr):\n    return inner.SGD.from_inner_lr(lr)\n",
     ["pkg/a.py:3: R4 _f: builds inner.SGD.from_inner_lr" + R4]),
    ("def _f(m, s):\n    return make_schedule(m, s)\n", ["pkg/a.py:2: R4 _f: builds make_schedule" + R4]),
    ('def _f(q):\n    """Returns Bernoulli(q) from the config."""\n    return q\n', []),
], ids=["law", "rule", "schedule", "docstring"])
def test_r4_knob_objects(source, expected):
    assert violations(source) == expected


def test_r4_allowed_in_config_and_defining_module():
    sources = {"pkg/__init__.py": INIT, "pkg/config.py": CONFIG, "pkg/truncation.py": TRUNCATION}
    assert cs.check(sources, allow={}) == []
