"""Transformer building blocks shared by every level.

Two block styles exist in the published system: LLaMA blocks (RMSNorm, SwiGLU, no biases,
2-D rotary embeddings) in AR levels, and ViT blocks (LayerNorm, GELU MLP, qkv bias) in MAR
levels and the pixel transformer. Both use one attention module built on
``F.scaled_dot_product_attention`` (fused, never materialising the attention matrix), with an
optional float32 upcast of the scores (the AR/MAR levels compute QK^T in float32) and an
optional KV cache for causal decoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ------------------------------------------------------------------------------------------------
# Normalisation and rotary embeddings
# ------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight multiply (LLaMA)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_2d(grid: int, head_dim: int, prefix: int, device=None) -> tuple[Tensor, Tensor]:
    """cos/sin tables (prefix + grid*grid, head_dim // 2) for 2-D RoPE over a raster grid.

    Pair m < head_dim/4 rotates by row * f_m, the next head_dim/4 pairs by column * f_m, with
    f_m = 10000^(-2m / (head_dim/2)). The ``prefix`` (condition) tokens get cos = sin = 0.
    """
    half = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2, device=device)[: half // 2].float() / half))
    t = torch.arange(grid, device=device, dtype=torch.float32)
    f = torch.outer(t, freqs)                                        # (grid, head_dim/4)
    angles = torch.cat([f[:, None, :].expand(grid, grid, -1),      # row
                        f[None, :, :].expand(grid, grid, -1)], -1)  # column
    angles = angles.reshape(grid * grid, half)
    zeros = torch.zeros(prefix, half, device=device)
    return torch.cat([zeros, angles.cos()]), torch.cat([zeros, angles.sin()])


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (2k, 2k+1) of x (B, H, T, head_dim) in float32; cos/sin (T, head_dim/2)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf.unbind(-1)
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).type_as(x)


# ------------------------------------------------------------------------------------------------
# Attention with optional KV cache
# ------------------------------------------------------------------------------------------------

class KVCache:
    """Keys and values of one attention layer for incremental causal decoding.

    Storage for ``max_len`` positions (rounded up to a multiple of 8) is allocated at the first
    append with the device and dtype of the keys it receives, and reused after ``reset`` for any
    batch up to the largest seen, so one sampling call allocates it once per layer.
    """

    def __init__(self, max_len: int):
        self.max_len = 8 * math.ceil(max_len / 8)
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0

    def reset(self) -> "KVCache":
        self.length = 0
        return self

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new keys/values (B, H, T, d) and return everything cached so far."""
        b, h, t, d = k.shape
        if self.length == 0:
            if self.k is None or self.k.shape[0] < b or self.k.dtype != k.dtype or self.k.device != k.device:
                self.k = k.new_empty(b, h, self.max_len, d)
                self.v = v.new_empty(b, h, self.max_len, d)
        end = self.length + t
        self.k[:b, :, self.length:end] = k
        self.v[:b, :, self.length:end] = v
        self.length = end
        return self.k[:b, :, :end], self.v[:b, :, :end]


class Attention(nn.Module):
    """Multi-head self-attention (fused qkv, heads as contiguous slices)."""

    def __init__(self, dim: int, heads: int, bias: bool, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, upcast: bool = True):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.attn_drop = attn_drop
        self.upcast = upcast
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, causal: bool = False, rope: tuple[Tensor, Tensor] | None = None,
                cache: KVCache | None = None) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask = None
        if cache is not None:
            start = cache.length
            k, v = cache.append(k, v)
            if t > 1:  # a block of new tokens: each sees the cache and the new tokens before it
                mask = torch.arange(start + t, device=x.device) <= start + torch.arange(t, device=x.device)[:, None]
            causal = False
        drop = self.attn_drop if self.training else 0.0
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):  # scores in float32, whatever autocast says
            with torch.autocast(x.device.type, enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), mask, drop, causal)
            out = out.to(v.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, drop, causal)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, t, -1)))


# ------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------

class SwiGLU(nn.Module):
    """LLaMA feed-forward: w2(silu(w1 x) * w3 x), hidden = multiple of 256 at or above int(8D/3)."""

    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        hidden = 256 * math.ceil(int(2 * 4 * dim / 3) / 256)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class MLP(nn.Module):
    """ViT feed-forward: fc2(drop(gelu(fc1 x))) with exact-erf GELU."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class LlamaBlock(nn.Module):
    """Causal pre-norm block of the AR levels: x += Attn(RMSNorm x); x += SwiGLU(RMSNorm x)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads, bias=False, proj_drop=dropout, upcast=True)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), causal=True, rope=rope, cache=cache)
        return x + self.mlp(self.norm2(x))


class ViTBlock(nn.Module):
    """Pre-norm ViT block: x += Attn(LN x); x += MLP(LN x); bidirectional unless ``causal``."""

    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 causal: bool = False, upcast: bool = True):
        super().__init__()
        self.causal = causal
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, bias=True, attn_drop=attn_drop, proj_drop=proj_drop, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, 4 * dim, proj_drop)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), causal=self.causal, cache=cache)
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: nn.ModuleList, x: Tensor, checkpoint: bool, **kwargs) -> Tensor:
    """Apply blocks in order, with activation checkpointing when training and asked to."""
    for block in blocks:
        if checkpoint and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, **kwargs)
        else:
            x = block(x, **kwargs)
    return x
