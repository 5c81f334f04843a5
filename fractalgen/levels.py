"""The generator levels: AR (causal) and MAR (masked); the pixel transformer under them is in
``pixel``.

Every level works on raw integer pixels (0..255) and normalises them itself when it embeds
patches, so sampled values never round-trip through floats. A generator level takes images
``(N, C, S, S)`` and conditions (a list of ``(N, D_parent)`` tensors, one per slot) and hands
its patches ``(M, C, p, p)`` and their conditions down; the pixel transformer models the
channels of single pixels. Sampling is depth-first: a level computes conditions for a set of
patches, calls ``next_level`` to generate them completely, writes them, then goes on.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FractalConfig
from .context import Known, SampleContext, normalize, patchify, quantize, tile, unpatchify
from .decode import Decoder, encoder_block, gather_encoder, layer_norm, rope_matrices, take_rows
from .layers import Linear, LlamaBlock, ViTBlock, init_linear, rope_2d, run_blocks
from .pixel import PixelHead
from .sampling import cosine_mask_ratio, linear_cfg

#: ``next_level(conds, cfg, known, uniforms)``: generate the children of the given conditions
#: (``uniforms``: the draws of the pixels, given by the lowest generator level; None above it).
NextLevel = Callable[[list[Tensor], "float | Tensor", "Known | None", "Tensor | None"], Tensor]


# ------------------------------------------------------------------------------------------------
# Patch neighbourhoods
# ------------------------------------------------------------------------------------------------

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
        self.lowest = level == config.num_levels - 2  # the pixel transformer comes next
        self.grad_checkpointing = False
        self.patch_emb = Linear(config.channels * self.patch_size ** 2, self.dim)
        # normalize() of every value 0..255 per channel, so embedding a patch is one lookup
        values = torch.arange(256).expand(self.channels, 256)
        self.register_buffer("normalized", normalize(values, self.mean, self.std, dim=0).flatten(), persistent=False)
        offsets = 256 * torch.arange(self.channels).repeat_interleave(self.patch_size ** 2)
        self.register_buffer("offsets", offsets, persistent=False)  # where each patch entry's channel starts

    def embed_patches(self, patches: Tensor) -> Tensor:
        """Normalise integer patches (..., C, p, p) and embed them (..., D)."""
        index = patches.flatten(-3).long() + self.offsets
        x = self.normalized.index_select(0, index.flatten()).view(index.shape)  # (cheaper than indexing)
        return self.patch_emb(x.to(self.patch_emb.weight.dtype))

    def uniform_count(self) -> int:
        """Uniform draws one call of ``sample`` takes per image (see ``draw_table``)."""
        return self.seq_len * self.channels if self.lowest else 0

    def draw_table(self, n: int, ctx: SampleContext, device: torch.device) -> Tensor | None:
        """Every uniform draw of one ``sample`` call for ``n`` images, made at once: (n, count),
        None when it needs none. A call given its table draws nothing itself (CUDA graphs)."""
        count = self.uniform_count()
        return ctx.uniforms(n, count, device) if count else None

    def _init_common(self) -> None:
        init_linear(self)
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

    def decode_tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """What ``decode`` looks up per position (``Decoder.lookup``): position embeddings and rotary
        rotations."""
        with torch.inference_mode(False):
            rotations = rope_matrices(*self.rope(device))
        return self.pos_emb[0], rotations

    def decode(self, decoder: Decoder, token: Tensor, pos: int | Tensor) -> Tensor:
        """Feed the token at sequence position ``pos`` (B, D); return the output there (B, D).
        ``pos`` is an int, or a one-element tensor (the decoder's static form)."""
        pos_emb, rotation = decoder.lookup(pos)
        x = layer_norm(token + pos_emb, self.input_norm)
        return layer_norm(decoder.step(x, pos, rotation), self.norm)

    @torch.no_grad()
    def sample(self, conds: list[Tensor], cfg_now: float | Tensor, ctx: SampleContext, next_level: NextLevel,
               known: Known | None = None, uniforms: Tensor | None = None) -> Tensor:
        """Raster-order sampling with a KV cache: one patch per step, generated by ``next_level``.
        Entirely known patches are teacher-forced; partly known ones go down with their known pixels
        (an AR level cannot look ahead at known pixels later in raster order). ``uniforms``: the
        call's draws (``draw_table``), made here when None."""
        g, n = ctx.groups, conds[0].shape[0] // ctx.groups
        table = self.draw_table(n, ctx, conds[0].device) if uniforms is None else uniforms
        pixels = None if table is None else table.view(n, self.seq_len, self.channels)
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
                canvas[:, t] = next_level([h], cfg_t, None if known is None else known[:, t],
                                          None if pixels is None else pixels[:, t])
                if logp is not None:
                    logp += ctx.child_logp
            else:
                rows = todo[:, t].nonzero().squeeze(1)
                if rows.numel():
                    canvas[rows, t] = next_level([h[_guided_rows(rows, n, g)]], cfg_t, known[rows, t],
                                                 None if pixels is None else pixels[rows, t])
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
        self.child_conds = config.level_conds(level + 1)  # of its five conditions, those the next level reads
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

    def prefix_tokens(self, conds: list[Tensor]) -> Tensor:
        """The normalised tokens before the patches (N, P, D): guiding pixel?, slot k-1 .. slot 0.
        They do not change while a sampling call runs, so it computes them once."""
        slots = torch.stack(conds[: self.num_conds][::-1], dim=1)
        prefix = [self.gp_emb(conds[self.num_conds]).unsqueeze(1)] if self.guiding else []
        x = torch.cat(prefix + [self.cond_emb(slots)], dim=1)
        return layer_norm(x + self.pos_emb[:, : x.shape[1]], self.input_norm)

    def patch_tokens(self, patches: Tensor, hidden: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """Normalised tokens (N, Q, D) of patches (N, Q, C, p, p): the mask token where ``hidden``
        (N, Q) is True, plus the position embeddings of the patches ``positions`` (N, Q) (default:
        every patch in order)."""
        x = self.embed_patches(patches)
        if hidden is not None:
            # the mask token at hidden patches, by a 0/1 lerp: a select by a random boolean mask
            # branches per element in torch's CPU kernels (4x slower)
            x = torch.lerp(x, self.mask_token.to(x.dtype), hidden.unsqueeze(-1).to(x.dtype))
        start = self.pos_emb.shape[1] - self.seq_len
        pos = self.pos_emb[:, start:] if positions is None else self.pos_emb[0, start + positions]
        return layer_norm(x + pos, self.input_norm)

    def conditions(self, patches: Tensor, mask: Tensor, conds: list[Tensor]) -> list[Tensor]:
        """Five conditions (N, L, D) for patches (N, L, C, p, p) with ``mask`` (N, L) True = hidden.
        ``conds`` holds the slots (and the guiding pixel last when this level uses one); sampling
        asks for a few patches' conditions with ``query_conditions``."""
        x = self.patch_tokens(patches, mask)
        x = torch.cat([self.prefix_tokens(conds).to(x.dtype), x], dim=1)
        x = self.norm(run_blocks(self.blocks, x, self.grad_checkpointing and self.training))
        return neighbours(x[:, -self.seq_len:], self.grid)

    def query_conditions(self, tokens: Tensor, normed: Tensor | None, query: Tensor, weights: list[tuple],
                         count: int = 5) -> list[Tensor]:
        """The first ``count`` of the five conditions (N, Q, D) of the patches ``query`` (N, Q) from
        the blocks' input tokens (N, T, D) (prefix and patches; ``normed``: the first block's layer
        norm of them, when kept), without module calls (``weights``: ``decode.gather_encoder`` of
        each block). The last block computes its output only at the queried patches (and the
        neighbours asked for): a sampling step needs a few; the earlier blocks serve every position
        as key and value."""
        (n, q), t = query.shape, tokens.shape[1]
        positions = self.neighbours[query][..., :count].transpose(1, 2)
        inside = self.neighbours_inside[query][..., :count].transpose(1, 2)
        # the queried patches and their neighbours as rows of the n * t tokens (decode.take_rows)
        rows = (positions + torch.arange(t - self.seq_len, n * t, t, device=tokens.device).view(n, 1, 1)).flatten()
        heads, upcast = self.blocks[0].attn.heads, self.blocks[0].attn.upcast
        x, h = tokens, normed
        for w in weights[:-1]:
            x, h = encoder_block(w, heads, upcast, x, h=h), None
        if count * q < t:
            x = encoder_block(weights[-1], heads, upcast, x, rows=rows, h=h)
        else:  # as many outputs wanted as there are tokens: run the last block in full
            x = take_rows(encoder_block(weights[-1], heads, upcast, x, h=h), rows)
        # each condition contiguous (n, q, D), zero past the border (a product: no select branches)
        x = layer_norm(x, self.norm).view(n, count, q, -1).transpose(0, 1)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        return list(torch.mul(x, inside.transpose(0, 1).unsqueeze(-1), out=out).unbind(0))

    def reveal(self, tokens: Tensor, normed: Tensor, canvas: Tensor, picks: Tensor) -> None:
        """Write the tokens of the patches ``picks`` (n, k), generated and now visible, from the
        canvas (n, L, C, p, p) into every [cond; uncond] half of ``tokens`` (G n, T, D), and the
        first block's layer norm of them into ``normed``: a sampling step then embeds only the
        patches that changed."""
        (n, k), (rows, t, d) = picks.shape, tokens.shape
        image = torch.arange(n, device=picks.device).unsqueeze(1)
        patches = canvas.flatten(0, 1).index_select(0, (picks + self.seq_len * image).flatten())
        x = self.patch_tokens(patches.view(n, k, *canvas.shape[2:]), None, picks).flatten(0, 1)
        at = (picks + (t - self.seq_len) + t * image).flatten()
        tokens.view(rows // n, n * t, d)[:, at] = x.to(tokens.dtype)
        normed.view(rows // n, n * t, d)[:, at] = layer_norm(x, self.blocks[0].norm1).to(normed.dtype)

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

    def uniform_count(self) -> int:
        """Per image: the random generation order (L), the guiding pixel's channels, and with the
        pixel transformer next every pixel's channels."""
        return self.seq_len + self.channels * (int(self.guiding) + self.seq_len * int(self.lowest))

    @torch.no_grad()
    def sample(self, conds: list[Tensor], cfg_now: float | Tensor, ctx: SampleContext, next_level: NextLevel,
               known: Known | None = None, uniforms: Tensor | None = None) -> Tensor:
        """Random-order iterative decoding with the cosine schedule; every patch chosen in a step
        is generated completely by ``next_level`` before the next step. Entirely known patches
        start visible and are never resampled; the schedule runs over each image's unknown patches.
        ``uniforms``: the call's draws (``draw_table``), made here when None."""
        g, device = ctx.groups, conds[0].device
        n, L, c = conds[0].shape[0] // g, self.seq_len, self.channels
        table = self.draw_table(n, ctx, device) if uniforms is None else uniforms
        keys, pixels = table[:, :L], None
        if self.lowest:
            pixels = table[:, L + c * int(self.guiding):].reshape(n * L, c)
        conds = conds[: self.num_conds]
        logp = torch.zeros(n, dtype=torch.float64, device=device) if ctx.logprob else None
        if self.guiding:
            gp = self.guide.sample(conds[0], cfg_now, ctx, self._guiding_targets(known), table[:, L:L + c])
            conds = conds + [tile(normalize(gp, self.mean, self.std, dim=1), g).to(conds[0].dtype)]
            if logp is not None:
                logp += ctx.child_logp
        canvas, known = _start_canvas(self, n, device, known)
        complete = known.complete() if known is not None and not known.forced else None
        known_rows = None if known is None else Known(known.values.flatten(0, 1), known.mask.flatten(0, 1), known.forced)
        # The schedule runs on the host: one transfer here, no device sync in the loop unless the
        # images have different numbers of unknown patches (editing).
        totals = [L] * n if complete is None else (L - complete.sum(1)).tolist()
        order = (keys if complete is None else keys + 2 * complete).argsort(-1)  # generation order, known last
        rank = order.argsort(-1)
        steps = min(L, ctx.settings.iterations(self.level))
        linear = self.level == 0 and ctx.settings.cfg_schedule == "linear"
        image_start = L * torch.arange(n, device=device).unsqueeze(1)
        masked = totals
        # the blocks' input tokens, and the first block's layer norm of them, kept up to date as
        # patches are generated (the same for both [cond; uncond] halves but for the prefix)
        prefix, weights = self.prefix_tokens(conds), [gather_encoder(block) for block in self.blocks]
        tokens = self.patch_tokens(canvas, _rank_below(rank, masked))
        tokens = torch.cat([prefix.to(tokens.dtype), tile(tokens, g)], dim=1)
        normed = layer_norm(tokens, self.blocks[0].norm1)
        conditions = ctx.step(self.query_conditions)
        for step in range(steps):
            ratio = cosine_mask_ratio(step, steps)
            after = [min(m, max(1, min(m - 1, math.floor(t * ratio)))) for m, t in zip(masked, totals)]
            first = [0] * n if step == steps - 1 else after  # the last step predicts everything left
            if any(a < b for a, b in zip(first, masked)):
                picks, real = _ranked_patches(order, first, masked)
                out = conditions(tokens, normed, tile(picks, g), weights, self.child_conds)
                out = [c.flatten(0, 1) for c in out]
                rows = (picks + image_start).flatten()  # image * L + patch
                if real is not None:
                    keep = real.flatten().nonzero().squeeze(1)
                    rows, out = rows[keep], [c[_guided_rows(keep, real.numel(), g)] for c in out]
                cfg_t = linear_cfg(ctx.settings.cfg, 1 - sum(after) / sum(totals)) if linear else cfg_now
                children = next_level(out, cfg_t, None if known_rows is None else known_rows[rows],
                                      None if pixels is None else pixels[rows])
                canvas.view(n * L, *canvas.shape[2:])[rows] = children
                if step + 1 < steps:
                    self.reveal(tokens, normed, canvas, picks)
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

