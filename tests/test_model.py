"""Model behaviour beyond parity: configs, training, likelihood, sampling, persistence, errors."""

from __future__ import annotations

import math

import pytest
import torch

from fractalgen import (CheckpointError, ConfigError, FractalConfig, FractalGen, InputError, SamplingConfig,
                        SamplingError, get_preset, load_model)
from fractalgen.context import SampleContext, patchify, unpatchify


def tiny(sizes=(16, 4, 1), types=("mar", "mar", "ar"), channels=3, class_num=10, guiding_pixel=False, **kw):
    """A very small model for fast tests."""
    n = len(sizes)
    cfg = FractalConfig(sizes, (32, 16, 16, 16)[:n], (1,) * n, (2,) * n, types, channels=channels,
                        class_num=class_num, num_conds=1 if types[0] == "ar" else 5, guiding_pixel=guiding_pixel,
                        guide_width=16, guide_depth=1, guide_heads=2, **kw)
    torch.manual_seed(0)
    return FractalGen(cfg)


VARIANTS = {
    "ar-rgb": dict(types=("ar", "ar", "ar")),
    "mar-rgb": dict(),
    "mar-ar-grey": dict(types=("mar", "ar", "ar"), channels=1),
    "mar4-gp-rgba": dict(sizes=(16, 8, 2, 1), types=("mar", "mar", "mar", "ar"), channels=4, guiding_pixel=True),
    "ar-uncond": dict(types=("ar", "ar", "ar"), class_num=0),
}


def images_for(model: FractalGen, n: int = 2, seed: int = 0) -> torch.Tensor:
    c, s = model.config.channels, model.config.image_size
    return torch.randint(0, 256, (n, c, s, s), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def labels_for(model: FractalGen, n: int = 2):
    return torch.arange(n) % model.config.class_num if model.config.conditional else None


# ------------------------------------------------------------------------------------------------
# Configs and presets
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [(28, 4, 1), (32, 8, 2, 1), (64, 4, 1), (256, 16, 4, 1)])
def test_sizes_that_divide_build(sizes):
    n = len(sizes)
    cfg = FractalConfig(sizes, (32,) * n, (1,) * n, (2,) * n, ("mar",) * (n - 1) + ("ar",))
    assert [cfg.seq_len(l) for l in range(n - 1)] == [(a // b) ** 2 for a, b in zip(sizes, sizes[1:])]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(img_size_list=(30, 4, 1)), "does not divide"),
    (dict(img_size_list=(16, 4, 2)), "must be 1"),
    (dict(embed_dim_list=(32, 16)), "embed_dim_list has 2 entries"),
    (dict(generator_type_list=("mar", "xx", "ar")), "'ar' or 'mar'"),
    (dict(num_heads_list=(3, 2, 2)), "not divisible"),
    (dict(pixel_mean=(0.5,)), "pixel_mean"),
    (dict(class_num=-1), "class_num"),
])
def test_bad_configs_are_named(kwargs, needle):
    base = dict(img_size_list=(16, 4, 1), embed_dim_list=(32, 16, 16), num_blocks_list=(1, 1, 1),
                num_heads_list=(2, 2, 2), generator_type_list=("mar", "mar", "ar"))
    with pytest.raises(ConfigError, match=needle):
        FractalConfig(**{**base, **kwargs})


def test_config_roundtrip_and_unknown_keys(tmp_path):
    cfg = get_preset("fractalmar_fmnist28")
    cfg.save(tmp_path / "c.json")
    assert FractalConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ConfigError, match="unknown config keys"):
        FractalConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_default_normalisation_per_channel_count():
    assert get_preset("fractalmar_in64").pixel_mean == (0.485, 0.456, 0.406)
    grey = get_preset("fractalmar_rgb32", channels=1)
    assert grey.pixel_mean == (0.5,) and grey.pixel_std == (0.5,)


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------

def test_patchify_roundtrip_and_order():
    x = torch.arange(2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 3, 4, 4)
    assert torch.equal(p[0, 1], x[0, :, 0:4, 4:8])  # raster order: second patch is top-right
    assert torch.equal(unpatchify(p), x)


