"""int8 CPU inference: the quantised layers are the ones that run (sampler and likelihood alike),
the likelihood barely moves, and a quantised model is never saved."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from torch.ao.nn.quantized import dynamic as nnqd

from fractalgen import FractalConfig, FractalGen, load_model
from fractalgen.errors import InputError
from fractalgen.layers import LlamaBlock, ViTBlock
from fractalgen.quantize import quantize_int8

from test_codec import fashion_mnist_test
from test_sampling import tiny_ar


def int8_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(m, nnqd.Linear) for m in model.modules())


@pytest.mark.parametrize("kinds", [("ar", "ar", "ar"), ("mar", "mar", "ar")])
def test_every_block_linear_is_quantised_and_the_original_is_untouched(kinds):
    cfg = FractalConfig((8, 4, 1), (32, 16, 16), (1, 1, 1), (2, 2, 2), kinds, channels=3, class_num=10)
    model = FractalGen(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize_int8(model, min_weights=0)
    per_block = {"ar": 5, "mar": 4}  # qkv, proj and the MLP's linears (SwiGLU has three)
    expected = sum(per_block[k] for k in kinds[:2]) + 4  # + the pixel transformer's ViT block
    assert int8_layers(quantized) == expected
    assert int8_layers(model) == 0 and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert int8_layers(quantize_int8(model)) == 0  # the default skips layers this small


def test_first_block_of_each_stack_stays_float():
    """The first block of a stack of several feeds all the others: it keeps float32 weights; the rest,
    and a stack's only block, are quantised."""
    cfg = FractalConfig((8, 4, 1), (32, 16, 16), (3, 2, 1), (2, 2, 2), ("ar", "ar", "ar"), channels=3, class_num=10)
    quantized = quantize_int8(FractalGen(cfg).eval(), min_weights=0)
    stacks = [m for m in quantized.modules() if isinstance(m, torch.nn.ModuleList) and len(m) and
              all(isinstance(b, (LlamaBlock, ViTBlock)) for b in m)]
    assert [len(stack) for stack in stacks] == [3, 2, 1]
    for stack in stacks:
        counts = [int8_layers(block) for block in stack]
        assert all(n > 0 for n in counts[1:]) and (counts[0] == 0) == (len(stack) > 1)


def test_sampler_runs_every_int8_layer_and_agrees_with_the_int8_likelihood(monkeypatch):
    """Decoding calls the int8 layers (not float weights kept aside), and what the sampler
    accumulates matches the int8 likelihood of its images up to rounding: inputs are quantised per
    call, so one-token steps and whole sequences round slightly differently."""
    quantized = quantize_int8(tiny_ar(), min_weights=0)
    calls = collections.Counter()
    forward = nnqd.Linear.forward

    def counted(self, x):
        calls[id(self)] += 1
        return forward(self, x)

    monkeypatch.setattr(nnqd.Linear, "forward", counted)
    labels = torch.arange(4)
    images, logp = quantized.sample(labels=labels, seed=0, return_logprob=True)
    assert set(calls) == {id(m) for m in quantized.modules() if isinstance(m, nnqd.Linear)}
    bpd, _ = quantized.nll(images, labels)
    sampled = -logp / (images[0].numel() * math.log(2))
    assert (sampled - bpd.double()).abs().max() < 0.01


def test_quantised_model_is_not_saved(tmp_path):
    model = quantize_int8(tiny_ar(), min_weights=0)
    with pytest.raises(InputError, match="int8-quantised model cannot be saved"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


def test_shipped_model_likelihood_moves_by_less_than_a_hundredth_of_a_bit():
    images, _ = fashion_mnist_test(64)
    model = load_model()
    fp32, _ = model.nll(images)
    int8, _ = quantize_int8(model).nll(images)
    assert int8_layers(quantize_int8(model)) > 0
    assert abs(int8.mean() - fp32.mean()) < 0.01


def test_mar_sampler_runs_every_int8_layer(monkeypatch):
    """MAR passes compute only the outputs they need; with an int8 qkv they still run (all outputs)."""
    cfg = FractalConfig((8, 4, 1), (32, 16, 16), (2, 1, 1), (2, 2, 2), ("mar", "mar", "ar"), channels=3, class_num=10)
    torch.manual_seed(0)
    quantized = quantize_int8(FractalGen(cfg).eval(), min_weights=0)
    called = set()
    forward = nnqd.Linear.forward
    monkeypatch.setattr(nnqd.Linear, "forward", lambda self, x: called.add(id(self)) or forward(self, x))
    images = quantized.sample(labels=torch.arange(3), seed=0)
    assert images.shape == (3, 3, 8, 8)
    assert called == {id(m) for m in quantized.modules() if isinstance(m, nnqd.Linear)}
