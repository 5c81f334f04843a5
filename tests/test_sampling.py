"""The sampler against the likelihood: what it accumulates while drawing must be what the
teacher-forced model assigns to the images it returns. A sampler that ignores its context,
feeds tokens at the wrong positions or mixes up channels breaks that equality."""

from __future__ import annotations

import math
import os
import subprocess
import time

import pytest
import torch

import fractalgen.model
from fractalgen import FractalConfig, FractalGen, SamplingConfig, get_preset
from fractalgen import levels
from fractalgen.checkpoint import shipped_model_folder
from fractalgen.errors import InputError
from fractalgen.model import threads_for_sampling
from fractalgen.pixel import PixelHead
from fractalgen.runtime import busy_cores, intra_op_threads

AR_VARIANTS = {
    "rgb": dict(),
    "grey": dict(channels=1),
    "unconditional": dict(class_num=0),
    "four-levels": dict(sizes=(16, 4, 2, 1)),
    "deep-pixel-head": dict(depths=(1, 2, 2)),
}


def tiny_ar(sizes=(8, 4, 1), channels=3, class_num=10, depths=None, **kw) -> FractalGen:
    """A small AR stack whose pixel logits are far from uniform (so wrong contexts show)."""
    n = len(sizes)
    cfg = FractalConfig(sizes, (32, 16, 16, 16)[:n], depths or (1,) * n, (2,) * n, ("ar",) * n,
                        channels=channels, class_num=class_num, num_conds=1, **kw)
    torch.manual_seed(0)
    model = FractalGen(cfg).eval()
    with torch.no_grad():
        model.pixel.codebook.mul_(8)  # sharper logits: values depend strongly on the context
    return model