@pytest.mark.parametrize("variant", ["ar-rgb", "mar-ar-grey"])
@torch.no_grad()
def test_kv_cache_decoding_matches_teacher_forcing(variant):
    """Feeding an AR level one token at a time through the KV cache gives its teacher-forced outputs."""
    model = tiny(**VARIANTS[variant]).eval()
    level = next(l for l in model.levels if l.__class__.__name__ == "ARLevel")
    n, L = 3, level.seq_len
    patches = torch.randint(0, 256, (n, L, model.config.channels, level.patch_size, level.patch_size), dtype=torch.uint8)
    cond = torch.randn(n, level.cond_dim)
    expected = level.conditions(patches, [cond])[0]
    token = level.cond_emb(cond)
    decoder = SampleContext(SamplingConfig()).decoder(level, L, like=token)
    outs = []
    for t in range(L):
        outs.append(level.decode(decoder, token, t))
        if t + 1 < L:
            token = level.embed_patches(patches[:, t])
    torch.testing.assert_close(torch.stack(outs, 1), expected, atol=1e-5, rtol=1e-5)


def test_attention_dropout_gradients_use_the_kept_mask():
    """Training-time attention dropout on CPU keeps a 1-byte mask: outputs and gradients equal
    the plain formula with that mask."""
    from fractalgen.layers import _keep_mask, attend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 6, 4, generator=g, dtype=torch.double, requires_grad=True) for _ in range(3))
    torch.manual_seed(5)
    out = attend(q, k, v, None, 0.4, False)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    torch.manual_seed(5)
    probs = (q @ k.transpose(-2, -1) / 2).softmax(-1)
    keep = _keep_mask(probs, 0.4)
    expected = (probs * keep / 0.6) @ v
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, torch.autograd.grad(expected.sum(), (q, k, v))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_masks_keep_each_element_with_probability_one_minus_p(p):
    """The 1-byte masks keep 1 - p of the elements, independently: the kept fraction is within 5
    standard errors of 1 - p, and neighbours agree no more often than independent draws would."""
    from fractalgen.layers import _keep_mask

    torch.manual_seed(0)
    keep = _keep_mask(torch.empty(1000, 1000, dtype=torch.double), p)
    n, q = keep.numel(), 1 - p
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    assert abs(keep.double().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / n)
    both = (keep[:, 1:] & keep[:, :-1]).double().mean().item()
    assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / (n - 1000))


def test_mlp_dropout_keeps_the_pre_activation_and_a_mask():
    """The training MLP keeps fc1's output and a 1-byte mask; outputs and gradients equal the
    plain formula with that mask."""
    import torch.nn.functional as F
    from fractalgen.layers import MLP, _keep_mask

    mlp = MLP(6, 24, dropout=0.3).double().train()
    x = torch.randn(4, 5, 6, dtype=torch.double, requires_grad=True)
    torch.manual_seed(3)
    out = mlp(x)
    grads = torch.autograd.grad(out.sum(), [x, *mlp.parameters()])
    torch.manual_seed(3)
    h = mlp.fc1(x)
    keep = _keep_mask(h, 0.3)
    y = mlp.fc2(F.gelu(h) * keep / 0.7)
    expected = y * _keep_mask(y, 0.3) / 0.7
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, torch.autograd.grad(expected.sum(), [x, *mlp.parameters()])):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shape", [(1, 640), (1, 1, 640), (2, 1, 640), (5, 7, 640), (200, 640)])
@pytest.mark.parametrize("bias", [True, False])
def test_few_row_linear_path_equals_f_linear(shape, bias):
    """Few rows times a large weight take the streamed (W x^T)^T path on CPU: same values and
    gradients as F.linear."""
    import torch.nn.functional as F
    from fractalgen.layers import Linear

    torch.manual_seed(0)
    layer = Linear(640, 512, bias=bias)  # 327,680 weights: above the threshold
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    expected = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, layer.weight])
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), [x, layer.weight])):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_pixel_head_cached_decoding_matches_teacher_forcing():
    model = tiny().eval()
    head = model.pixel
    cond, values = torch.randn(5, 16), torch.randint(0, 256, (5, 3))
    expected = head.logits(cond, values)
    token = head.cond_emb(cond)
    decoder = SampleContext(SamplingConfig()).decoder(head, 3, like=token)
    for c in range(3):
        torch.testing.assert_close(head.decode(decoder, token, c), expected[:, c], atol=1e-5, rtol=1e-5)
        token = head.codebook[c][values[:, c]]


