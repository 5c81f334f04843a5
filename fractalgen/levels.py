"""The three kinds of level: AR (causal), MAR (masked) and the final pixel transformer.

Every level works on raw integer pixels (0..255) and normalises them itself when it embeds
patches, so sampled values never round-trip through floats. A generator level takes images
``(N, C, S, S)`` and conditions (a list of ``(N, D_parent)`` tensors, one per slot) and hands
its patches ``(M, C, p, p)`` and their conditions down; the pixel transformer models the
channels of single pixels. Sampling is depth-first: a level computes conditions for a set of
patches, calls ``next_level`` to generate them completely, writes them, then goes on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FractalConfig
from .decode import Decoder, cache_length, encoder_block, gather_block, layer_norm, rope_matrices
from .graphs import StepGraph, StepGraphs, autocast_dtype, bucket
from .layers import Linear, LlamaBlock, ViTBlock, gather_rows, rope_2d, run_blocks
from .sampling import SamplingConfig, cosine_mask_ratio, draw, guided_probs, linear_cfg

NextLevel = Callable[[list[Tensor], float, "Known | None"], Tensor]


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


def neighbours(middle: Tensor, grid: int) -> list[Tensor]:
    """Five conditions per patch: its own output and those of its top, right, bottom, left
    neighbours (zeros past the border)."""
    n, _, d = middle.shape
    m = middle.reshape(n, grid, grid, d)
    top = F.pad(m[:, :-1], (0, 0, 0, 0, 1, 0))
    right = F.pad(m[:, :, 1:], (0, 0, 0, 1))
    bottom = F.pad(m[:, 1:], (0, 0, 0, 0, 0, 1))
    left = F.pad(m[:, :, :-1], (0, 0, 1, 0))
    return [middle] + [t.reshape(n, grid * grid, d) for t in (top, right, bottom, left)]


def neighbour_positions(patches: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """Grid positions (N, 5, Q) of patches (N, Q) and of their top, right, bottom, left
    neighbours as ``neighbours`` orders them, and which exist (past the border: the patch itself).
    Sampling's index form of ``neighbours`` (tabulated per level); training keeps the shifted
    grids (cheaper to back-propagate than a 5x gather)."""
    row, col = patches // grid, patches % grid
    moved = torch.stack([patches, patches - grid, patches + 1, patches + grid, patches - 1], 1)
    inside = torch.stack([torch.ones_like(row, dtype=torch.bool), row > 0, col < grid - 1, row < grid - 1, col > 0], 1)
    return torch.where(inside, moved, patches.unsqueeze(1)), inside


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
            decoder = self._decoders[id(module)] = Decoder(module.blocks, cache_length(max_len), like.shape[0], like)
        return decoder

    def step(self, method: Callable) -> Callable:
        """The per-step network call ``method`` (bound), compiled if the model was compiled."""
        fn = self.compiled.get(method.__func__)
        return method if fn is None else partial(fn, method.__self__)

    def _key(self, kind: str, module: nn.Module, like: Tensor) -> tuple:
        """What fixes a static step's graph: the module (and its weights' storage), input shape,
        dtype, device and autocast state."""
        weight = next(module.parameters()).data_ptr()
        return kind, id(module), weight, tuple(like.shape), like.dtype, like.device, autocast_dtype(like.device)

    def decoding(self, level: "ARLevel", like: Tensor) -> Callable[[Tensor, int], Tensor]:
        """``level.decode`` as ``(token, t) -> output``: eager with this call's caches, or a static
        step (with caches of its own, kept with the model's graphs) fed the position as a tensor."""
        if self.graphs is None:
            decoder, decode = self.decoder(level, level.seq_len, like), self.step(level.decode)
            return lambda token, t: decode(decoder, token, t)

        def make() -> tuple[StepGraph, Tensor]:
            decoder = Decoder(level.blocks, cache_length(level.seq_len), like.shape[0], like)
            positions = torch.arange(level.seq_len, device=like.device)
            return StepGraph(partial(level.decode, decoder), (like, positions[:1]), self.capture), positions

        graph, positions = self.graphs.get(self._key("decode", level, like), make)
        return lambda token, t: graph(token, positions[t:t + 1])

    def draw_pixels(self, head: "PixelHead", token: Tensor, uniforms: Tensor, cfg: float) -> tuple[Tensor, Tensor]:
        """Every channel of n pixels drawn by the static step of ``head``: values (n, C) and their
        log-probabilities (n,). The rows are padded to a ``bucket`` size so that few graphs serve
        the varying batches of MAR levels."""
        g, n = self.groups, uniforms.shape[0]
        padded = bucket(n)
        if padded != n:
            token = F.pad(token.view(g, n, -1), (0, 0, 0, padded - n)).flatten(0, 1)
            uniforms = F.pad(uniforms, (0, 0, 0, padded - n), value=0.5)
        settings = self.settings

        def make() -> StepGraph:
            decoder = Decoder(head.blocks, cache_length(head.channels), token.shape[0], token)

            def channels(token: Tensor, uniforms: Tensor, cfg: Tensor) -> tuple[Tensor, Tensor]:
                pick = lambda probs, c: draw(probs, uniforms[:, c:c + 1])  # noqa: E731
                values, logps = head.decode_channels(decoder, token, cfg, settings, pick, head.channel_probs)
                return values, logps.sum(1)
            return StepGraph(channels, (token, uniforms, cfg), self.capture)

        key = self._key("pixel", head, token) + (settings.temperature, settings.official_temperature,
                                                  settings.filter_threshold, settings.guided)
        values, logp = self.graphs.get(key, make)(token, uniforms, cfg)
        return values[:n], logp[:n]

    @property
    def groups(self) -> int:
        """2 when rows carry [cond; uncond] halves for guidance, else 1."""
        return 2 if self.settings.guided else 1


def _init_linear(module: nn.Module) -> None:
    """Xavier-uniform linear weights and zero biases (MAE / ViT convention)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------------
# Final pixel transformer
# ------------------------------------------------------------------------------------------------

class PixelHead(nn.Module):
    """Models one pixel's channels in order with a 256-way softmax each (tied embeddings).

    Sequence: [Linear(cond), emb_0(v_0), ..., emb_{C-2}(v_{C-2})] -> LayerNorm -> causal ViT
    blocks -> LayerNorm; logits of channel c = h_c @ emb_c^T + bias_c, in float32.
    """

    def __init__(self, cond_dim: int, width: int, depth: int, heads: int, channels: int, r_weight: float):
        super().__init__()
        self.channels = channels
        self.r_weight = r_weight
        self.cond_emb = Linear(cond_dim, width)
        self.codebook = nn.Parameter(torch.empty(channels, 256, width))
        self.input_norm = nn.LayerNorm(width, eps=1e-6)
        self.blocks = nn.ModuleList([ViTBlock(width, heads, causal=True, upcast=False) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.logit_bias = nn.Parameter(torch.zeros(channels, 256))
        _init_linear(self)
        nn.init.normal_(self.codebook, std=0.02)

    def logits(self, cond: Tensor, values: Tensor) -> Tensor:
        """Teacher-forced logits (N, C, 256) for integer pixel values (N, C)."""
        c = self.channels
        prev = self.codebook[torch.arange(c - 1, device=values.device), values[:, : c - 1].long()]
        first = self.cond_emb(cond).unsqueeze(1)
        x = torch.cat([first, prev.to(first.dtype)], dim=1)
        x = self.norm(run_blocks(self.blocks, self.input_norm(x), checkpoint=False))
        with torch.autocast(x.device.type, enabled=False):  # tied-embedding logits in float32
            return torch.einsum("ncw,cvw->ncv", x.float(), self.codebook.float()) + self.logit_bias.float()

    def loss(self, cond: Tensor, values: Tensor, weighted: bool) -> Tensor:
        """Per-pixel cross entropy (N,) in nats: channel 0 weighted by r_weight when ``weighted``
        (training), the plain channel mean otherwise (likelihood)."""
        logits = self.logits(cond, values)
        ce = F.cross_entropy(logits.flatten(0, 1), values.flatten().long(), reduction="none").view(values.shape)
        if weighted and self.channels > 1:
            w = torch.ones(self.channels, device=ce.device)
            w[0] = self.r_weight
            return (ce * w).sum(-1) / w.sum()
        return ce.mean(-1)

    @torch.no_grad()
    def sample(self, cond: Tensor, cfg_now: float, ctx: SampleContext, known: Known | None = None) -> Tensor:
        """Sample pixel values (n, C) channel by channel; cond holds G*n rows. Known channels
        (values/mask (n, C)) are fed instead of sampled (forced ones go through ``ctx.choose``)."""
        n = cond.shape[0] // ctx.groups
        token = self.cond_emb(cond)
        uniforms = None if ctx.choose is not None else torch.rand(n, self.channels, device=cond.device,
                                                                   generator=ctx.generator)
        if known is None and ctx.choose is None and ctx.graphs is not None:
            values, logp = ctx.draw_pixels(self, token, uniforms, cfg_now)
            ctx.child_logp = logp.clone() if ctx.logprob else None
            return values
        if known is None and ctx.choose is None:
            pick = lambda probs, c: draw(probs, uniforms[:, c:c + 1])  # noqa: E731
        else:
            pick = partial(self._choose, known=known, ctx=ctx, uniforms=uniforms)
        decoder = ctx.decoder(self, self.channels, like=token)
        values, logps = self.decode_channels(decoder, token, cfg_now, ctx.settings, pick,
                                             ctx.step(self.channel_probs), ctx.logprob)
        if logps is not None and known is not None and not known.forced:
            logps = logps.masked_fill(known.mask, 0.0)
        ctx.child_logp = None if logps is None else logps.sum(1)
        return values

    def decode_channels(self, decoder: Decoder, token: Tensor, cfg: float | Tensor, settings: SamplingConfig,
                        pick: Callable[[Tensor, int], Tensor], probs_of: Callable | None = None,
                        logprob: bool = True) -> tuple[Tensor, Tensor | None]:
        """Feed ``token`` (G*n, W) and then each picked channel value: the values (n, C) that
        ``pick(probs, channel)`` takes from each channel's sampling probabilities (n, 256), and
        their log-probabilities (n, C) in float64 (None without ``logprob``)."""
        g = 2 if settings.guided else 1
        probs_of = probs_of or self.channel_probs
        values, logps = [], []
        for c in range(self.channels):
            probs = probs_of(decoder, token, c, cfg, settings)
            value = pick(probs, c)
            values.append(value)
            if logprob:
                logps.append(probs.gather(1, value.unsqueeze(1)).squeeze(1).log().double())
            if c + 1 < self.channels:
                token = tile(decoder.aux[c][0][value], g).to(token.dtype)
        return torch.stack(values, 1), torch.stack(logps, 1) if logprob else None

    @staticmethod
    def _choose(probs: Tensor, c: int, known: Known | None, ctx: SampleContext, uniforms: Tensor | None) -> Tensor:
        """Values (n,) of channel ``c`` with known or forced values and ``ctx.choose`` in play."""
        target = None if known is None else known.values[:, c].long()
        if ctx.choose is not None:
            value = ctx.choose(probs, target if known is not None and known.forced else None)
        elif known.forced:
            value = target
        else:
            value = draw(probs, uniforms[:, c:c + 1])
        if known is not None and not known.forced:
            value = torch.where(known.mask[:, c], target, value)
        return value

    def channel_probs(self, decoder: Decoder, token: Tensor, channel: int, cfg_now: float | Tensor,
                      settings: SamplingConfig) -> Tensor:
        """Sampling probabilities (n, 256) of ``channel`` after feeding ``token`` (G*n, W): decode,
        temperature and guidance (one graph when the model is compiled for sampling)."""
        return guided_probs(self.decode(decoder, token, channel), cfg_now, settings)

    def decode(self, decoder: Decoder, token: Tensor, channel: int) -> Tensor:
        """Feed the next token (B, W) (the condition, then channel values); float32 logits (B, 256)
        of ``channel`` (``decoder.aux`` holds each channel's logit weight and bias)."""
        if decoder.aux is None:  # per channel: (codebook, logit weight, logit bias) as plain tensors
            decoder.aux = [(self.codebook[c], self.codebook[c].float(), self.logit_bias[c].float())
                           for c in range(self.channels)]
        _, weight, bias = decoder.aux[channel]
        h = layer_norm(decoder.step(layer_norm(token, self.input_norm), channel), self.norm)
        if h.dtype == torch.float32 and not autocasting(h.device.type):
            return F.linear(h, weight, bias)
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(h.float(), weight, bias)


# ------------------------------------------------------------------------------------------------
# Generator levels
# ------------------------------------------------------------------------------------------------

class _Level(nn.Module):
    """What AR and MAR levels share: geometry, patch embedding, normalisation."""

    def __init__(self, config: FractalConfig, level: int):
        super().__init__()
        self.level = level
        self.dim = config.embed_dim_list[level]
        self.cond_dim = config.embed_dim_list[level - 1] if level > 0 else self.dim
        self.patch_size = config.img_size_list[level + 1]
        self.seq_len = config.seq_len(level)
        self.grid = math.isqrt(self.seq_len)
        self.channels = config.channels
        self.mean, self.std = config.pixel_mean, config.pixel_std
        self.grad_checkpointing = False
        self.patch_emb = Linear(config.channels * self.patch_size ** 2, self.dim)
        # normalize() of every value 0..255 per channel, so embedding a patch is one lookup
        values = torch.arange(256).expand(self.channels, 256)
        self.register_buffer("normalized", normalize(values, self.mean, self.std, dim=0).flatten(), persistent=False)
        offsets = 256 * torch.arange(self.channels).repeat_interleave(self.patch_size ** 2)
        self.register_buffer("offsets", offsets, persistent=False)  # where each patch entry's channel starts

    def embed_patches(self, patches: Tensor) -> Tensor:
        """Normalise integer patches (..., C, p, p) and embed them (..., D)."""
        x = self.normalized[patches.flatten(-3).long() + self.offsets]
        return self.patch_emb(x.to(self.patch_emb.weight.dtype))

    def _init_common(self) -> None:
        _init_linear(self)
        for p in self.parameters(recurse=False):
            nn.init.normal_(p, std=0.02)  # position embeddings and mask token


class ARLevel(_Level):
    """Causal transformer over [condition, patch_1 .. patch_L] in raster order (LLaMA blocks,
    2-D RoPE; the condition token has no rotary position). Output i conditions patch i."""

    def __init__(self, config: FractalConfig, level: int):
        super().__init__(config, level)
        heads = config.num_heads_list[level]
        self.head_dim = self.dim // heads
        self.cond_emb = Linear(self.cond_dim, self.dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.seq_len + 1, self.dim))
        self.input_norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.blocks = nn.ModuleList([LlamaBlock(self.dim, heads, config.proj_dropout)
                                     for _ in range(config.num_blocks_list[level])])
        self.norm = nn.LayerNorm(self.dim, eps=1e-6)
        self._rope: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._init_common()

    def rope(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Rotary tables for [condition, patches], cached per device (kept in float32)."""
        if device not in self._rope:
            with torch.inference_mode(False):  # also used by training, so never an inference tensor
                self._rope[device] = rope_2d(self.grid, self.head_dim, prefix=1, device=device)
        return self._rope[device]

    def conditions(self, patches: Tensor, conds: list[Tensor]) -> list[Tensor]:
        """Teacher-forced conditions (N, L, D) for all patches (N, L, C, p, p)."""
        x = torch.cat([self.cond_emb(conds[0]).unsqueeze(1), self.embed_patches(patches[:, :-1])], dim=1)
        x = self.input_norm(x + self.pos_emb[:, : self.seq_len])
        cos, sin = self.rope(x.device)
        rope = (cos[: self.seq_len], sin[: self.seq_len])
        return [self.norm(run_blocks(self.blocks, x, self.grad_checkpointing and self.training, rope=rope))]

    def forward(self, x: Tensor, conds: list[Tensor], mask: Tensor | None = None):
        """Every patch goes down with its condition; returns (children, conds, rows, None) where
        ``rows`` = input image * L + patch index of each child."""
        patches = patchify(x, self.patch_size)
        cond = self.conditions(patches, conds)[0]
        rows = torch.arange(patches.shape[0] * self.seq_len, device=x.device)
        return patches.flatten(0, 1), [cond.flatten(0, 1)], rows, None

    def decode(self, decoder: Decoder, token: Tensor, pos: int | Tensor) -> Tensor:
        """Feed the token at sequence position ``pos`` (B, D); return the output there (B, D).
        ``pos`` is an int, or a one-element tensor (the decoder's static form)."""
        if decoder.aux is None:  # position embeddings and rotary rotations: per position, and as tables
            with torch.inference_mode(False):
                rotations = rope_matrices(*self.rope(token.device))
            decoder.aux = (list(zip(self.pos_emb[0].unbind(), rotations.unbind())), self.pos_emb[0], rotations)
        if isinstance(pos, int):
            pos_emb, rotation = decoder.aux[0][pos]
        else:
            pos_emb, rotation = (table.index_select(0, pos).squeeze(0) for table in decoder.aux[1:])
        x = layer_norm(token + pos_emb, self.input_norm)
        return layer_norm(decoder.step(x, pos, rotation), self.norm)

    @torch.no_grad()
    def sample(self, conds: list[Tensor], cfg_now: float, ctx: SampleContext, next_level: NextLevel,
               known: Known | None = None) -> Tensor:
        """Raster-order sampling with a KV cache: one patch per step, generated by ``next_level``.
        Entirely known patches are teacher-forced; partly known ones go down with their known pixels
        (an AR level cannot look ahead at known pixels later in raster order)."""
        g, n = ctx.groups, conds[0].shape[0] // ctx.groups
        canvas, known = _start_canvas(self, n, conds[0].device, known)
        todo = None if known is None or known.forced else ~known.complete()
        logp = torch.zeros(n, dtype=torch.float64, device=canvas.device) if ctx.logprob else None
        token = self.cond_emb(conds[0])
        decode = ctx.decoding(self, like=token)
        linear = self.level == 0 and ctx.settings.cfg_schedule == "linear"
        for t in range(self.seq_len):
            h = decode(token, t)
            cfg_t = linear_cfg(ctx.settings.cfg, (t + 1) / self.seq_len) if linear else cfg_now
            if todo is None:
                canvas[:, t] = next_level([h], cfg_t, None if known is None else known[:, t])
                if logp is not None:
                    logp += ctx.child_logp
            else:
                rows = todo[:, t].nonzero().squeeze(1)
                if rows.numel():
                    canvas[rows, t] = next_level([h[_guided_rows(rows, n, g)]], cfg_t, known[rows, t])
                    if logp is not None:
                        logp.index_add_(0, rows, ctx.child_logp)
            if t + 1 < self.seq_len:
                token = tile(self.embed_patches(canvas[:, t]), g)
            if ctx.on_step is not None and self.level == 0:
                ctx.on_step(t, self.seq_len, unpatchify(canvas))
        ctx.child_logp = logp
        return unpatchify(canvas)


class MARLevel(_Level):
    """Bidirectional masked transformer over [guiding pixel?, cond slot k-1 .. slot 0, patches]
    (ViT blocks); masked patches are replaced by a learned mask token; outputs five conditions
    per patch (middle, top, right, bottom, left)."""

    def __init__(self, config: FractalConfig, level: int):
        super().__init__(config, level)
        self.num_conds = config.level_conds(level)
        self.guiding = config.level_guiding_pixel(level)
        prefix = self.num_conds + int(self.guiding)
        self.cond_emb = Linear(self.cond_dim, self.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.dim))
        self.pos_emb = nn.Parameter(torch.zeros(1, prefix + self.seq_len, self.dim))
        self.input_norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.blocks = nn.ModuleList([
            ViTBlock(self.dim, config.num_heads_list[level], config.attn_dropout, config.proj_dropout)
            for _ in range(config.num_blocks_list[level])])
        self.norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.gp_emb = Linear(config.channels, self.dim) if self.guiding else None
        self._init_common()
        self.guide = PixelHead(self.cond_dim, config.guide_width, config.guide_depth, config.guide_heads,
                               config.channels, r_weight=5.0) if self.guiding else None
        positions, inside = neighbour_positions(torch.arange(self.seq_len), self.grid)  # (L, 5) tables
        self.register_buffer("neighbours", positions, persistent=False)
        self.register_buffer("neighbours_inside", inside, persistent=False)

    def conditions(self, patches: Tensor, mask: Tensor, conds: list[Tensor],
                   query: Tensor | None = None) -> list[Tensor]:
        """Five conditions (N, L, D) for patches (N, L, C, p, p) with ``mask`` (N, L) True = hidden.
        ``conds`` holds the slots (and the guiding pixel last when this level uses one).

        With ``query`` (N, Q) patch indices (sampling, no autograd), the five conditions (N, Q, D)
        of those patches only: the last block then computes its output only at them and their
        neighbours (a step needs a few patches; the earlier blocks serve every position as key and
        value), and the blocks run without module calls."""
        x = self.embed_patches(patches)
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        slots = torch.stack(conds[: self.num_conds][::-1], dim=1)
        prefix = [self.gp_emb(conds[self.num_conds]).unsqueeze(1)] if self.guiding else []
        x = torch.cat(prefix + [self.cond_emb(slots), x], dim=1)
        x = self.input_norm(x + self.pos_emb)
        if query is None:
            x = self.norm(run_blocks(self.blocks, x, self.grad_checkpointing and self.training))
            return neighbours(x[:, -self.seq_len:], self.grid)
        n, q = query.shape
        positions, inside = self.neighbours[query].transpose(1, 2), self.neighbours_inside[query].transpose(1, 2)
        tokens = positions.flatten(1) + (x.shape[1] - self.seq_len)
        heads, upcast = self.blocks[0].attn.heads, self.blocks[0].attn.upcast
        weights = [gather_block(block) for block in self.blocks]
        for w in weights[:-1]:
            x = encoder_block(w, heads, upcast, x)
        if tokens.shape[1] < x.shape[1]:
            x = encoder_block(weights[-1], heads, upcast, x, queries=tokens)
        else:  # as many outputs wanted as there are tokens: run the last block in full
            x = gather_rows(encoder_block(weights[-1], heads, upcast, x), tokens)
        x = torch.where(inside.reshape(n, 5 * q, 1), layer_norm(x, self.norm), 0.0)
        return list(x.view(n, 5, q, -1).unbind(1))

    def random_mask(self, n: int, device: torch.device) -> Tensor:
        """Training: per image ceil(L * r), r ~ N(1, 0.25) truncated to [0, 1]; likelihood: a count
        uniform in 1..L per image (the official code shares one per batch: same expectation, but
        correlated images). Random order per image."""
        rank = torch.rand(n, self.seq_len, device=device).argsort(-1).argsort(-1)
        if self.training:
            lo = 0.5 * (1 + math.erf(-4 / math.sqrt(2)))  # Phi(-4); the upper bound is Phi(0) = 0.5
            u = lo + (0.5 - lo) * torch.rand(n, device=device)
            ratio = (1 + 0.25 * torch.special.ndtri(u)).clamp(0, 1)
            count = torch.ceil(self.seq_len * ratio).clamp(min=1)
        else:
            count = torch.randint(1, self.seq_len + 1, (n,), device=device)
        return rank < count.unsqueeze(1)

    def forward(self, x: Tensor, conds: list[Tensor], mask: Tensor | None = None):
        """Masked patches go down with their five conditions; returns (children, conds,
        rows, guiding_pixel_loss per input image or None); ``rows`` = input image * L + patch index."""
        n = x.shape[0]
        patches = patchify(x, self.patch_size)
        if mask is None:
            mask = self.random_mask(n, x.device)
        gp_loss = None
        conds = conds[: self.num_conds]
        if self.guiding:
            gp = normalize(x, self.mean, self.std, dim=1).mean(-1).mean(-1)
            gp_loss = self.guide.loss(conds[0], quantize(gp, self.mean, self.std, dim=1), weighted=self.training)
            conds = conds + [gp.to(conds[0].dtype)]
        out = self.conditions(patches, mask, conds)
        rows = mask.flatten().nonzero().squeeze(1)
        return patches.flatten(0, 1)[rows], [c.flatten(0, 1)[rows] for c in out], rows, gp_loss

    @torch.no_grad()
    def sample(self, conds: list[Tensor], cfg_now: float, ctx: SampleContext, next_level: NextLevel,
               known: Known | None = None) -> Tensor:
        """Random-order iterative decoding with the cosine schedule; every patch chosen in a step
        is generated completely by ``next_level`` before the next step. Entirely known patches
        start visible and are never resampled; the schedule runs over each image's unknown patches."""
        g, device = ctx.groups, conds[0].device
        n, L = conds[0].shape[0] // g, self.seq_len
        conds = conds[: self.num_conds]
        logp = torch.zeros(n, dtype=torch.float64, device=device) if ctx.logprob else None
        if self.guiding:
            gp = self.guide.sample(conds[0], cfg_now, ctx, self._guiding_targets(known))
            conds = conds + [tile(normalize(gp, self.mean, self.std, dim=1), g).to(conds[0].dtype)]
            if logp is not None:
                logp += ctx.child_logp
        canvas, known = _start_canvas(self, n, device, known)
        complete = known.complete() if known is not None and not known.forced else None
        known_rows = None if known is None else Known(known.values.flatten(0, 1), known.mask.flatten(0, 1), known.forced)
        # The schedule runs on the host: one transfer here, no device sync in the loop unless the
        # images have different numbers of unknown patches (editing).
        totals = [L] * n if complete is None else (L - complete.sum(1)).tolist()
        keys = torch.rand(n, L, device=device, generator=ctx.generator)
        order = (keys if complete is None else keys + 2 * complete).argsort(-1)  # generation order, known last
        rank = order.argsort(-1)
        steps = min(L, ctx.settings.iterations(self.level))
        linear = self.level == 0 and ctx.settings.cfg_schedule == "linear"
        image_start = L * torch.arange(n, device=device).unsqueeze(1)
        masked = totals
        conditions = ctx.step(self.conditions)
        for step in range(steps):
            ratio = cosine_mask_ratio(step, steps)
            after = [min(m, max(1, min(m - 1, math.floor(t * ratio)))) for m, t in zip(masked, totals)]
            first = [0] * n if step == steps - 1 else after  # the last step predicts everything left
            if any(a < b for a, b in zip(first, masked)):
                picks, real = _ranked_patches(order, first, masked)
                out = conditions(tile(canvas, g), tile(_rank_below(rank, masked), g), conds, query=tile(picks, g))
                out = [c.flatten(0, 1) for c in out]
                rows = (picks + image_start).flatten()  # image * L + patch
                if real is not None:
                    keep = real.flatten().nonzero().squeeze(1)
                    rows, out = rows[keep], [c[_guided_rows(keep, real.numel(), g)] for c in out]
                cfg_t = linear_cfg(ctx.settings.cfg, 1 - sum(after) / sum(totals)) if linear else cfg_now
                children = next_level(out, cfg_t, None if known_rows is None else known_rows[rows])
                canvas.view(n * L, *canvas.shape[2:])[rows] = children
                if logp is not None:
                    logp.index_add_(0, rows // L, ctx.child_logp)
            masked = after
            if ctx.on_step is not None and self.level == 0:
                ctx.on_step(step, steps, unpatchify(canvas))
        ctx.child_logp = logp
        return unpatchify(canvas)

    def _guiding_targets(self, known: Known | None) -> Known | None:
        """Forced guiding pixels: the quantised mean of each forced image, as training computes it."""
        if known is None or not known.forced:
            return None
        gp = quantize(normalize(known.values, self.mean, self.std, dim=1).mean(-1).mean(-1), self.mean, self.std, dim=1)
        return Known(gp, torch.ones_like(gp, dtype=torch.bool), forced=True)


def _start_canvas(level: _Level, n: int, device: torch.device, known: Known | None) -> tuple[Tensor, Known | None]:
    """Patch canvas (n, L, C, p, p) holding the known pixels (none when forced), and the known
    pixels per patch."""
    p = level.patch_size
    if known is None:
        return torch.zeros(n, level.seq_len, level.channels, p, p, dtype=torch.uint8, device=device), None
    patches = known.patches(p)
    if known.forced:  # forced values are produced step by step like sampled ones
        return torch.zeros(patches.values.shape, dtype=torch.uint8, device=device), patches
    return (patches.values * patches.mask).contiguous(), patches


def _rank_below(rank: Tensor, counts: list[int]) -> Tensor:
    """(n, L) True where a patch's rank in its image's generation order is below that image's count."""
    if len(set(counts)) == 1:
        return rank < counts[0]
    return rank < torch.tensor(counts, device=rank.device).unsqueeze(1)


def _ranked_patches(order: Tensor, first: list[int], end: list[int]) -> tuple[Tensor, Tensor | None]:
    """The patches ranked first[i] <= r < end[i] in image i's generation order, ascending, as
    (n, k) for the largest count k; images with fewer are padded at the end, and the second
    result marks the real entries (None, and no device sync, when every image has k)."""
    n, L = order.shape
    counts = [e - f for f, e in zip(first, end)]
    k = max(counts)
    if len(set(first)) == 1 and len(set(counts)) == 1:
        return order[:, first[0]:end[0]].sort(-1).values, None
    j = torch.arange(k, device=order.device)
    real = j < torch.tensor(counts, device=order.device).unsqueeze(1)
    picks = order.gather(1, (torch.tensor(first, device=order.device).unsqueeze(1) + j).clamp(max=L - 1))
    return torch.where(real, picks, picks + L).sort(-1).values % L, real


def _guided_rows(rows: Tensor, n: int, groups: int) -> Tensor:
    """Row indices of a [cond; uncond] batch for the images ``rows``."""
    return rows if groups == 1 else torch.cat([rows, rows + n])


def make_level(config: FractalConfig, level: int) -> _Level:
    """The generator of ``level`` as the config's type list says."""
    return (ARLevel if config.generator_type_list[level] == "ar" else MARLevel)(config, level)
