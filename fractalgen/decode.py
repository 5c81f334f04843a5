"""One-token decoding of the causal stacks (AR levels, pixel transformers) for sampling.

Sampling runs thousands of dependent one-token steps through small transformers, so what it
costs is the number of tensor operations per step, not their size. A ``Decoder`` gathers a
stack's weights once into plain tensors, keeps one key/value cache per block with a view of
every position made up front, and runs a token through a block with about a dozen operations:
no module calls, no general-purpose branches, rotary embeddings as one small matrix product.
It computes what the modules' ``forward`` computes (the tests compare it with teacher forcing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import LlamaBlock, attention, linear


def rope_matrices(cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary tables (T, d/2) as per-position rotations (T, d, d) acting on row vectors: pair
    (2i, 2i+1) -> (x0 cos - x1 sin, x1 cos + x0 sin), as ``layers.apply_rope``."""
    t, half = cos.shape
    rot = cos.new_zeros(t, half, 2, half, 2)
    i = torch.arange(half, device=cos.device)
    rot[:, i, 0, i, 0] = cos
    rot[:, i, 1, i, 1] = cos
    rot[:, i, 1, i, 0] = -sin
    rot[:, i, 0, i, 1] = sin
    return rot.reshape(t, 2 * half, 2 * half)


def cache_length(n: int) -> int:
    """Cache length for ``n`` tokens, rounded up to a multiple of 8 (aligned rows)."""
    return 8 * math.ceil(n / 8)


def layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    """``norm(x)`` without the module call."""
    return torch.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _call(x: Tensor, layer: nn.Module, _: None) -> Tensor:
    """``layer(x)``, for layers whose weight is not a plain tensor (int8)."""
    return layer(x)


def _lin(layer: nn.Module) -> tuple:
    """(function, weight, bias) of a linear layer: ``layers.linear`` where its few-row CPU product
    pays (large weights), the plain kernel otherwise (no per-call checks), the layer itself when
    it is int8 (``quantize.quantize_int8``)."""
    if not isinstance(layer.weight, Tensor):  # int8 layers keep packed weights (``weight`` is a method)
        return _call, layer, None
    fn = linear if layer.weight.device.type == "cpu" and layer.weight.numel() >= 1 << 18 else F.linear
    return fn, layer.weight, layer.bias


def gather_block(block: nn.Module) -> tuple:
    """A block's weights in the order the steps use them, each linear as (function, weight, bias)."""
    a, m = block.attn, block.mlp
    if isinstance(block, LlamaBlock):
        return (block.norm1.weight, block.norm1.eps, _lin(a.qkv), _lin(a.proj),
                block.norm2.weight, block.norm2.eps, _lin(m.w1), _lin(m.w3), _lin(m.w2))
    n1, n2 = block.norm1, block.norm2
    return ((n1.normalized_shape, n1.weight, n1.bias, n1.eps), _lin(a.qkv), _lin(a.proj),
            (n2.normalized_shape, n2.weight, n2.bias, n2.eps), _lin(m.fc1), _lin(m.fc2))


def take_rows(x: Tensor, rows: Tensor) -> Tensor:
    """The rows ``rows`` (B * Q,) of x (B, T, D) seen as (B * T, D), Q per image in order: (B, Q, D).
    A row copy (``index_select``), several times cheaper than a gather of whole feature vectors."""
    return x.flatten(0, 1).index_select(0, rows).view(x.shape[0], -1, x.shape[-1])


def gather_encoder(block: nn.Module) -> tuple:
    """``gather_block``'s weights of a ViT block, and its attention folded for few queries
    (``fold_attention``): what a MAR sampling step needs, gathered once per sampling call."""
    w = gather_block(block)
    return w + (fold_attention(w[1], w[2], block.attn.heads),)


def fold_attention(qkv: tuple, proj: tuple, heads: int) -> tuple[Tensor, ...] | None:
    """A ViT attention's projections multiplied together (float32, outside autocast) for
    ``_attend_from``: per head the score matrix [Wk_h | bk_h]^T [Wq_h | bq_h] / sqrt(d_h) as a linear
    map of the query token (weight (heads * (d + 1), d) and bias), the value-output maps
    Wo_h Wv_h side by side (d, heads * d) and the output bias Wo bv + bo. None for layers without
    biases or with int8 weights."""
    (_, wqkv, bqkv), (_, wo, bo) = qkv, proj
    if not isinstance(wqkv, Tensor) or bqkv is None or bo is None:
        return None
    d = wqkv.shape[1]
    dh = d // heads
    with torch.autocast(wqkv.device.type, enabled=False):
        (wq, wk, wv), (bq, bk, bv) = (w.view(heads, dh, d) for w in wqkv.chunk(3)), bqkv.view(3, heads, dh, 1).unbind(0)
        folded = torch.cat([wk, bk], 2).transpose(1, 2) @ torch.cat([wq, bq], 2) * dh ** -0.5  # (heads, d + 1, d + 1)
        values = (wo.view(d, heads, dh).transpose(0, 1) @ wv).transpose(0, 1).reshape(d, heads * d)
        return (folded[..., :d].reshape(-1, d).contiguous(), folded[..., d].flatten(), values,
                torch.addmv(bo, wo, bv.flatten()))