# ------------------------------------------------------------------------------------------------
# Training and likelihood
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loss_is_finite_and_reaches_every_parameter(variant):
    model = tiny(**VARIANTS[variant], label_drop_prob=0.5).train()  # both class and null rows occur
    out = model(images_for(model, 16), labels_for(model, 16))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unused == []


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("micro_batches, lower_chunks", [(1, 1), (1, 4), (3, 1), (2, 5)])
def test_forward_backward_in_parts_gives_the_gradients_of_one_backward(variant, micro_batches, lower_chunks):
    model = tiny(**VARIANTS[variant], label_drop_prob=0.5, attn_dropout=0.0, proj_dropout=0.0).train()
    images, labels = images_for(model, 5), labels_for(model, 5)
    masks = {}

    def mask_fn(level, n, L, device):  # the same random masks in both runs
        g = torch.Generator().manual_seed(100 * level + n)
        return masks.setdefault((level, n), torch.rand(n, L, generator=g) < torch.rand(n, 1, generator=g))

    torch.manual_seed(1)  # label drop
    loss = model(images, labels, mask_fn=mask_fn).loss
    loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    value = model.forward_backward(images, labels, micro_batches, lower_chunks, mask_fn=mask_fn)
    torch.testing.assert_close(value, loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)
    with pytest.raises(InputError, match="lower_chunks must be >= 1"):
        model.forward_backward(images, labels, lower_chunks=0)


def test_dropout_keeps_a_bool_mask_and_scales():
    from fractalgen.layers import Dropout

    drop = Dropout(0.25).train()
    x = (torch.rand(4000, 50) + 1).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = drop(x)
    assert [t.dtype for t in saved] == [torch.bool]
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() / 0.75)
    assert drop.eval()(x) is x and Dropout(0.0).train()(x) is x


