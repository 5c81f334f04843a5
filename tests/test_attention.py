"""Every attention path against a float64 reference, on the shapes the levels use: whichever path
``attention`` picks for a shape and device, it must compute softmax(q k^T / sqrt(d) + mask) v."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fractalgen.layers import attention, explicit_attention, few_keys_attention, inference_path

#: (B, H, queries, keys, head dim, causal, masked), fewer images than sampling runs
SHAPES = {
    "mar 16px level 0 block": (3, 4, 21, 21, 16, False, False),
    "mar level 1 last block at 5 queries": (3, 2, 5, 21, 16, False, False),
    "mar level with guiding pixel, last block": (2, 4, 5, 22, 80, False, False),
    "mar 64px level 0 block": (2, 4, 261, 261, 16, False, False),
    "mar 64px level 0 last block at 20 queries": (2, 4, 20, 261, 16, False, False),
    "in64 mar level 1 block": (2, 8, 21, 21, 64, False, False),
    "guiding pixel step": (3, 4, 1, 3, 32, False, False),
    "pixel transformer first step": (3, 2, 1, 1, 8, False, False),
    "pixel transformer step": (3, 2, 1, 2, 8, False, False),
    "pixel transformer step, many rows": (80, 2, 1, 3, 8, False, False),
    "pixel transformer static step (masked cache)": (3, 2, 1, 8, 8, False, True),
    "ar level 0 step": (2, 4, 1, 101, 16, False, False),
    "ar level static step (masked cache)": (2, 4, 1, 24, 16, False, True),
    "pixel likelihood": (5, 2, 3, 3, 8, True, False),
    "ar level 1 likelihood": (4, 2, 16, 16, 16, True, False),
    "ar level 0 likelihood": (2, 4, 256, 256, 16, True, False),
    "causal, fewer queries than keys": (2, 2, 3, 8, 16, True, False),
}


def inputs(b, h, q, k, d, causal, masked, dtype=torch.float32):
    g = torch.Generator().manual_seed(q * 1000 + k)
    tensors = [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * 2 for n in (q, k, k)]
    mask = (torch.arange(k) < k - 3).unsqueeze(0) if masked else None  # the static decoding form's later slots
    return [t.to(dtype) for t in tensors], mask


def reference(q, k, v, mask, causal):
    """The formula in float64, written out."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    nq, nk = q.shape[-2], k.shape[-2]
    if causal:  # aligned top-left (query i sees keys 0..i), as SDPA
        mask = torch.arange(nk) <= torch.arange(nq)[:, None]
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)


def fused(q, k, v, mask, causal):
    return F.scaled_dot_product_attention(q, k, v, mask, 0.0, causal)


def math_backend(q, k, v, mask, causal):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, mask, 0.0, causal)


PATHS = {
    "explicit": lambda q, k, v, mask, causal: explicit_attention(q, k, v, mask, 0.0, causal),
    "fused": fused,
    "math": math_backend,
    "few keys": lambda q, k, v, mask, causal: few_keys_attention(q, k, v),
    "picked (inference)": lambda q, k, v, mask, causal: attention(q, k, v, mask, causal=causal),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_path_equals_the_float64_formula(shape, path):
    b, h, nq, nk, d, causal, masked = SHAPES[shape]
    if path == "few keys" and (nq > 1 or nk > 4 or masked or causal):
        pytest.skip("one query over a few keys only")
    (q, k, v), mask = inputs(*SHAPES[shape])
    with torch.inference_mode():
        got = PATHS[path](q, k, v, mask, causal)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(q, k, v, mask, causal), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", ["mar 16px level 0 block", "pixel transformer static step (masked cache)",
                                   "ar level 1 likelihood", "mar 64px level 0 last block at 20 queries"])
def test_attention_with_autograd_equals_the_formula_and_its_gradients(shape):
    """Training and anything else under autograd: the fused kernel, same values, gradients of the formula."""
    b, h, nq, nk, d, causal, masked = SHAPES[shape]
    (q, k, v), mask = inputs(*SHAPES[shape], dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, mask, causal=causal)
    ref = reference(q, k, v, mask, causal)
    torch.testing.assert_close(out, ref)
    weights = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad((out * weights).sum(), (q, k, v)),
                         torch.autograd.grad((ref * weights).sum(), (q, k, v))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ["mar 16px level 0 block", "mar 64px level 0 last block at 20 queries",
                                   "ar level 0 step", "guiding pixel step"])
def test_upcast_scores_half_inputs_in_float32_on_every_path(shape, dtype):
    """The levels that need float32 scores get them whichever path runs: the half-precision result is
    the float64 formula on the same half inputs to within one unit in the last place (half-precision
    scores would be off by percents)."""
    b, h, nq, nk, d, causal, masked = SHAPES[shape]
    (q, k, v), mask = inputs(*SHAPES[shape], dtype=dtype)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
        got = attention(q, k, v, mask, causal=causal, upcast=True)
    assert got.dtype == dtype
    want = reference(q, k, v, mask, causal)
    info = torch.finfo(dtype)
    assert ((got.double() - want).abs() <= info.eps * want.abs() + info.tiny).all()


def test_the_paths_serve_the_shapes_they_are_fastest_for():
    """The choice is a function of the shape: the MAR levels' short passes take the explicit
    product, the first decoding steps of many rows elementwise products; causal passes, long
    sequences, wide heads and later decoding steps keep the fused kernel."""
    assert inference_path(1024, 21, 21, 16, False, False) == inference_path(512, 5, 22, 16, False, False) == "explicit"
    assert inference_path(512, 1, 3, 8, False, False) == inference_path(8, 1, 1, 8, False, False) == "few"
    assert inference_path(32, 1, 3, 8, False, False) == inference_path(512, 1, 8, 8, True, False) == "fused"
    assert inference_path(8192, 3, 3, 8, False, True) == inference_path(64, 261, 261, 16, False, False) == "fused"
    assert inference_path(512, 21, 21, 64, False, False) == inference_path(64, 1, 101, 16, False, False) == "fused"
