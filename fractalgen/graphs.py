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
    """``fn(*inputs)`` with fixed input shapes: captured as a CUDA graph when ``capture``, else
    called directly. Inputs are tensors or Python numbers (kept in 0-dim float32 buffers).
    The outputs of a replay are the graph's own tensors: valid until the next call."""

    def __init__(self, fn: Callable[..., object], inputs: tuple, capture: bool):
        self.fn, self.graph, self.outputs = fn, None, None
        if not capture:
            return
        device = next(x.device for x in inputs if isinstance(x, Tensor))
        self.static = [x.clone() if isinstance(x, Tensor) else torch.tensor(float(x), device=device) for x in inputs]
        autocast = _autocast_state(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), autocast():  # warm-up: lazy initialisation happens outside the graph
            fn(*self.static)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph), autocast():
                self.outputs = fn(*self.static)
        except RuntimeError as e:  # something in the step cannot be captured: run it eagerly
            warnings.warn(f"sampling step {getattr(fn, '__qualname__', fn)} runs without a CUDA graph: "
                          f"capturing it failed ({e})", RuntimeWarning, stacklevel=2)
            self.outputs = None
            return
        self.graph = graph

    def __call__(self, *inputs):
        if self.graph is None:
            return self.fn(*inputs)
        for buffer, x in zip(self.static, inputs):
            if isinstance(x, Tensor):
                buffer.copy_(x)
            else:
                buffer.fill_(x)
        self.graph.replay()
        return self.outputs


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
