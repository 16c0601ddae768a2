"""The random generators a call must leave as it found them, and the draws it must notice.

A call reseeds torch's global generators for every inner step (so that a step
recomputed later draws the same numbers) and puts them back afterwards; a look
at the losses may call the user's code, which may draw from NumPy's or Python's
generators too. This module holds the small pieces all of that is made of:

* torch's global generators: :func:`torch_random_states` /
  :func:`set_torch_random_states` (a reading put back on some exits, or more
  than once) and :func:`torch_random_states_kept` (``fork_rng`` around a block),
  for the CPU and :func:`cuda_devices_in_use`;
* NumPy's and Python's: :func:`host_random_states` / :func:`set_host_random_states`
  (:func:`host_random_states_kept` around a block); :func:`random_states_kept`
  keeps all of them around a block;
* what a public call puts back: :func:`restore_rng_on_error` (torch's CPU generator
  and a ``generator=`` of the user's, if the call raises: a retry draws the same
  numbers), and the base seed every call's per-step streams start from
  (:func:`draw_seed`);
* draws from a generator of the user's, which no per-step stream reseeds:
  :class:`OwnDraws` notices them (:func:`is_default_generator`,
  :func:`generator_position`).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import random
import sys
from typing import List, Optional, Sequence

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["torch_random_states", "set_torch_random_states", "torch_random_states_kept",
           "cuda_devices_in_use", "host_random_states", "set_host_random_states", "host_random_states_kept",
           "random_states_kept", "restore_rng_on_error", "draw_seed", "OwnDraws", "is_default_generator",
           "generator_position", "states_differ", "REPLAY_DRAWS"]


@functools.lru_cache(maxsize=None)
def generator_position(func) -> int:
    """Where an ATen operation takes its ``generator`` argument (-1: it takes none)."""
    names = [a.name for a in func._schema.arguments]
    return names.index("generator") if "generator" in names else -1


def is_default_generator(gen: torch.Generator) -> bool:
    """Whether ``gen`` is a device's default generator (passed explicitly: the per-step
    streams reseed it, as when it is left out). The dispatcher hands over another
    Python object for the same generator, so the default one is reseeded with a
    sentinel and ``gen`` checked for following it (a generator of the user's with the
    same state does not); both states are put back."""
    if gen.device.type == "cpu":
        default = torch.default_generator
    elif gen.device.type == "cuda" and torch.cuda.is_initialized():
        default = torch.cuda.default_generators[gen.device.index or 0]
    else:
        return False
    saved, before = default.get_state(), gen.get_state()
    try:
        default.manual_seed(_SENTINEL)
        return torch.equal(gen.get_state(), default.get_state()) and not torch.equal(before, gen.get_state())
    finally:
        default.set_state(saved)


_SENTINEL = 0x5EED_7A3F_91C2_55E1  # a seed no generator of the user's is likely to hold


def host_random_states() -> tuple:
    """The global states of Python's ``random`` and, where NumPy is imported, of NumPy's
    legacy generator (``np.random.*``), comparable with ``==`` (:func:`set_host_random_states`
    puts them back)."""
    states: list = [random.getstate()]
    np = sys.modules.get("numpy")
    if np is not None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        states.append((name, keys.tobytes(), pos, has_gauss, gauss))
    return tuple(states)


def set_host_random_states(states: tuple) -> None:
    """Put back what :func:`host_random_states` returned."""
    random.setstate(states[0])
    if len(states) > 1:
        np = sys.modules["numpy"]
        name, keys, pos, has_gauss, gauss = states[1]
        np.random.set_state((name, np.frombuffer(keys, dtype=np.uint32).copy(), pos, has_gauss, gauss))


def torch_random_states(devices: Optional[Sequence[int]] = None) -> tuple:
    """The states of torch's global generators: the CPU's and those of the CUDA ``devices``
    (by default :func:`cuda_devices_in_use`); :func:`set_torch_random_states` puts them back
    (:func:`torch_random_states_kept` does both around a block: this pair serves a body that
    puts them back more than once, or only on some exits)."""
    devices = cuda_devices_in_use() if devices is None else devices
    return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in devices]


def torch_random_states_kept(devices: Sequence[int]):
    """``torch.random.fork_rng`` for the CPU and the CUDA ``devices`` (the indices
    :func:`cuda_devices_in_use` gives): their generators put back on leaving the block."""
    return torch.random.fork_rng(devices=devices, device_type="cuda")


def states_differ(a: tuple, b: tuple) -> bool:
    """Whether two :func:`torch_random_states` readings differ (a draw happened between them)."""
    return not torch.equal(a[0], b[0]) or any(not torch.equal(x, y) for (_, x), (_, y) in zip(a[1], b[1]))


def set_torch_random_states(states: tuple) -> None:
    """Put back what :func:`torch_random_states` returned."""
    torch.set_rng_state(states[0])
    for d, state in states[1]:
        torch.cuda.set_rng_state(state, d)


class OwnDraws(TorchFunctionMode):
    """Notes whether the code run under it draws from a generator of the user's: a call
    given a ``torch.Generator`` other than a device's default one, by keyword
    (``torch.rand(..., generator=g)``) or by position (``torch.poisson(rates, g)``)
    (``found``); every call runs as it would without the mode."""

    def __init__(self):
        super().__init__()
        self.found = False

    # Not compiled by Dynamo on its own: a torch.compile'd loss that runs eagerly under the mode
    # (after torch skipped it once under the library's dispatch-mode probes, it always does)
    # leaves Dynamo's frame callback set, which compiled this frame, recompiled it with the ops'
    # int arguments made symbolic, and torch's double backward failed on them ('NYI SymInt
    # equality', review HE F4). (Differentiates's too: a compiled module's graph cached under it
    # kept a parameter of an earlier call as a constant, review IC F1: 5 % off, silently.)
    @functools.partial(torch.compiler.disable, recursive=False)
    def __torch_function__(self, func, types, args=(), keywords=None):
        keywords = keywords or {}
        if not self.found:
            self.found = any(isinstance(a, torch.Generator) and not is_default_generator(a)
                             for a in itertools.chain(args, keywords.values()))
        return func(*args, **keywords)


def cuda_devices_in_use() -> List[int]:
    """Every CUDA device's index once CUDA is initialised, else none: the devices whose global
    generators a call saves, reseeds per step and restores (review s38CU F2: those of the
    parameters' devices only missed a loss drawing on another, a model on cuda:1 whose loss
    draws with device="cuda"). A generator's state lives on the host: reading or setting it
    makes no device context."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


