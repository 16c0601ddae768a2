"""Check the wiring rules of issue 11 on ``torch_ufom/*.py`` with :mod:`ast`.

Run ``python tools/check_structure.py [package_dir]``: one line per violation,
``file:line: rule qualname: what``, and a non-zero exit status if there is any.
``tests/test_structure.py`` runs it. Why: configuration relayed as loose
keywords through long signatures, one module setting attributes on another's
object just before a third reads them, and knob checks spread over modules
made one new knob a dozen edits in four files. These rules keep a knob a change
to ``config.py`` plus the code that uses the resolved object. The checks are
syntactic (they see names, not types), so each heuristic below errs on the
side of reporting:

R1 params: an internal function takes at most ``MAX_PARAMS`` parameters
   (positional, keyword-only and ``*args``; not a leading ``self``/``cls``, and
   not ``**kwargs``, which is R2's business). Internal is everything but the
   public API: the names in ``__init__.__all__`` imported from a module, every
   name in the ``__all__`` of a module that ``__init__`` exports whole, and the
   public or dunder methods of those classes (``hypergrad``,
   ``MetaOptimizer.__init__``, the inner rules' constructors: their signatures
   are the API). Nested functions and lambdas count as internal, without an
   exemption: a closure with nine parameters is as hard to read as any other.
R2 relay: no function passes configuration on as a bag. A parameter relays if
   it is ``**name`` or named like an options dict (``OPTION_NAMES``) and is used
   as an argument of a call (``f(**name)``, ``f(name)``, ``f(x=name)``); reading
   it (``kwargs.get(...)``) is not a relay. A dict of knobs passed on is a
   dict display with a knob key, ``dict(knob=...)``, ``asdict(...)`` or
   ``vars(...)``, or a local bound to one, given to a call. Knobs are the fields
   of ``config.Settings``, so the list follows the configuration.
R3 attribute-write: no module writes an attribute on another module's object.
   ``o.attr = / += / del`` and ``setattr``/``delattr``/``object.__setattr__(o, ...)``
   are allowed only where ``o`` is ``self``/``cls`` (``super().__setattr__`` too) or
   a local created in the same function by a call to a class of the same
   module, ``cls(...)``, ``X.__new__(...)`` or ``replace(...)`` (dataclasses);
   attributes in ``PROTOCOL_ATTRS`` are exempt. Item writes (``o.a[i] = ...``)
   are mutations, not attribute writes, and are not checked.
R4 knob-object: the objects that user knobs stand for (``CONSTRUCTORS``) are
   built only in ``KNOB_MODULE`` and in the module that defines them. Docstrings
   do not count (only calls in the syntax tree do).

``ALLOW`` lists the accepted exceptions, each with its reason; an entry that
matches nothing is itself reported, so the list cannot go stale.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_PARAMS = 8
OWN = {"self", "cls"}
OPTION_NAMES = {"options", "opts", "kwargs", "kw", "config_dict", "knobs"}
DICT_MAKERS = {"dict", "asdict", "vars"}
FRESH = {"cls", "replace", "__new__"}  # callees (besides own classes) whose result is a new object
PROTOCOL_ATTRS = {"grad": "torch's documented gradient slot, which torch.optim optimizers read"}
KNOB_MODULE = "config.py"
CONSTRUCTORS = {  # callee -> the module that defines it
    "Bernoulli": "truncation.py", "Fixed": "truncation.py", "AdaptiveQ": "adaptive.py",
    "SGD": "inner.py", "from_inner_lr": "inner.py", "make_schedule": "schedules.py",
    "Store": "schedules.py", "Recompute": "schedules.py", "Checkpoint": "schedules.py"}
ALLOW = {  # (module, qualname, rule) -> reason
    ("config.py", "Settings.replace", "R2"): "a thin wrapper over dataclasses.replace that checks "
    "the names against the fields first",
    ("meta_optimizer.py", "MetaOptimizer.reconfigure", "R2"): "public API reconfigure(mode=..., q=...); "
    "hands the user's keywords to Settings.replace, which checks them",
    ("process.py", "one_call_at_a_time.run", "R2"): "a decorator: hands a public entry point its own "
    "arguments, unchanged, under the process lock",
    ("functional_model.py", "FunctionalModel.__call__", "R2"): "forwards the user's call arguments to "
    "the user's module (the nn.Module call protocol), not configuration",
    ("functional_model.py", "FunctionalModel._functional_call", "R2"): "forwards the user's call "
    "arguments to the user's module through torch.func.functional_call (as __call__), not configuration",
    ("functional_model.py", "FunctionalModel.run", "R2"): "forwards the user's arguments to the user's "
    "function of the module (fmodel.run(fn, *args, **kwargs), as __call__), not configuration",
    ("unroll.py", "InnerLoop.record", "R3"): "sets the StepRecord's linked flag, which only the loop "
    "knows once it has built the record (records.py holds the class since the split; its constructor is "
    "at R1's parameter limit)",
    ("adapt.py", "StackedFunctionalModel.__call__", "R2"): "forwards the user's call arguments to "
    "the user's module under vmap (the nn.Module call protocol), not configuration",
    ("vectorised.py", "_Probe.__torch_function__", "R2"): "signature fixed by torch's TorchFunctionMode",
    ("vectorised.py", "_schema_args", "R2"): "names an ATen call's arguments by its schema, for the "
                                              "probe's tests",
    ("vectorised.py", "_restore", "R3"): "puts back the fields of the user's own objects (a dataclass, "
    "a __slots__ class) that a look's evaluation of the user's forward wrote",
    ("functional_model.py", "FunctionalModel.to_module", "R3"): "sets a plain attribute the model gives on a "
    "submodule of the deep copy it made and returns (as functional_call sets it)"}


def _name(f):
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _all(tree):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(_name(t) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
            and not n.name.startswith("_")}


def _exports(trees):
    """module -> its public top-level names, from ``__init__.py``."""
    out = {m: set() for m in trees}
    init = trees.get("__init__.py")
    names = _all(init) if init else set()
    for node in init.body if init else ():
        for a in node.names if isinstance(node, ast.ImportFrom) and node.level == 1 else ():
            whole, module = node.module is None, f"{node.module or a.name}.py"
            if a.name in names and module in trees:  # `from . import inner` exports inner.__all__
                out[module] |= _all(trees[module]) if whole else {a.name}
    return out


def _knobs(trees):
    for node in ast.walk(trees.get(KNOB_MODULE, ast.Module(body=[]))):
        if isinstance(node, ast.ClassDef) and node.name == "Settings":
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    return set()


class _Module(ast.NodeVisitor):
    def __init__(self, module, tree, public, knobs):
        self.module, self.public, self.knobs, self.found = module, public, knobs, []
        self.classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
        self.stack, self.fresh, self.bags = [], [set()], [set()]
        self.visit(tree)

    def report(self, node, rule, what):
        self.found.append((node.lineno, rule, ".".join(self.stack) or "<module>", what))

    def visit_ClassDef(self, node):
        self.stack.append(node.name)
        self.generic_visit(node)
        del self.stack[-1]

    def visit_FunctionDef(self, node, name=None):
        self.stack.append(name or node.name)
        a = node.args
        params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs] + ([a.vararg.arg] if a.vararg else [])
        params = params[1:] if params and params[0] in OWN else params
        if len(params) > MAX_PARAMS and not self._public():
            self.report(node, "R1", f"takes {len(params)} parameters (at most {MAX_PARAMS})")
        bags = {p for p in params if p in OPTION_NAMES} | ({a.kwarg.arg} if a.kwarg else set())
        fresh, local_bags = set(), set()
        for n in ast.walk(node):
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
                if isinstance(n.value, ast.Call) and _name(n.value.func) in self.classes | FRESH:
                    fresh.add(n.targets[0].id)
                if self._bag(n.value):
                    local_bags.add(n.targets[0].id)
            if isinstance(n, ast.Call) and any(isinstance(v, ast.Name) and v.id in bags for v in _args(n)):
                self.report(n, "R2", f"relays {', '.join(sorted(bags))} to {ast.unparse(n.func)}()")
        self.fresh.append(self.fresh[-1] | fresh)
        self.bags.append(local_bags)
        self.generic_visit(node)
        del self.stack[-1], self.fresh[-1], self.bags[-1]

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node):
        self.visit_FunctionDef(node, "<lambda>")

    def _public(self):  # a public function, or a public or dunder method of a public class
        *owner, name = self.stack
        return name in self.public if not owner else (
            len(owner) == 1 and owner[0] in self.public & self.classes and name.isidentifier()
            and (not name.startswith("_") or name.endswith("__")))

    def _bag(self, e):
        if isinstance(e, ast.Name):
            return e.id in self.bags[-1]
        if isinstance(e, ast.Dict):
            return any(isinstance(k, ast.Constant) and k.value in self.knobs for k in e.keys)
        f = _name(e.func) if isinstance(e, ast.Call) else None  # dict(k=...), asdict(x), vars(x)
        return f in DICT_MAKERS and (f != "dict" or any(k.arg in self.knobs for k in e.keywords))

    def visit_Call(self, node):
        callee = _name(node.func)
        if any(self._bag(v) for v in _args(node)):
            self.report(node, "R2", f"passes a dict of knobs to {ast.unparse(node.func)}()")
        if callee in ("setattr", "delattr", "__setattr__", "__delattr__"):
            owner = getattr(node.func, "value", None)  # o.__setattr__(...), object.__setattr__(o, ...)
            if owner is None or _name(owner) == "object":
                owner = node.args[0] if node.args else None
            if owner is not None and _name(getattr(owner, "func", None)) != "super":
                self._write(node, owner, "<setattr>")
        where = CONSTRUCTORS.get(callee)
        if where and self.module not in (KNOB_MODULE, where):
            self.report(node, "R4", f"builds {ast.unparse(node.func)}(...) outside {KNOB_MODULE}")
        self.generic_visit(node)

    def visit_Attribute(self, node):  # o.attr as an assignment, augmented, for, with or del target
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self._write(node, node.value, node.attr)
        self.generic_visit(node)

    def _write(self, node, owner, attr):
        if attr in PROTOCOL_ATTRS or isinstance(owner, ast.Name) and owner.id in OWN | self.fresh[-1]:
            return
        self.report(node, "R3", f"writes {ast.unparse(owner)}.{attr} on an object it did not create")


def _args(call):
    return list(call.args) + [k.value for k in call.keywords]


def check(sources, allow=None):
    """Violations in ``sources`` (``{path: text}``), as ``path:line: rule qualname: what`` lines."""
    allow = ALLOW if allow is None else allow
    trees = {Path(p).name: ast.parse(text, p) for p, text in sources.items()}
    paths = {Path(p).name: p for p in sources}
    public, knobs, used, out = _exports(trees), _knobs(trees), set(), []
    for m, tree in trees.items():
        for line, rule, qual, what in _Module(m, tree, public[m], knobs).found:
            used.add((m, qual, rule))
            if (m, qual, rule) not in allow:
                out.append((paths[m], line, f"{rule} {qual}: {what}"))
    out += [(paths[m], 1, f"{rule} {qual}: allow-list entry matches nothing; remove it")
            for m, qual, rule in set(allow) - used if m in trees]
    return [f"{p}:{line}: {msg}" for p, line, msg in sorted(out)]


def main(argv):
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "torch_ufom"
    found = check({f"{root.name}/{p.name}": p.read_text() for p in sorted(root.glob("*.py"))})
    print("\n".join(found or [f"{root}: no violations"]))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
