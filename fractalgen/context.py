"""What one sampling call shares: integer pixels and patches, the pixels fixed in place
(``Known``), and the ``SampleContext`` every level reads: settings, random draws, decoders and
the static steps that CUDA graphs replay."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .decode import Decoder, cache_length
from .graphs import StepGraph, StepGraphs, autocast_dtype
from .sampling import SamplingConfig


# ------------------------------------------------------------------------------------------------
# Pixels and patches
# ------------------------------------------------------------------------------------------------

def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float], dim: int) -> Tensor:
    """(x / 255 - mean[c]) / std[c] in float32 along channel dimension ``dim`` (ToTensor+Normalize bits)."""
    x = x.float() / 255
    return torch.stack([(x.select(dim, c) - m) / s for c, (m, s) in enumerate(zip(mean, std))], dim)


def quantize(x: Tensor, mean: Sequence[float], std: Sequence[float], dim: int) -> Tensor:
    """Inverse of ``normalize`` rounded half-up to 0..255 (the official code rounds after adding
    0.01 noise, which only matters for values exactly on .5; we round deterministically)."""
    v = torch.stack([x.select(dim, c).float() * s + m for c, (m, s) in enumerate(zip(mean, std))], dim)
    return torch.floor(v * 255 + 0.5).clamp(0, 255).long()


def patchify(x: Tensor, p: int) -> Tensor:
    """(N, C, S, S) -> (N, L, C, p, p), patches in raster order of the grid."""
    n, c, s, _ = x.shape
    g = s // p
    return x.reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c, p, p)


def unpatchify(x: Tensor) -> Tensor:
    """(N, L, C, p, p) -> (N, C, S, S)."""
    n, l, c, p, _ = x.shape
    g = math.isqrt(l)
    return x.reshape(n, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, g * p, g * p)



def autocasting(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (torch < 2.4 has per-device functions)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def tile(x: Tensor, groups: int) -> Tensor:
    """``x`` stacked ``groups`` times along dim 0 (the [cond; uncond] halves); cheaper than repeat."""
    return x if groups == 1 else torch.cat([x] * groups)


@dataclass
class Known:
    """Pixels fixed during sampling: ``values`` uint8 and ``mask`` bool (True = known), both
    (N, C, S, S) for images or (N, L, C, p, p) for their patches.

    Editing (``forced=False``): known pixels are visible from the start and only the others are
    generated. Forced (``forced=True``, every pixel given): the sampler runs exactly as if it
    generated everything, in the same order with the same probabilities, but takes the given
    values (or hands them to ``SampleContext.choose``), so an entropy coder can see what a
    decoder will see."""

    values: Tensor
    mask: Tensor
    forced: bool = False

    def patches(self, p: int) -> "Known":
        return Known(patchify(self.values, p), patchify(self.mask, p), self.forced)

    def __getitem__(self, index) -> "Known":
        return Known(self.values[index], self.mask[index], self.forced)

    def complete(self) -> Tensor:
        """Which patches (N, L) are entirely known (patch layout)."""
        return self.mask.flatten(2).all(-1)


#: ``choose(probs, targets)``: the values (n,) to take at a sub-pixel step, given the sampling
#: probabilities (n, 256) and the forced values (n,) or None (see ``SampleContext.choose``).
Chooser = Callable[[Tensor, "Tensor | None"], Tensor]


def new_decoder(module: nn.Module, max_len: int, like: Tensor) -> Decoder:
    """A one-token decoder of ``module``'s blocks (an AR level or a pixel transformer) with caches for
    ``max_len`` tokens of the rows of ``like``, and the tables its ``decode`` looks up."""
    return Decoder(module.blocks, cache_length(max_len), like.shape[0], like, module.decode_tables(like.device))


@dataclass
class SampleContext:
    """State shared by every level during one sampling call.

    ``choose`` replaces the random draw of every sub-pixel (entropy coding drives the sampler
    with it). With ``logprob`` every level leaves the log-probability (nats, float64) of the
    values it produced, per row it was called for, in ``child_logp`` before returning: its
    caller adds it to the rows' images (depth-first, so one slot is enough)."""

    settings: SamplingConfig
    generator: torch.Generator | None = None
    on_step: Callable[[int, int, Tensor], None] | None = None  # level-0 progress: (step, total, images)
    compiled: dict[Callable, Callable] = field(default_factory=dict)  # see FractalGen.compile_sampling
    choose: Chooser | None = None
    logprob: bool = False
    child_logp: Tensor | None = None
    graphs: StepGraphs | None = None  # static steps (see FractalGen.sample's ``graphs``), None: eager
    capture: bool = False  # whether static steps are captured as CUDA graphs
    _decoders: dict = field(default_factory=dict)

    def decoder(self, module: nn.Module, max_len: int, like: Tensor) -> Decoder:
        """The one-token decoder of ``module``'s blocks with caches for the rows of ``like``;
        made once per sampling call and reused by every later call of the same module (a module
        is never re-entered while decoding)."""
        decoder = self._decoders.get(id(module))
        if decoder is None or not decoder.fits(like.shape[0], like):
            decoder = self._decoders[id(module)] = new_decoder(module, max_len, like)
        return decoder

    def step(self, method: Callable) -> Callable:
        """The per-step network call ``method`` (bound), compiled if the model was compiled."""
        fn = self.compiled.get(method.__func__)
        return method if fn is None else partial(fn, method.__self__)

    def positional(self, method: Callable, length: int, device: torch.device) -> Callable:
        """``step(method)`` for a decode step ``method(decoder, token, position, ...)`` called with int
        positions below ``length``; compiled, it gets each position as a one-element tensor (the
        decoder's static form): one compiled graph serves every position."""
        fn = self.step(method)
        if method.__func__ not in self.compiled:
            return fn
        positions = torch.arange(length, device=device)
        return lambda decoder, token, pos, *rest: fn(decoder, token, positions[pos:pos + 1], *rest)

    def step_key(self, kind: str, module: nn.Module, like: Tensor) -> tuple:
        """What fixes a static step's graph: the module (and its weights' storage), input shape,
        dtype, device and autocast state."""
        weight = next(module.parameters()).data_ptr()
        return kind, id(module), weight, tuple(like.shape), like.dtype, like.device, autocast_dtype(like.device)

    def decoding(self, level: nn.Module, like: Tensor) -> Callable[[Tensor, int], Tensor]:
        """An AR level's ``decode`` as ``(token, t) -> output``: eager with this call's caches, or a static
        step (with caches of its own, kept with the model's graphs) fed the position as a tensor, which
        one graph serves for every position (also ``positional``'s, when compiled)."""
        if self.graphs is None:
            decoder = self.decoder(level, level.seq_len, like)
            decode = self.positional(level.decode, level.seq_len, like.device)
            return lambda token, t: decode(decoder, token, t)

        def make() -> tuple[StepGraph, Tensor]:
            decoder = new_decoder(level, level.seq_len, like)
            positions = torch.arange(level.seq_len, device=like.device)
            return StepGraph(partial(self.step(level.decode), decoder), self.capture), positions

        graph, positions = self.graphs.get(self.step_key("decode", level, like), make)
        return lambda token, t: graph(token, positions[t:t + 1])

    def uniforms(self, n: int, per_row: int, device: torch.device) -> Tensor:
        """A table (n, per_row) of uniform draws in [0, 1): what one level call needs per image."""
        return torch.rand(n, per_row, device=device, generator=self.generator)

    @property
    def groups(self) -> int:
        """2 when rows carry [cond; uncond] halves for guidance, else 1."""
        return 2 if self.settings.guided else 1