@contextlib.contextmanager
def random_states_kept():
    """Put torch's global generators (the CPU's and those of the CUDA devices in use) and
    NumPy's and Python's back as they were on leaving (review s35C F1: a look calling a
    ``j -> batch`` callable that samples moved the program's stream on a successful call,
    ``generator=`` given or not, and under ``ufom`` on exact draws only)."""
    with host_random_states_kept(), torch_random_states_kept(cuda_devices_in_use()):
        yield


@contextlib.contextmanager
def host_random_states_kept():
    """Put NumPy's and Python's global generators back as they were on leaving (review JA F8:
    ``diagnose``, which runs the losses many times, left them advanced)."""
    host = host_random_states()
    try:
        yield
    finally:
        set_host_random_states(host)


@contextlib.contextmanager
def restore_rng_on_error(generator: Optional[torch.Generator], always: bool = False):
    """Put the generator and torch's global CPU generator back as they were if the body
    raises, so that a retry draws the same numbers (``always``: whatever happens). NumPy's and
    Python's global generators, which only the user's losses draw from, are not saved: reading
    NumPy's state costs about 30 us a call (review s32E F1; ``diagnose``, which runs the losses
    many times, puts them back)."""
    saved = [(torch.default_generator, torch.default_generator.get_state())]
    if generator is not None:
        saved.append((generator, generator.get_state()))
    try:
        yield
    except BaseException:
        for gen, state in saved:
            gen.set_state(state)
        raise
    if always:
        for gen, state in saved:
            gen.set_state(state)


def draw_seed(generator: Optional[torch.Generator]) -> int:
    """The base seed of a call's per-step random streams, drawn from ``generator`` (torch's
    global CPU generator when ``None``): :func:`~torch_ufom.functional.draw` and
    :func:`~torch_ufom.adapt` draw it alike, so that adapting and a hypergradient see the
    same streams."""
    device = generator.device if generator is not None else "cpu"
    # tolist(): the same numbers as int() / float(), read on the host without a dispatched
    # aten._local_scalar_dense (no device synchronisation with a CPU generator).
    return torch.randint(0, 1 << 62, (), generator=generator, device=device).tolist()


REPLAY_DRAWS = (
    "inner_loss draws from a torch.Generator of your own (generator=...), which no step's random "
    "stream replays: memory='{memory}' evaluates inner steps again, and each evaluation would draw "
    "other numbers than the forward pass did, so the sweep would differentiate another function. "
    "Draw from the global generator (each step's stream reseeds it), or pass memory='store', which "
    "evaluates each step once")