def encoder_block(w: tuple, heads: int, upcast: bool, x: Tensor, rows: Tensor | None = None,
                  h: Tensor | None = None) -> Tensor:
    """A bidirectional ViT block (weights from ``gather_encoder``) on x (B, T, D) without module
    calls, for sampling; with ``rows`` (``take_rows``) its output only at those positions
    (B, Q, D), every position still serving as key and value (as ``layers.ViTBlock``). ``h``: the
    block's first layer norm of x, when the caller keeps it."""
    n1, (f_qkv, wqkv, bqkv), (f_o, *o), n2, (f1, *w1), (f2, *w2), folded = w
    if rows is not None and not isinstance(wqkv, Tensor):  # an int8 qkv cannot be split into q, k and v
        return take_rows(encoder_block(w, heads, upcast, x, h=h), rows)
    b, t, d = x.shape
    h = torch.layer_norm(x, *n1) if h is None else h
    if rows is None:
        q, k, v = f_qkv(h, wqkv, bqkv).view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        x = x + f_o(attention(q, k, v, upcast=upcast).transpose(1, 2).reshape(b, t, d), *o)
    else:
        x = take_rows(x, rows).add_(_attend_from(take_rows(h, rows), h, (f_qkv, wqkv, bqkv), (f_o, *o), heads, upcast,
                                                 folded))
    return x.add_(f2(torch.ops.aten.gelu_(f1(torch.layer_norm(x, *n2), *w1)), *w2))


def _attend_from(hq: Tensor, h: Tensor, qkv: tuple, proj: tuple, heads: int, upcast: bool,
                 folded: tuple[Tensor, ...] | None) -> Tensor:
    """Attention of the tokens hq (B, Q, D) over the tokens h (B, T, D) (normalised, before the
    qkv projection ``qkv``), through the output projection ``proj``: (B, Q, D). In float32, when
    the heads x queries are few against the tokens, without keys or values: per head the score
    [h_j; 1]^T [Wk_h | bk_h]^T [Wq_h | bq_h] [hq; 1] / sqrt(d_h) and the output sum_h Wo_h Wv_h
    (P_h h) + Wo bv + bo (P's rows sum to 1), from the projections multiplied together
    (``folded``, from ``fold_attention``): about half the work of the lowest MAR level's step."""
    (f_qkv, wqkv, bqkv), (f_o, wo, bo) = qkv, proj
    (b, nq, d), t, dh = hq.shape, h.shape[1], hq.shape[2] // heads
    if (folded is None or hq.dtype != torch.float32 or torch.is_autocast_enabled(hq.device.type)
            or nq * heads * (t + d) >= t * d):
        q = f_qkv(hq, wqkv[:d], None if bqkv is None else bqkv[:d]).view(b, nq, heads, dh).transpose(1, 2)
        k, v = f_qkv(h, wqkv[d:], None if bqkv is None else bqkv[d:]).view(b, t, 2, heads, dh).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, upcast=upcast)  # float32 scores for half inputs, as the levels compute them
        return f_o(out.transpose(1, 2).reshape(b, nq, d), wo, bo)
    key_weight, key_bias, values, out_bias = folded
    keys = F.linear(hq, key_weight, key_bias).view(b, nq * heads, d + 1)
    scores = torch.baddbmm(keys[..., d:], keys[..., :d], h.transpose(1, 2))
    return F.linear((scores.softmax(-1) @ h).view(b, nq, heads * d), values, out_bias)


