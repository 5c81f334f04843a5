"""The final pixel transformer: one pixel's channels in order, each a 256-way softmax."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .context import Known, SampleContext, autocasting, tile
from .decode import Decoder, layer_norm
from .layers import Linear, ViTBlock, init_linear, run_blocks
from .sampling import SamplingConfig, draw, guided_probs


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
        init_linear(self)
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
    def sample(self, cond: Tensor, cfg_now: float | Tensor, ctx: SampleContext, known: Known | None = None,
               uniforms: Tensor | None = None) -> Tensor:
        """Sample pixel values (n, C) channel by channel; cond holds G*n rows. ``uniforms`` (n, C)
        are the draws (fresh ones when None). Known channels (values/mask (n, C)) are fed instead
        of sampled (forced ones go through ``ctx.choose``)."""
        n = cond.shape[0] // ctx.groups
        token = self.cond_emb(cond)
        if uniforms is None and ctx.choose is None:
            uniforms = ctx.uniforms(n, self.channels, cond.device)
        if known is None and ctx.choose is None:
            pick = lambda probs, c: draw(probs, uniforms[:, c:c + 1])  # noqa: E731
        else:
            pick = partial(self._choose, known=known, ctx=ctx, uniforms=uniforms)
        decoder = ctx.decoder(self, self.channels, like=token)
        values, logps = self.decode_channels(decoder, token, cfg_now, ctx.settings, pick,
                                             ctx.positional(self.channel_probs, self.channels, token.device),
                                             ctx.logprob)
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
                token = tile(decoder.lookup(c)[0][value], g).to(token.dtype)
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

    def channel_probs(self, decoder: Decoder, token: Tensor, channel: int | Tensor, cfg_now: float | Tensor,
                      settings: SamplingConfig) -> Tensor:
        """Sampling probabilities (n, 256) of ``channel`` after feeding ``token`` (G*n, W): decode,
        temperature and guidance (one graph when the model is compiled for sampling)."""
        return guided_probs(self.decode(decoder, token, channel), cfg_now, settings)

    def decode_tables(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """What a decoder looks up per channel (``Decoder.lookup``): codebook, and the float32 logit
        weight and bias."""
        return self.codebook, self.codebook.float(), self.logit_bias.float()

    def decode(self, decoder: Decoder, token: Tensor, channel: int | Tensor) -> Tensor:
        """Feed the next token (B, W) (the condition, then channel values); float32 logits (B, 256)
        of ``channel``: an int, or a one-element tensor (the decoder's static form)."""
        _, weight, bias = decoder.lookup(channel)
        h = layer_norm(decoder.step(layer_norm(token, self.input_norm), channel), self.norm)
        if h.dtype == torch.float32 and not autocasting(h.device.type):
            return F.linear(h, weight, bias)
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(h.float(), weight, bias)
