"""Transformer building blocks shared by every level.

Two block styles exist in the published system: LLaMA blocks (RMSNorm, SwiGLU, no biases,
2-D rotary embeddings) in AR levels, and ViT blocks (LayerNorm, GELU MLP, qkv bias) in MAR
levels and the pixel transformer. Both use one attention module built on
``F.scaled_dot_product_attention`` (fused, never materialising the attention matrix), with an
optional float32 upcast of the scores (the AR/MAR levels compute QK^T in float32). Sampling runs
them token by token through ``decode.Decoder`` (key/value caches) instead of these modules.
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
    """Rotate adjacent pairs (2k, 2k+1) of x (..., T, head_dim) in float32; cos/sin (T, head_dim/2)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf.unbind(-1)
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).type_as(x)


# ------------------------------------------------------------------------------------------------
# Linear layers and dropout
# ------------------------------------------------------------------------------------------------

def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear``, computing few-row products with a large weight on CPU as (W x^T)^T.

    MKL's x W^T packs the whole weight on every call, which dominates when x has a handful of
    rows: the guided (2-row) and small-batch token-by-token decoding of AR levels is 2-3x faster
    this way, the weight being streamed once. A single row gets a zero second column: MKL's
    matrix-vector kernel streams the weight at 50-90% of the bandwidth of its two-column product
    (batch-1 decoding: 512-wide levels ~1.9x, 1024-wide ~1.15x faster per product). Same result
    up to summation order.
    """
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    if x.device.type != "cpu" or rows > 128 or weight.numel() < 1 << 18:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, in_features)
    if rows == 1:
        flat = F.pad(flat, (0, 0, 0, 1))
    flat = flat.t()
    out = weight @ flat if bias is None else torch.addmm(bias.unsqueeze(1), weight, flat)
    return out[:, :rows].t().reshape(*x.shape[:-1], out_features)


def init_linear(module: nn.Module) -> None:
    """Xavier-uniform linear weights and zero biases (MAE / ViT convention)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Linear(nn.Linear):
    """``nn.Linear`` through ``linear`` (fast few-row products on CPU)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def _keep_mask(x: Tensor, p: float) -> Tensor:
    """Bool mask of the elements dropout keeps (probability 1 - p each): uniform draws compared
    with 1 - p, which torch's CPU generator makes ~1.7x faster than ``bernoulli_`` (dropout masks
    were a tenth of a large MAR model's training step)."""
    return torch.empty(x.shape, dtype=torch.float32, device=x.device).uniform_() < 1 - p


