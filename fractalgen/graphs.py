"""Static-shape sampling steps, replayed as CUDA graphs on CUDA.

Sampling is thousands of dependent steps, each a few dozen tiny kernels: on a GPU launching them
from Python costs far more than running them. A ``StepGraph`` captures one step function once per
input shape as a CUDA graph (static input buffers, static outputs) and replays it: a call copies
its inputs into the buffers and launches the whole step at once. Off CUDA it simply calls the
function, so the CPU runs (and tests) the same static code path.

``StepGraphs`` keeps a model's graphs between sampling calls, with the key/value caches each one
captured: a graph is only valid with the tensors it was captured on.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Hashable

import torch
from torch import Tensor


def bucket(n: int) -> int:
    """``n`` rounded up to one of few sizes (up to 16 exact, then 8-15 times a power of two:
    at most 1/8 padding), so that varying batch sizes share graphs."""
    if n <= 16:
        return n
    unit = 1 << (n.bit_length() - 4)
    return unit * math.ceil(n / unit)


class StepGraph:
    """``fn(*inputs)`` with fixed input shapes, captured as a CUDA graph when ``capture``, else
    called directly. Inputs are tensors or Python numbers, which ``fn`` gets as 0-dim float32
    tensors either way (the buffers a graph replays from).

    The first call runs ``fn`` eagerly (which also does any lazy initialisation outside the
    graph); the second captures it and every later call replays it: a step used once never pays
    for a capture. The outputs of a replay are the graph's own tensors: valid until the next call.
    A step that cannot be captured (a warning says why) runs eagerly from then on. Eager calls run
    in the autocast state of the capture, so a compiled ``fn`` compiles for the state it is
    captured in."""

    def __init__(self, fn: Callable[..., object], capture: bool):
        self.fn, self.capture, self.calls = fn, capture, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: list[Tensor] = []
        self.outputs = None

    def __call__(self, *inputs):
        self.calls += 1
        if self.graph is None:
            inputs = _tensors(inputs)  # numbers as the graph sees them (a compiled step compiles once for all)
            if not self.capture:
                return self.fn(*inputs)
            if self.calls == 1 or not self._capture(inputs):
                with _autocast_state(inputs[0].device)():  # as captured: a compiled step's guards check it
                    return self.fn(*inputs)
        for buffer, x in zip(self.static, inputs):
            if isinstance(x, Tensor):
                buffer.copy_(x)
            else:
                buffer.fill_(x)
        self.graph.replay()
        return self.outputs

    def _capture(self, inputs: tuple[Tensor, ...]) -> bool:
        """Capture ``fn`` on static copies of ``inputs``; False (and eager from now on) if it fails."""
        self.static = [x.clone() for x in inputs]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph), _autocast_state(inputs[0].device)():
                self.outputs = self.fn(*self.static)
        except RuntimeError as e:  # something in the step cannot be captured
            warnings.warn(f"sampling step {getattr(self.fn, '__qualname__', self.fn)} runs without a CUDA graph: "
                          f"capturing it failed ({e})", RuntimeWarning, stacklevel=3)
            self.capture, self.static, self.outputs = False, [], None
            return False
        self.graph = graph
        return True


def _tensors(inputs: tuple) -> tuple[Tensor, ...]:
    """``inputs`` with Python numbers as 0-dim float32 tensors on the tensors' device."""
    device = next(x.device for x in inputs if isinstance(x, Tensor))
    return tuple(x if isinstance(x, Tensor) else torch.tensor(float(x), device=device) for x in inputs)


def _autocast_state(device: torch.device) -> Callable[[], object]:
    """A context that re-enters the current autocast state of ``device`` without the weight cache
    (cached casts made outside a graph must not be captured into it)."""
    if not torch.is_autocast_enabled(device.type):
        return lambda: torch.autocast(device.type, enabled=False)
    dtype = autocast_dtype(device)
    return lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on ``device`` now, None when it is off."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


class StepGraphs:
    """A model's static steps, made on first use and kept for later sampling calls."""

    def __init__(self):
        self._entries: dict[Hashable, object] = {}

    def get(self, key: Hashable, make: Callable[[], object]) -> object:
        """The entry for ``key``, made by ``make()`` the first time."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = make()
        return entry

    def clear(self) -> None:
        """Forget every graph (and the memory it holds)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