@pytest.mark.parametrize("preset, overrides", [
    ("fractalmar_rgb32", dict(class_num=0)),
    ("fractalar_fmnist28", {}),
    ("fractalmar_fmnist28", dict(class_num=0, class_names=None)),
], ids=["rgb32-uncond", "grey28-ar", "grey28-mar-uncond"])
def test_few_training_steps_lower_the_loss(preset, overrides):
    """Fit a fixed small batch: the eval loss on it must fall clearly."""
    cfg = get_preset(preset, embed_dim_list=(64, 32, 16), num_blocks_list=(1, 1, 1), num_heads_list=(4, 2, 2),
                     **overrides)
    torch.manual_seed(0)
    model = FractalGen(cfg)
    images = images_for(model, 8) // 32 * 32  # few distinct values: quick to learn
    labels = labels_for(model, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mask_all = lambda level, n, L, device: torch.ones(n, L, dtype=torch.bool)
    model.eval()
    before = model(images, labels, mask_fn=mask_all).loss.item()
    model.train()
    for _ in range(15):
        loss = model(images, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = model(images, labels, mask_fn=mask_all).loss.item()
    assert after < before - 1.0, (before, after)


def test_ar_nll_is_exact_log_likelihood_of_its_sampling_distribution():
    """For an AR stack, bits/dim equals -log2 of the product of the sampler's own conditionals."""
    model = tiny(types=("ar", "ar", "ar"), sizes=(4, 2, 1), channels=1).eval()
    image = images_for(model, 1)
    bpd, err = model.nll(image)
    level0, level1, head = model.levels[0], model.levels[1], model.pixel
    patches0 = patchify(image, 2)
    cond0 = level0.conditions(patches0, [model.null_cond])[0]  # (1, 4, D)
    total = 0.0
    for i in range(4):
        sub = patches0[:, i]                                     # (1, 1, 2, 2)
        p1 = patchify(sub, 1)
        cond1 = level1.conditions(p1, [cond0[:, i]])[0]          # (1, 4, D1)
        for j in range(4):
            logits = head.logits(cond1[:, j], p1[:, j].flatten(1))
            total -= torch.log_softmax(logits[0, 0], -1)[int(p1[0, j, 0, 0, 0])].item()
    assert err.item() == 0
    assert abs(bpd.item() - total / 16 / math.log(2)) < 1e-4


def test_mar_nll_estimator_reports_standard_error():
    model = tiny().eval()
    images = images_for(model, 2)
    bpd, err = model.nll(images, passes=4)
    assert bpd.shape == err.shape == (2,)
    assert (err > 0).all()  # random masks: the passes differ
    assert model.training is False


def test_guiding_pixel_losses_are_part_of_the_total():
    model = tiny(**VARIANTS["mar4-gp-rgba"]).eval()
    out = model(images_for(model, 3))
    assert out.guiding.shape == (3, 2)
    torch.testing.assert_close(out.per_image, out.pixel.double() + out.guiding.sum(1))


def test_batch_nll_equals_mean_of_per_image_values():
    model = tiny(types=("ar", "ar", "ar")).eval()
    images = images_for(model, 4)
    out = model(images)
    torch.testing.assert_close(out.loss.double(), out.per_image.mean(), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sampling_shape_dtype_and_seed(variant):
    model = tiny(**VARIANTS[variant]).eval()
    cfg = model.config
    kwargs = dict(labels=torch.tensor([1, 2])) if cfg.conditional else dict(num_images=2)
    settings = SamplingConfig(cfg=2.0 if cfg.conditional else 1.0, cfg_schedule="linear", num_iter=(4, 2, 2))
    a = model.sample(**kwargs, settings=settings, seed=3)
    b = model.sample(**kwargs, settings=settings, seed=3)
    c = model.sample(**kwargs, settings=settings, seed=4)
    assert a.shape == (2, cfg.channels, cfg.image_size, cfg.image_size) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("variant", ["ar-rgb", "mar-rgb"])
def test_compiled_sampling_steps_trace_whole_and_sample_the_same(variant):
    """compile_sampling: every step function traces as one graph (fullgraph raises on a break)
    and, run by aot_eager (the traced, functionalised graph on eager kernels), gives the eager
    samples exactly; enabled=False returns to the eager steps."""
    import torch._dynamo
    model = tiny(**VARIANTS[variant]).eval()
    run = lambda: model.sample(labels=torch.tensor([1, 2]), seed=0,
                               settings=SamplingConfig(cfg=2.0, cfg_schedule="linear", num_iter=(3, 2, 2)))
    eager = run()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = model.compile_sampling(backend="aot_eager", fullgraph=True)
    assert compiled is model
    assert torch.equal(run(), eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # a generator level's step and the pixel step
    model.compile_sampling(enabled=False)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch.equal(run(), eager) and torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_mar_schedule_generates_every_patch_exactly_once():
    model = tiny().eval()
    level0 = model.levels[0]
    counts = []

    def fake_next_level(conds, cfg, known, uniforms):
        counts.append(conds[0].shape[0])
        return torch.full((conds[0].shape[0], 3, 4, 4), len(counts), dtype=torch.uint8)

    ctx = SampleContext(SamplingConfig(num_iter=(5,)), torch.Generator().manual_seed(0))
    out = level0.sample([torch.randn(2, 32)] * 5, 1.0, ctx, fake_next_level)
    # every patch was written by exactly one step (its value = step index >= 1)
    assert (out > 0).all()
    per_step = [c // 2 for c in counts]
    expected, masked = [], 16
    for step in range(5):
        nxt = max(1, min(masked - 1, math.floor(16 * math.cos(math.pi / 2 * (step + 1) / 5))))  # the cosine schedule, clamped
        expected.append(masked - nxt if step < 4 else masked)
        masked = nxt
    assert per_step == expected and sum(per_step) == 16


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("guiding_pixel", [False, True])
@pytest.mark.parametrize("queries", [[[0], [6]], [[0, 15], [5, 6]], [[0, 3, 5, 9, 10, 12, 14, 15], [1] * 8]],
                         ids=["one-keys-and-values-absorbed", "few-last-block-at-queries", "many-full-last-block"])
def test_mar_conditions_at_queried_patches_equal_the_full_pass(depth, guiding_pixel, queries):
    """Sampling asks for the five conditions of a few patches (corners included) from the blocks'
    input tokens; they must equal the full pass's at those patches."""
    from fractalgen.decode import gather_encoder

    cfg = FractalConfig((16, 4, 1), (32, 16, 16), (depth, 1, 1), (2, 2, 2), ("mar", "mar", "ar"),
                        guiding_pixel=guiding_pixel, guide_width=16, guide_depth=1, guide_heads=2)
    torch.manual_seed(0)
    level = FractalGen(cfg).eval().levels[0]
    patches = patchify(images_for(FractalGen(cfg), 2), 4)
    mask = torch.rand(2, 16) < 0.5
    conds = [torch.randn(2, 32) for _ in range(5)] + ([torch.randn(2, 3)] if guiding_pixel else [])
    query = torch.tensor(queries)
    with torch.no_grad():
        full = level.conditions(patches, mask, conds)
        tokens = torch.cat([level.prefix_tokens(conds), level.patch_tokens(patches, mask)], 1)
        some = level.query_conditions(tokens, None, query, [gather_encoder(block) for block in level.blocks])
    for f, s in zip(full, some, strict=True):
        torch.testing.assert_close(s, f.gather(1, query.unsqueeze(-1).expand(-1, -1, f.shape[-1])))


def test_mar_levels_compute_the_conditions_their_next_level_reads():
    """A MAR level above a MAR level hands down all five conditions, the lowest one (above the
    pixel transformer) the middle one only; fewer asked for equal the first of the full pass,
    also from tokens kept up to date by ``reveal`` instead of re-embedded."""
    from fractalgen.decode import gather_encoder, layer_norm

    cfg = FractalConfig((16, 4, 1), (32, 16, 16), (1, 1, 1), (2, 2, 2), ("mar", "mar", "ar"))
    torch.manual_seed(0)
    model = FractalGen(cfg).eval()
    assert [level.child_conds for level in model.levels] == [5, 1]
    level = model.levels[0]
    patches = patchify(images_for(model, 2), 4)
    mask, conds, query = torch.rand(2, 16) < 0.5, [torch.randn(2, 32) for _ in range(5)], torch.tensor([[0, 3], [5, 6]])
    weights = [gather_encoder(block) for block in level.blocks]
    with torch.no_grad():
        full = level.conditions(patches, mask, conds)
        # tokens of an all-hidden canvas, then the visible patches revealed
        prefix = level.prefix_tokens(conds)
        tokens = torch.cat([prefix, level.patch_tokens(torch.zeros_like(patches), torch.ones_like(mask))], 1)
        normed = layer_norm(tokens, level.blocks[0].norm1)
        visible = torch.stack([(~m).nonzero().squeeze(1)[:5] for m in mask])
        level.reveal(tokens, normed, patches, visible)
        hidden = torch.ones_like(mask).scatter(1, visible, False)
        expected = level.conditions(patches, hidden, conds)
        first = level.query_conditions(tokens, normed, query, weights, count=1)
    assert len(first) == 1 and len(full) == 5
    torch.testing.assert_close(first[0], expected[0].gather(1, query.unsqueeze(-1).expand(-1, -1, expected[0].shape[-1])))


def test_ranked_patches_with_different_counts_per_image():
    from fractalgen.levels import _ranked_patches
    order = torch.stack([torch.randperm(10, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    first, end = [2, 0, 9], [5, 1, 10]
    picks, real = _ranked_patches(order, first, end)
    assert picks.shape == (3, 3) and real.tolist() == [[True] * 3, [True, False, False], [True, False, False]]
    for i in range(3):
        assert picks[i][real[i]].tolist() == sorted(order[i, first[i]:end[i]].tolist())
    assert ((picks >= 0) & (picks < 10)).all()
    same, none = _ranked_patches(order, [4] * 3, [7] * 3)
    assert none is None and torch.equal(same, order[:, 4:7].sort(-1).values)


def sample_logits(logits, cfg, settings, generator):
    """One draw per row (per [cond; uncond] pair when guided) from logits, as the pixel step draws."""
    from fractalgen.sampling import draw, guided_probs
    probs = guided_probs(logits, cfg, settings)
    return draw(probs, torch.rand(probs.shape[0], 1, generator=generator))


def test_temperature_modes():
    """Official temperature multiplies logits; the true temperature divides."""
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    cold = sample_logits(logits, 1.0, SamplingConfig(temperature=0.25), g)
    official = sample_logits(logits, 1.0, SamplingConfig(temperature=4.0, official_temperature=True), g)
    expected = torch.softmax(torch.tensor([0.0, 4.0, 8.0]), -1)[2].item()
    for drawn in (cold, official):
        assert abs((drawn == 2).float().mean().item() - expected) < 0.01


def test_guidance_filter_blocks_values_the_conditional_finds_unlikely():
    cond = torch.tensor([[10.0, 0.0, -5.0]])     # value 2: conditional probability ~3e-7
    uncond = torch.tensor([[10.0, 0.0, -40.0]])  # ... but far less likely unconditionally
    logits = torch.cat([cond.repeat(1000, 1), uncond.repeat(1000, 1)])
    g = torch.Generator().manual_seed(0)
    unfiltered = sample_logits(logits, 3.0, SamplingConfig(cfg=3.0, filter_threshold=0.0), g)
    filtered = sample_logits(logits, 3.0, SamplingConfig(cfg=3.0, filter_threshold=1e-4), g)
    assert (unfiltered == 2).all()  # guidance alone picks the value the conditional model rules out
    assert (filtered == 0).float().mean() > 0.99


@pytest.mark.parametrize("threshold", [1e-4, 1e-3])
def test_guidance_filter_selects_by_arithmetic_exactly(threshold):
    """The filter, selected by arithmetic, gives exactly the probabilities of its boolean-mask
    form (the official code's), also for values near the threshold and rows with none below it."""
    from fractalgen.sampling import guided_probs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 256, generator=g) * 4
    cond, uncond = logits.chunk(2)
    cond[0] = 0.0  # uniform: nothing below the threshold
    cond[1, :2] = math.log(threshold) + torch.logsumexp(cond[1], 0)  # near the threshold
    low = torch.softmax(cond, dim=-1) < threshold
    shift = uncond.amax(-1, keepdim=True) - cond.amax(-1, keepdim=True)
    filtered = torch.where(low, torch.maximum(uncond, cond + shift), uncond)
    assert low.any() and not low.all()
    probs = guided_probs(logits, 3.0, SamplingConfig(cfg=3.0, filter_threshold=threshold))
    assert torch.equal(probs, torch.softmax(torch.lerp(filtered, cond, 3.0), dim=-1))  # guidance as one lerp
    torch.testing.assert_close(probs, torch.softmax(filtered + 3.0 * (cond - filtered), dim=-1))  # the official form


# ------------------------------------------------------------------------------------------------
# Persistence
# ------------------------------------------------------------------------------------------------

def test_save_and_load_pretrained_roundtrip(tmp_path):
    model = tiny(**VARIANTS["mar4-gp-rgba"]).eval()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "m").eval()
    images = images_for(model, 2)
    mask = lambda level, n, L, device: torch.ones(n, L, dtype=torch.bool)
    assert torch.equal(model(images, mask_fn=mask).per_image, loaded(images, mask_fn=mask).per_image)


def test_mismatching_checkpoint_is_named(tmp_path):
    tiny().save_pretrained(tmp_path / "m")
    cfg = FractalConfig.load(tmp_path / "m" / "config.json")
    cfg.embed_dim_list = (64,) + cfg.embed_dim_list[1:]
    cfg.save(tmp_path / "m" / "config.json")
    with pytest.raises(CheckpointError, match="does not match the model config.*shape mismatches"):
        load_model(tmp_path / "m")


def test_corrupt_files_and_missing_paths(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "bad.pth", preset="fractalar_in64")
    with pytest.raises(CheckpointError, match="neither a model folder"):
        load_model(tmp_path / "nowhere")


def test_checkpoint_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"model": {}, "args": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_model(tmp_path / "evil.pth", preset="fractalar_in64")


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def test_bad_inputs_give_one_line_errors():
    model = tiny().eval()
    with pytest.raises(InputError, match=r"do not fit this model, which takes \(3, 16, 16\)"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(InputError, match="integer pixels"):
        model(torch.zeros(1, 3, 16, 16))
    with pytest.raises(InputError, match="class id 10 is out of range"):
        model.sample(labels=torch.tensor([10]))
    with pytest.raises(InputError, match="class id -1"):
        model(images_for(model, 1), torch.tensor([-1]))
    with pytest.raises(SamplingError, match="needs class labels"):
        model.sample(num_images=1, settings=SamplingConfig(cfg=2.0))
    with pytest.raises(InputError, match="unconditional"):
        tiny(class_num=0).sample(labels=torch.tensor([0]))
    with pytest.raises(SamplingError, match="cfg_schedule"):
        SamplingConfig(cfg_schedule="cosine")


def test_device_and_dtype_come_from_the_caller():
    model = tiny().to(dtype=torch.float64).eval()
    out = model(images_for(model, 2))
    assert torch.isfinite(out.loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = tiny().eval().sample(labels=torch.tensor([0]), settings=SamplingConfig(num_iter=(2, 2)), seed=0)
    assert images.dtype == torch.uint8
