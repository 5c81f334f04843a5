"""The sampler draws from the distribution the model defines: a frequency test on many draws.

The first sub-pixel of an image (the top-left pixel of a grey image) depends only on the class, so
20,000 images sampled through ``FractalGen.sample`` are 20,000 independent draws from one 256-way
distribution. Its logits come from the teacher-forced forward path (``ARLevel.conditions`` and
``PixelHead.logits``), not from the sampler, and the counts of all 256 values are compared with
softmax(logits / T) by a chi-square test.
"""

from __future__ import annotations

import pytest
import torch

from fractalgen import FractalConfig, FractalGen, SamplingConfig

DRAWS = 20_000
LABEL = 1
TEMPERATURE = 1.5
MIN_EXPECTED = 5  # the chi-square approximation needs this many expected draws in every bin


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed ``counts`` under ``probs`` (all bins, df = bins - 1), in float64."""
    expected = probs.double() * counts.sum()
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    df = torch.tensor((len(counts) - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(df, stat / 2).item()


@pytest.fixture(scope="module")
def model() -> FractalGen:
    """A 2x2 grey model (one AR level of single pixels) whose pixel logits are far from uniform."""
    cfg = FractalConfig((2, 1), (32, 16), (1, 1), (2, 2), ("ar", "ar"), channels=1, class_num=2, num_conds=1,
                        attn_dropout=0.0, proj_dropout=0.0)
    torch.manual_seed(0)
    model = FractalGen(cfg).eval()
    with torch.no_grad():
        model.pixel.codebook.mul_(6.0)        # logits h @ codebook^T with a std of about 1
        model.pixel.logit_bias[0, 0] = 2.0    # the end values carry clear mass, so a draw that
        model.pixel.logit_bias[0, 255] = 2.0  # drops or shifts them is caught
    return model


@pytest.fixture(scope="module")
def logits(model) -> torch.Tensor:
    """Teacher-forced logits (256,) of the first sub-pixel for class LABEL."""
    with torch.no_grad():
        cond = model.condition(torch.tensor([LABEL]), 1)
        patches = torch.zeros(1, 4, 1, 1, 1, dtype=torch.long)
        h = model.levels[0].conditions(patches, [cond])[0][:, 0]
        return model.pixel.logits(h, torch.zeros(1, 1, dtype=torch.long))[0, 0]


def first_subpixel_counts(model: FractalGen, settings: SamplingConfig) -> torch.Tensor:
    """How often each value 0..255 was drawn as the first sub-pixel of DRAWS sampled images."""
    images = model.sample(labels=torch.full((DRAWS,), LABEL), settings=settings, seed=0)
    return torch.bincount(images[:, 0, 0, 0].long(), minlength=256)


CASES = {  # settings, and the logit scale each must follow (the other convention's scale must be rejected)
    "temperature 1": (SamplingConfig(), 1.0, TEMPERATURE),
    "true temperature": (SamplingConfig(temperature=TEMPERATURE), 1 / TEMPERATURE, TEMPERATURE),
    "official temperature": (SamplingConfig(temperature=TEMPERATURE, official_temperature=True), TEMPERATURE,
                             1 / TEMPERATURE),
}


@pytest.mark.parametrize("name", list(CASES))
def test_first_subpixel_frequencies_match_softmax_of_its_logits(model, logits, name):
    settings, scale, wrong_scale = CASES[name]
    probs = torch.softmax(logits.double() * scale, -1)
    assert probs.min() * DRAWS >= MIN_EXPECTED and probs.max() < 0.2  # the test is valid and has power
    assert probs[0] * DRAWS > 100 and probs[255] * DRAWS > 100
    counts = first_subpixel_counts(model, settings)
    assert counts.sum() == DRAWS
    assert chi_square_p(counts, probs) > 1e-3, f"{name}: draws do not follow softmax(logits x {scale:.3g})"
    # The same draws against the other temperature convention (or a temperature left out) are rejected.
    wrong = torch.softmax(logits.double() * wrong_scale, -1)
    assert chi_square_p(counts, wrong) < 1e-9


def test_chi_square_p_value_is_calibrated():
    """The hand-made p-value: ~uniform under the null on multinomial draws, tiny for a shifted distribution."""
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(256, generator=generator), -1)
    p_values = torch.tensor([chi_square_p(torch.bincount(torch.multinomial(probs, DRAWS, True, generator=generator),
                                                         minlength=256), probs) for _ in range(200)])
    assert 0.4 < p_values.mean() < 0.6 and 0.05 < (p_values < 0.1).float().mean() < 0.16
    shifted = torch.bincount(torch.multinomial(probs.roll(1), DRAWS, True, generator=generator), minlength=256)
    assert chi_square_p(shifted, probs) < 1e-9
