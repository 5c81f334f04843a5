"""Static sampling steps (what CUDA graphs capture) and attention at any batch size, on CPU:
the static path must give the eager path's images and log-probabilities, and chunked attention
the unchunked result."""

from __future__ import annotations

import pytest
import torch

from fractalgen import FractalConfig, FractalGen, SamplingConfig, layers
from fractalgen.graphs import StepGraph, bucket
from fractalgen.layers import attention

STACKS = {
    "ar": dict(sizes=(8, 4, 1), types=("ar", "ar", "ar"), num_conds=1, guiding_pixel=False),
    "mar": dict(sizes=(8, 4, 1), types=("mar", "mar", "ar"), num_conds=5, guiding_pixel=False),
    "mar-guiding-pixel": dict(sizes=(8, 4, 1), types=("mar", "mar", "ar"), num_conds=5, guiding_pixel=True),
    "ar-over-mar": dict(sizes=(16, 4, 1), types=("ar", "mar", "ar"), num_conds=1, guiding_pixel=False),
}


def tiny(sizes, types, num_conds, guiding_pixel) -> FractalGen:
    n = len(sizes)
    cfg = FractalConfig(sizes, (32, 16, 16)[:n], (2, 1, 1)[:n], (2, 2, 2)[:n], types, channels=3,
                        class_num=10, num_conds=num_conds, guiding_pixel=guiding_pixel)
    torch.manual_seed(0)
    model = FractalGen(cfg).eval()
    with torch.no_grad():
        model.pixel.codebook.mul_(8)  # sharp logits: a wrong context changes the images
    return model


@pytest.mark.parametrize("settings", [SamplingConfig(num_iter=(3, 2)),
                                      SamplingConfig(cfg=3.0, cfg_schedule="linear", temperature=1.1,
                                                     num_iter=(4, 3))], ids=["plain", "guided-linear"])
@pytest.mark.parametrize("stack", list(STACKS))
def test_static_steps_give_the_eager_images_and_logprobs(stack, settings):
    model = tiny(**STACKS[stack])
    labels = torch.tensor([0, 3, 7, 9, 1])
    eager, logp_eager = model.sample(labels=labels, settings=settings, seed=4, return_logprob=True, graphs=False)
    static, logp_static = model.sample(labels=labels, settings=settings, seed=4, return_logprob=True, graphs=True)
    assert torch.equal(eager, static)
    torch.testing.assert_close(logp_static, logp_eager, rtol=1e-6, atol=1e-4)
    assert torch.equal(model.sample(labels=labels, settings=settings, seed=4, graphs=True), static)  # no log-probs
    other = model.sample(labels=labels, settings=settings, seed=5, graphs=True)
    assert not torch.equal(other, static)  # the seed reaches the static steps


def test_static_steps_are_kept_between_calls_and_follow_the_labels():
    model = tiny(**STACKS["ar"])
    settings = SamplingConfig(cfg=4.0)
    model.sample(labels=torch.tensor([1, 2]), settings=settings, seed=0, graphs=True)
    kept = len(model._graphs)
    assert kept > 0
    a = model.sample(labels=torch.tensor([1, 2]), settings=settings, seed=0, graphs=True)
    assert len(model._graphs) == kept  # same shapes: the same steps serve again
    b = model.sample(labels=torch.tensor([5, 6]), settings=settings, seed=0, graphs=True)
    assert not torch.equal(a, b)  # new labels reach steps that were made with others
    model.clear_graphs()
    assert len(model._graphs) == 0


