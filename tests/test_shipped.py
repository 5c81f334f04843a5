"""The models shipped with the package: each scores a fixed Fashion-MNIST test subset at the value
measured when it was shipped, and samples images of the class it is asked for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fractalgen import load_model
from fractalgen.checkpoint import SHIPPED_MODELS
from fractalgen.data import FASHION_MNIST_ROOT, FashionMNIST
from fractalgen.evaluate import evaluate_nll

# Bits/dim of the first 200 test images (null condition), measured when each model was shipped.
PINNED = {"fmnist-ar": 2.741149}


def test_every_shipped_model_has_a_pinned_value():
    assert set(PINNED) == set(SHIPPED_MODELS)


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="needs Fashion-MNIST: apt-get install -y dataset-fashion-mnist")
@pytest.mark.parametrize("name", list(SHIPPED_MODELS))
def test_shipped_model_scores_the_test_subset_at_its_pinned_value(name):
    """Any change to the likelihood path (or the weights) that moves the figure shows up here."""
    model = load_model(name)
    result = evaluate_nll(model, FashionMNIST("test"), batch_size=100, limit=200, progress=False)
    assert result.num_images == 200
    assert result.bits_per_dim == pytest.approx(PINNED[name], abs=2e-3)


@pytest.mark.parametrize("name", list(SHIPPED_MODELS))
def test_shipped_model_samples_the_class_it_is_asked_for(name):
    """Two samples of every class; the model itself finds most of them likeliest under the label they
    were drawn for. A sampler that ignored its label would get about one in ten."""
    model = load_model(name).eval()
    labels = torch.arange(model.config.class_num).repeat(2)
    images = model.sample(labels=labels, seed=0)
    assert images.shape == (len(labels), 1, 28, 28) and images.dtype == torch.uint8
    bits = torch.stack([model.nll(images, torch.full_like(labels, c))[0] for c in range(model.config.class_num)], 1)
    assert (bits.argmin(1) == labels).float().mean() >= 0.8