class _DropoutFunction(torch.autograd.Function):
    """x * keep / (1 - p), keeping the 1-byte ``keep`` mask for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        keep = _keep_mask(x, p)
        ctx.save_for_backward(keep)
        ctx.scale = 1 / (1 - p)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None


class _DropoutMatmul(torch.autograd.Function):
    """dropout(a) @ b for batched matrices, keeping ``a`` and the 1-byte mask rather than the dropped
    copy of ``a`` (for attention ``a`` is the softmax output, which softmax's backward keeps anyway)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, p: float) -> Tensor:
        keep = _keep_mask(a, p)
        ctx.save_for_backward(a, keep, b)
        ctx.scale = 1 / (1 - p)
        return (a * keep * ctx.scale) @ b

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, keep, b = ctx.saved_tensors
        grad_a = (grad @ b.transpose(-2, -1)) * keep * ctx.scale
        grad_b = (a * keep * ctx.scale).transpose(-2, -1) @ grad
        return grad_a, grad_b, None


class Dropout(nn.Module):
    """Dropout that costs nothing when inactive and, on CPU, keeps a bool mask for backward
    (torch's CPU dropout keeps a float32 one: 4x the memory of every dropped activation)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or self.p == 1:  # CUDA's fused dropout already keeps a bool mask
            return F.dropout(x, self.p, True)
        return _DropoutFunction.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------

#: Attention paths on CPU without autograd (``inference_path``), measured with
#: ``benchmarks/attention.py --sweeps`` (2 threads, torch 2.13, AMD EPYC Zen 3, inputs laid out as
#: the levels make them). Bidirectional passes of several queries over up to SHORT keys with up to
#: SHORT_HEAD dimensions per head: the explicit product (scores, softmax, values), 1.3-2.3x faster
#: than the fused kernel for the MAR levels' 21-token passes and 5-query last blocks at head dim
#: 16, and as fast up to 64 keys; the fused kernel wins from 96 keys, at head dim 64 (1.2-1.3x)
#: and for causal passes. One query over up to FEW_KEYS keys (the first decoding steps) in at
#: least FEW_ROWS batch x heads rows: elementwise products, 1.5-1.7x faster than the fused
#: kernel, whose fixed cost wins below (1.6x at 32 rows); over one key the output is the value.
SHORT = 64
SHORT_HEAD = 32
FEW_KEYS = 4
FEW_ROWS = 128

#: Most batch x heads rows one fused attention call takes: CUDA's fused kernels put them in one
#: grid dimension of at most 65,535 blocks, so larger calls go in chunks along the batch.
MAX_ROWS = 65535


class Attention(nn.Module):
    """Multi-head self-attention (fused qkv, heads as contiguous slices)."""

    def __init__(self, dim: int, heads: int, bias: bool, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, upcast: bool = True):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.attn_drop = attn_drop
        self.upcast = upcast
        self.qkv = Linear(dim, 3 * dim, bias=bias)
        self.proj = Linear(dim, dim, bias=bias)
        self.proj_drop = Dropout(proj_drop)

    def forward(self, x: Tensor, causal: bool = False, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Attention over x (B, T, D)."""
        b, t, dim = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv if rope is None else (*apply_rope(qkv[:2], *rope), qkv[2])  # q and k rotated at once
        drop = self.attn_drop if self.training else 0.0
        out = attention(q, k, v, causal=causal, dropout=drop, upcast=self.upcast)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, t, -1)))


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout: float = 0.0,
              causal: bool = False, upcast: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for (B, H, T, d) inputs, for any batch size.

    With ``upcast`` half-precision inputs are scored in float32 (whatever autocast says) and the
    result cast back. Calls with more than ``MAX_ROWS`` batch x heads rows run in chunks along
    the batch (a mask with a batch dimension is split with them).
    """
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        with torch.autocast(q.device.type, enabled=False):
            return attention(q.float(), k.float(), v.float(), mask, dropout, causal).to(v.dtype)
    b, heads = q.shape[:2]
    if b * heads <= MAX_ROWS:
        return attend(q, k, v, mask, dropout, causal)
    size = max(1, MAX_ROWS // heads)
    split = mask is not None and mask.dim() == 4 and mask.shape[0] == b
    return torch.cat([attend(q[i:i + size], k[i:i + size], v[i:i + size], mask[i:i + size] if split else mask,
                             dropout, causal) for i in range(0, b, size)])


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float, causal: bool) -> Tensor:
    """One attention call (see ``attention``): fused ``scaled_dot_product_attention``, except on
    CPU where it loses: attention dropout in training (its CPU fallback keeps scaled copies of q
    and k and a float32 dropout mask; ``explicit_attention`` keeps a 1-byte one), and shapes for
    which ``inference_path`` picks another path without autograd."""
    path = "fused"
    if q.device.type == "cpu" and (dropout > 0 or not torch.is_grad_enabled()):
        (b, h, queries, dim), keys = q.shape, k.shape[-2]
        path = "explicit" if dropout > 0 else inference_path(b * h, queries, keys, dim, mask is not None, causal)
    if path == "explicit":
        return explicit_attention(q, k, v, mask, dropout, causal)
    if path == "few":
        return few_keys_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, mask, dropout, causal)


def inference_path(rows: int, queries: int, keys: int, head_dim: int, masked: bool, causal: bool) -> str:
    """The fastest attention path on CPU without autograd for ``rows`` batch x heads rows (see
    ``SHORT``): "few" (``few_keys_attention``), "explicit" or "fused"."""
    if queries == 1 and not (masked or causal) and (keys == 1 or keys <= FEW_KEYS and rows >= FEW_ROWS):
        return "few"
    if not causal and 1 < queries and keys <= SHORT and head_dim <= SHORT_HEAD:
        return "explicit"
    return "fused"


def few_keys_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention of one query (B, H, 1, d) over a handful of keys, as elementwise products and sums."""
    if k.shape[-2] == 1:  # the softmax over one key is 1
        return v.clone(memory_format=torch.contiguous_format)
    probs = (q * k).sum(-1, keepdim=True).mul_(q.shape[-1] ** -0.5).softmax(-2)
    return (probs * v).sum(-2, keepdim=True)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float, causal: bool) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v as three products, the scores materialised (with dropout:
    its 1-byte mask kept for backward). ``causal`` aligns the mask top-left, as SDPA does."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)
    return _DropoutMatmul.apply(probs, v, dropout) if dropout > 0 else probs @ v


# ------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------

class SwiGLU(nn.Module):
    """LLaMA feed-forward: w2(silu(w1 x) * w3 x), hidden = multiple of 256 at or above int(8D/3)."""

    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        hidden = 256 * math.ceil(int(2 * 4 * dim / 3) / 256)
        self.w1 = Linear(dim, hidden, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class _GeluDropoutLinear(torch.autograd.Function):
    """linear(dropout(gelu(h)), weight, bias), keeping ``h`` and the 1-byte mask: backward
    recomputes the GELU (elementwise) instead of keeping GELU's output and its dropped copy, two
    hidden-width activations per token."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, p: float) -> Tensor:
        keep = _keep_mask(h, p)
        ctx.save_for_backward(h, keep, weight)
        ctx.scale = 1 / (1 - p)
        return F.linear(F.gelu(h) * keep * ctx.scale, weight.to(h.dtype), bias.to(h.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, keep, weight = ctx.saved_tensors
        dropped = (F.gelu(h) * keep * ctx.scale).flatten(0, -2)
        rows = grad.flatten(0, -2)
        grad_weight = (rows.t() @ dropped).to(weight.dtype)
        grad_h = torch.ops.aten.gelu_backward((grad @ weight.to(grad.dtype)) * keep * ctx.scale, h)
        return grad_h, grad_weight, rows.sum(0).to(weight.dtype), None


class MLP(nn.Module):
    """ViT feed-forward: drop(fc2(drop(gelu(fc1 x)))) with exact-erf GELU."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.training and self.drop.p > 0 and h.device.type == "cpu":
            return self.drop(_GeluDropoutLinear.apply(h, self.fc2.weight, self.fc2.bias, self.drop.p))
        return self.drop(self.fc2(self.drop(F.gelu(h))))


class LlamaBlock(nn.Module):
    """Causal pre-norm block of the AR levels: x += Attn(RMSNorm x); x += SwiGLU(RMSNorm x)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads, bias=False, proj_drop=dropout, upcast=True)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.attn(self.norm1(x), causal=True, rope=rope)
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

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), causal=self.causal)
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: nn.ModuleList, x: Tensor, checkpoint: bool, **kwargs) -> Tensor:
    """Apply blocks in order, with activation checkpointing when training and asked to."""
    for block in blocks:
        if checkpoint and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, **kwargs)
        else:
            x = block(x, **kwargs)
    return x