def _gelu(x: Tensor) -> Tensor:
    """Exact GELU of a token batch (B, H); a small CPU one goes through a transposed view, which
    takes torch's native kernel: at that size ~4x cheaper than the oneDNN one contiguous input
    gets (the same function, rounded differently in the last bits)."""
    if x.device.type == "cpu" and x.numel() <= 4096:
        return F.gelu(x.t()).t()
    return F.gelu(x)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as ``layers.RMSNorm``: in float32, cast back before the weight multiply."""
    if x.dtype == torch.float32 and hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


class Decoder:
    """Key/value caches and one-token steps for ``blocks`` (all LLaMA or all ViT blocks).

    ``step(x, pos, rotation)`` feeds the residual stream (B, D) of the token at position ``pos``
    through every block and returns the new stream; ``rotation`` (head_dim, head_dim) rotates
    queries and keys (LLaMA blocks). ``pos`` is an int, or a one-element long tensor on the
    device: the static form, whose every step has the same shapes and launches the same kernels
    (the key and value go in with ``index_copy_``, attention runs over the whole cache with later
    positions masked), so one captured CUDA graph serves every position. A call with fewer rows
    than the decoder was sized for (editing decodes subsets) slices the caches. ``tables`` are what
    the owning level looks up per position (its ``decode_tables``: position embeddings, rotations,
    logit weights), one row per position (``lookup``). Runs without autograd (sampling is under
    ``torch.inference_mode``).
    """

    def __init__(self, blocks: nn.ModuleList, max_len: int, rows: int, like: Tensor, tables: tuple[Tensor, ...] = ()):
        attn = blocks[0].attn
        self.heads, self.head_dim = attn.heads, attn.head_dim
        self.upcast = attn.upcast and like.dtype in (torch.float16, torch.bfloat16)
        self.llama = isinstance(blocks[0], LlamaBlock)
        self.weights = [gather_block(block) for block in blocks]
        self.rows, self.max_len = rows, max_len
        # zeros: the static form attends over every slot (masked ones too, and 0 * NaN would be NaN)
        self.caches = [like.new_zeros(rows, 2, self.heads, max_len, self.head_dim) for _ in blocks]
        # per block and position: the key and value slot of the new token, the keys and values so far
        self.views = [[(c[:, :, :, t], c[:, 0, :, : t + 1], c[:, 1, :, : t + 1]) for t in range(max_len)]
                      for c in self.caches]
        self.slots = torch.arange(max_len, device=like.device)
        self.tables = tables
        self.table_rows = list(zip(*(table.unbind() for table in tables)))  # per position, for int positions

    def lookup(self, pos: int | Tensor) -> tuple[Tensor, ...]:
        """Every table's row at ``pos``: an int, or a one-element tensor (the static form)."""
        if isinstance(pos, int):
            return self.table_rows[pos]
        return tuple(table.index_select(0, pos).squeeze(0) for table in self.tables)

    def fits(self, rows: int, like: Tensor) -> bool:
        """Whether the caches can serve ``rows`` rows of ``like``'s dtype and device."""
        c = self.caches[0]
        return self.rows >= rows and c.dtype == like.dtype and c.device == like.device

    def _attend(self, qkv: Tensor, at: tuple[Tensor, ...] | Tensor, pos: Tensor | None,
                rotation: Tensor | None) -> Tensor:
        """Write this token's key and value into the cache and attend over the keys so far: (B, D).
        ``at`` is the position's views of the cache, or with a static ``pos`` the whole cache."""
        b = qkv.shape[0]
        qkv = qkv.view(b, 3, self.heads, self.head_dim)
        q, kv = qkv[:, 0], qkv[:, 1:]  # the key and value go into the cache with one copy
        if rotation is not None:  # queries and keys rotated in float32 (stacked: one product)
            q, k = (torch.stack([q, kv[:, 0]], 1).float() @ rotation).type_as(qkv).unbind(1)
            kv = torch.stack([k, kv[:, 1]], 1)
        mask = None
        if pos is None:
            slot, keys, values = at if b == self.rows else (t[:b] for t in at)
            slot.copy_(kv)
        else:
            cache = at if b == self.rows else at[:b]
            cache.index_copy_(3, pos, kv.unsqueeze(3))
            keys, values, mask = cache[:, 0], cache[:, 1], (self.slots <= pos).unsqueeze(0)
        return attention(q.unsqueeze(2), keys, values, mask, upcast=self.upcast).view(b, -1)

    def step(self, x: Tensor, pos: int | Tensor, rotation: Tensor | None = None) -> Tensor:
        """Run the token at ``pos`` (residual stream (B, D)) through every block."""
        static = isinstance(pos, Tensor)
        if not static and pos >= self.max_len:
            raise IndexError(f"position {pos} is past the cache length {self.max_len}")
        where = pos if static else None
        for w, cache, views in zip(self.weights, self.caches, self.views):
            at = cache if static else views[pos]
            if self.llama:
                n1, eps1, (f_qkv, *qkv), (f_o, *o), n2, eps2, (f1, *w1), (f3, *w3), (f2, *w2) = w
                x = x + f_o(self._attend(f_qkv(_rms_norm(x, n1, eps1), *qkv), at, where, rotation), *o)
                h = _rms_norm(x, n2, eps2)
                x = x + f2(F.silu(f1(h, *w1)) * f3(h, *w3), *w2)
            else:
                n1, (f_qkv, *qkv), (f_o, *o), n2, (f1, *w1), (f2, *w2) = w
                x = x + f_o(self._attend(f_qkv(torch.layer_norm(x, *n1), *qkv), at, where, rotation), *o)
                x = x + f2(_gelu(f1(torch.layer_norm(x, *n2), *w1)), *w2)
        return x