def test_static_steps_see_updated_weights():
    """Steps hold the weights themselves, not copies: an in-place update shows in the next call."""
    model = tiny(**STACKS["ar"])
    labels = torch.tensor([1, 2])
    model.sample(labels=labels, seed=0, graphs=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    assert torch.equal(model.sample(labels=labels, seed=0, graphs=True), model.sample(labels=labels, seed=0, graphs=False))


@pytest.mark.parametrize("stack", ["ar", "mar-guiding-pixel"])
def test_compiled_steps_run_inside_the_static_steps(stack):
    """compile_sampling composes with the static steps (what CUDA graphs then replay as fused
    kernels): traced whole and run by aot_eager they give the eager images and log-probabilities;
    a decode step compiles once per stack (positions and channels are tensors), not once per
    position; the guidance weight of the linear schedule is an input, not a constant; compiling
    forgets the steps kept from before."""
    import torch._dynamo
    model = tiny(**STACKS[stack])
    labels = torch.tensor([0, 3])
    settings = SamplingConfig(cfg=3.0, cfg_schedule="linear", num_iter=(2, 2))
    eager, logp_eager = model.sample(labels=labels, settings=settings, seed=4, return_logprob=True, graphs=True)
    assert len(model._graphs) > 0
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.compile_sampling(backend="aot_eager", fullgraph=True)
    assert len(model._graphs) == 0
    try:
        static, logp_static = model.sample(labels=labels, settings=settings, seed=4, return_logprob=True, graphs=True)
        compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        model.compile_sampling(enabled=False)
    assert len(model._graphs) == 0
    assert torch.equal(static, eager)
    torch.testing.assert_close(logp_static, logp_eager, rtol=1e-6, atol=1e-4)
    if stack == "ar":  # a decode step per AR level and one channel step
        assert compiled == len(model.levels) + 1


def test_bucket_sizes_are_few_and_close():
    sizes = {bucket(n) for n in range(1, 5000)}
    assert all(bucket(n) >= n for n in range(1, 5000))
    assert all(bucket(n) <= n * 9 / 8 for n in range(1, 5000))
    assert [bucket(n) for n in range(1, 17)] == list(range(1, 17))
    assert len(sizes) < 110


def test_step_graph_without_capture_calls_the_function():
    calls = []
    step = StepGraph(lambda x, s: calls.append(s) or x * s, capture=False)
    assert torch.equal(step(torch.ones(2), 3.0), torch.full((2,), 3.0)) and calls == [3.0]


def test_step_graph_captures_on_second_use_and_falls_back_for_good(monkeypatch):
    """The first call runs eagerly (a step used once is never captured), the second captures; a
    capture that fails leaves the step eager, without trying again."""
    tried = []
    monkeypatch.setattr(StepGraph, "_capture", lambda self, inputs: tried.append(inputs) or setattr(self, "capture", False))
    step = StepGraph(lambda x: x + 1, capture=True)
    assert torch.equal(step(torch.zeros(1)), torch.ones(1)) and tried == []
    assert torch.equal(step(torch.ones(1)), torch.full((1,), 2.0)) and len(tried) == 1
    step(torch.ones(1))
    assert len(tried) == 1


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "per-image", "shared"])
def test_attention_in_chunks_equals_one_call(monkeypatch, causal, mask):
    """Past MAX_ROWS batch x heads rows attention runs in chunks along the batch, masks split too."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(13, 3, 70, 8) for _ in range(3))
    m = None
    if mask == "per-image":
        m = torch.rand(13, 1, 70, 70) < 0.7
        m[..., 0] = True
    elif mask == "shared":
        m = torch.rand(70, 70) < 0.7
        m[..., 0] = True
    if causal and m is not None:
        pytest.skip("causal attention takes no mask")
    whole = attention(q, k, v, m, causal=causal)
    monkeypatch.setattr(layers, "MAX_ROWS", 7)  # 2 images of 3 heads per chunk
    seen = []
    real = layers.attend
    monkeypatch.setattr(layers, "attend", lambda q, *a: seen.append(q.shape[0]) or real(q, *a))
    chunked = attention(q, k, v, m, causal=causal)
    assert seen == [2] * 6 + [1]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


def test_attention_in_chunks_trains():
    """Chunked attention back-propagates like one call."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(5, 2, 9, 4, requires_grad=True) for _ in range(3))
    attention(q, k, v, causal=True).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    old = layers.MAX_ROWS
    layers.MAX_ROWS = 4
    try:
        attention(q, k, v, causal=True).square().sum().backward()
    finally:
        layers.MAX_ROWS = old
    for t, g in zip((q, k, v), grads):
        torch.testing.assert_close(t.grad, g)


def test_upcast_scores_half_inputs_in_float32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 16).bfloat16() * 8 for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = attention(q, k, v, upcast=True)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, attention(q.float(), k.float(), v.float()).bfloat16())