def sampled_and_scored(model: FractalGen, n: int = 3, seed: int = 0,
                       graphs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(bits/dim accumulated by the sampler, bits/dim of the teacher-forced likelihood) per image."""
    labels = torch.arange(n) % model.config.class_num if model.config.conditional else None
    images, logp = model.sample(labels=labels, num_images=None if labels is not None else n, seed=seed,
                                return_logprob=True, graphs=graphs)
    dims = images[0].numel()
    bpd, _ = model.nll(images, labels)
    return -logp / (dims * math.log(2)), bpd.double()


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("variant", list(AR_VARIANTS))
def test_sampler_logprob_equals_likelihood_of_its_images(variant, graphs):
    """AR stacks, cfg 1, temperature 1: the sampler's log-probability is the exact likelihood,
    with eager steps and with the static steps that CUDA graphs replay."""
    sampled, scored = sampled_and_scored(tiny_ar(**AR_VARIANTS[variant]), graphs=graphs)
    torch.testing.assert_close(sampled, scored, atol=1e-4, rtol=0)


def test_a_model_in_training_mode_samples_in_eval_mode():
    """Sampling uses no training-time randomness: a model in training mode that would drop every
    label (label_drop_prob 1) and much of its activations (dropout 0.5) samples each image under
    its own class (the sampler's log-probability, in nats, is the conditional likelihood of the
    image, not the null condition's) and is left in training mode."""
    model = tiny_ar(label_drop_prob=1.0, attn_dropout=0.5, proj_dropout=0.5).train()
    with torch.no_grad():
        model.class_emb.weight.mul_(10)  # labels that matter: a dropped one shows in every image
    labels = torch.tensor([0, 3, 7, 7, 9, 1])
    images, logp = model.sample(labels=labels, seed=0, return_logprob=True, settings=SamplingConfig(filter_threshold=0))
    assert model.training and all(module.training for module in model.modules())
    nats = images[0].numel() * math.log(2)  # bits/dim -> nats per image
    conditional = -model.nll(images, labels)[0].double() * nats
    unconditional = -model.nll(images)[0].double() * nats
    tolerance = 1e-4 * nats  # 1e-4 bits/dim, as above
    torch.testing.assert_close(logp, conditional, atol=tolerance, rtol=0)
    assert ((conditional - unconditional).abs() > 10 * tolerance).all()  # a dropped label would show


def _column_major(patches):
    """unpatchify that lays the patches out column by column (a wrong token order)."""
    n, l, c, p, _ = patches.shape
    g = math.isqrt(l)
    return _plain_unpatchify(patches.view(n, g, g, c, p, p).transpose(1, 2).reshape(n, l, c, p, p))


def _context_free_pixels(self, decoder, token, channel):
    """A pixel decode that ignores the channels already drawn (feeds zeros in their place)."""
    return _plain_pixel_decode(self, decoder, token if channel == 0 else torch.zeros_like(token), channel)


_plain_unpatchify = levels.unpatchify
_plain_pixel_decode = PixelHead.decode


@pytest.mark.parametrize("broken", ["token order", "pixel context"])
def test_logprob_check_catches_a_wrong_sampler(monkeypatch, broken):
    """The check above fails for a sampler that writes its patches in another order than it
    generated them, or whose pixel transformer ignores the channels already drawn."""
    model = tiny_ar()
    if broken == "token order":
        monkeypatch.setattr(levels, "unpatchify", _column_major)
    else:
        monkeypatch.setattr(PixelHead, "decode", _context_free_pixels)
    sampled, scored = sampled_and_scored(model)
    assert (sampled - scored).abs().max() > 1e-3  # the check's tolerance is 1e-4


def test_forced_sampling_reproduces_the_images_and_their_probabilities():
    """targets=images runs the sampler on given images: it returns them, with the log-probability
    the sampler assigned when it drew them, and ``choose`` sees each target with its probabilities."""
    model = tiny_ar()
    labels = torch.tensor([3, 4])
    images, logp = model.sample(labels=labels, seed=1, return_logprob=True)
    seen = []

    def choose(probs, targets):
        seen.append(probs.gather(1, targets.unsqueeze(1)).log().sum())
        return targets

    again, logp_again = model.sample(labels=labels, targets=images, choose=choose, return_logprob=True)
    assert torch.equal(again, images)
    torch.testing.assert_close(logp_again, logp, atol=1e-6, rtol=0)
    assert len(seen) == images[0].numel()  # one call per sub-pixel of an image (rows = images)
    torch.testing.assert_close(torch.stack(seen).sum().double(), logp.sum(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("types", [("ar", "ar", "ar"), ("mar", "mar", "ar")])
def test_a_chooser_decodes_what_the_encoder_forced(types):
    """Encoder (targets + choose that records) and decoder (choose that replays) see the same
    probabilities in the same order, for AR and for MAR stacks (same seed: same MAR order)."""
    cfg = FractalConfig((8, 4, 1), (32, 16, 16), (1, 1, 1), (2, 2, 2), types, channels=3, class_num=10,
                        num_conds=1 if types[0] == "ar" else 5)
    torch.manual_seed(0)
    model = FractalGen(cfg).eval()
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([1, 2])
    settings = SamplingConfig(num_iter=(3, 2))
    recorded = []

    def encode(probs, targets):
        recorded.append((probs.clone(), targets.clone()))
        return targets

    model.sample(labels=labels, targets=images, choose=encode, settings=settings, seed=5)
    replay = iter(recorded)

    def decode(probs, targets):
        assert targets is None
        want_probs, values = next(replay)
        assert torch.equal(probs, want_probs)
        return values

    decoded = model.sample(labels=labels, choose=decode, settings=settings, seed=5)
    assert torch.equal(decoded, images)
    assert next(replay, None) is None


def test_threads_follow_the_work_and_the_busy_cores():
    """One thread for step-bound sampling (a few images of the shipped AR model, its edits),
    torch's count less the busy cores for larger products (the main job's 80 images, MAR passes
    over every patch, the ImageNet MAR models); never fewer for more rows, never below one."""
    shipped = [FractalConfig.load(shipped_model_folder(name) / "config.json") for name in ("fmnist-ar", "fmnist-mar")]
    official = SamplingConfig.official("fractalmar_in64")
    with intra_op_threads(4):
        assert threads_for_sampling(shipped[0], 24, SamplingConfig()) == 1
        assert [threads_for_sampling(shipped[0], 80, SamplingConfig(), lambda: busy) for busy in (0, 1, 3, 9)] == [4, 3, 1, 1]
        assert threads_for_sampling(shipped[1], 80, SamplingConfig()) == 4
        assert threads_for_sampling(shipped[0], 2, SamplingConfig(cfg=3.0)) == 1
        assert threads_for_sampling(shipped[1], 2, SamplingConfig(cfg=3.0)) == 4  # 1.2x faster on two of two cores
        assert threads_for_sampling(get_preset("fractalmar_in64"), 16, official) == 4
        assert threads_for_sampling(get_preset("fractalmar_huge_in256"), 2, SamplingConfig(cfg=4.0), lambda: 2) == 2
        for config in (*shipped, get_preset("fractalar_in64")):
            choices = [threads_for_sampling(config, rows, SamplingConfig()) for rows in (1, 10, 100, 1000, 10_000)]
            assert choices == sorted(choices) and choices[-1] == 4, choices


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_busy_cores_sees_another_program():
    """A program that keeps a core busy counts."""
    hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.2)
        assert busy_cores() >= 1
    finally:
        hog.kill()
        hog.wait()


def test_sample_leaves_the_busy_cores_to_their_programs(monkeypatch):
    """Where threads pay, a sample call runs on torch's count less the cores busy elsewhere."""
    monkeypatch.setattr(fractalgen.model, "THREADED_BLOCK_WORK", 0)  # any work pays
    model, seen = tiny_ar(), []
    for busy, want in ((0, 3), (1, 2), (5, 1)):
        monkeypatch.setattr(fractalgen.model, "busy_cores", lambda: busy)
        seen.clear()
        with intra_op_threads(3):
            model.sample(labels=torch.tensor([1, 2]), seed=0, on_step=lambda *_: seen.append(torch.get_num_threads()))
        assert set(seen) == {want}, busy


def test_sample_runs_on_its_threads_and_restores_the_callers():
    """The count chosen (by the work, by the model's setting or by the call) holds while sampling,
    also when sampling fails; the caller's count comes back. Bad counts are named."""
    model = tiny_ar()
    seen = []

    def record(step: int, total: int, images: torch.Tensor) -> None:
        seen.append(torch.get_num_threads())

    with intra_op_threads(3):
        model.sample(labels=torch.tensor([1, 2]), seed=0, on_step=record)
        assert set(seen) == {1} and torch.get_num_threads() == 3
        model.sampling_threads = 2
        seen.clear()
        model.sample(labels=torch.tensor([1, 2]), seed=0, on_step=record)
        assert set(seen) == {2}
        seen.clear()
        model.sample(labels=torch.tensor([1, 2]), seed=0, on_step=record, threads=1)
        assert set(seen) == {1} and torch.get_num_threads() == 3

        def fail(step: int, total: int, images: torch.Tensor) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            model.sample(labels=torch.tensor([1]), seed=0, on_step=fail)
        assert torch.get_num_threads() == 3
        for bad in (0, 1.5, True):
            with pytest.raises(InputError, match="threads must be an integer >= 1"):
                model.sample(labels=torch.tensor([1]), threads=bad)
