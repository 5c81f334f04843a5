"""The CUDA path, on a GPU (every test is marked ``cuda`` and skipped without one;
benchmarks/gpu_check.sh runs them): parity in float32, the sampler's log-probability against the
likelihood with eager, graphed and compiled graphed steps, large batches past the fused attention
kernels' grid limit, the official presets, editing, the codec commands and a resumed NCCL
training run."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fractalgen import FractalGen, SamplingConfig, get_preset, load_model
from fractalgen.checkpoint import load_official
from fractalgen.edit import inpaint

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[1]
PARITY = Path(__file__).resolve().parent / "fixtures" / "parity"
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
CUDA = torch.device("cuda")


def fractalgen_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "fractalgen", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("folder", sorted(p for p in PARITY.iterdir() if (p / "checkpoint.pth").is_file()),
                         ids=lambda p: p.name)
@torch.no_grad()
def test_parity_fixtures_in_float32(folder):
    """The recorded bits/dim of the official code, computed on CUDA (1e-5, as on CPU)."""
    model = load_official(folder / "checkpoint.pth").eval().to(CUDA)
    data = load_file(str(folder / "data.safetensors"))
    images = data["images_uint8"].to(CUDA)
    for key in ("nll_bits_per_dim", "nll_all_masked_bits_per_dim"):
        if key not in data:
            continue
        mask_fn = None
        if key != "nll_bits_per_dim":
            mask_fn = lambda level, n, seq_len, device: torch.ones(n, seq_len, dtype=torch.bool, device=device)  # noqa: E731
        got = model(images, mask_fn=mask_fn).bits_per_dim.cpu().double()
        assert (got - data[key].double()).abs().max() <= 1e-5, key


def tiny_ar() -> FractalGen:
    from fractalgen import FractalConfig
    cfg = FractalConfig((8, 4, 1), (32, 16, 16), (1, 1, 1), (2, 2, 2), ("ar", "ar", "ar"), channels=3,
                        class_num=10, num_conds=1)
    torch.manual_seed(0)
    model = FractalGen(cfg).eval().to(CUDA)
    with torch.no_grad():
        model.pixel.codebook.mul_(8)
    return model


@pytest.mark.parametrize("graphs,compiled", [(False, False), (True, False), (True, True)],
                         ids=["eager", "graphed", "compiled-graphed"])
def test_sampler_logprob_equals_likelihood(graphs, compiled):
    """Also with inductor's fused steps captured in the graphs (no capture may fall back to eager)."""
    model = tiny_ar()
    if compiled:
        model.compile_sampling()
    labels = torch.arange(6, device=CUDA) % 10
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="sampling step", category=RuntimeWarning)  # a failed capture
        for _ in range(2 if compiled else 1):  # the second call replays what the first compiled and captured
            images, logp = model.sample(labels=labels, seed=0, return_logprob=True, graphs=graphs)
    bpd, _ = model.nll(images, labels)
    sampled = -logp / (images[0].numel() * math.log(2))
    torch.testing.assert_close(sampled.cpu(), bpd.double().cpu(), atol=1e-4, rtol=0)


def test_graphed_steps_give_the_eager_images():
    model = tiny_ar()
    labels = torch.arange(6, device=CUDA) % 10
    settings = SamplingConfig(cfg=3.0, cfg_schedule="linear", temperature=1.1)
    eager = model.sample(labels=labels, settings=settings, seed=1, graphs=False)
    graphed = model.sample(labels=labels, settings=settings, seed=1, graphs=True)
    again = model.sample(labels=labels, settings=settings, seed=1, graphs=True)  # replayed, not captured
    assert torch.equal(graphed, again)
    assert (graphed == eager).float().mean() > 0.99  # equal up to the kernels' rounding


@pytest.fixture(scope="module")
def shipped():
    return load_model("fmnist-ar", device="cuda")


def test_bfloat16_likelihood_of_a_large_batch(shipped):
    """256 images: the pixel level attends over 200,704 rows, past the fused kernels' grid limit."""
    images = torch.randint(0, 256, (256, 1, 28, 28), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8).to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half, _ = shipped.nll(images)
    full, _ = shipped.nll(images)
    assert torch.isfinite(half).all()
    assert (half - full).abs().max() < 0.05


def test_thousand_shipped_samples_follow_their_labels(shipped):
    labels = torch.arange(1000, device=CUDA) % 10
    images, logp = shipped.sample(labels=labels, seed=0, return_logprob=True)
    assert images.shape == (1000, 1, 28, 28) and images.dtype == torch.uint8
    bpd, _ = shipped.nll(images[:100], labels[:100])
    torch.testing.assert_close((-logp[:100] / (784 * math.log(2))).cpu(), bpd.double().cpu(), atol=1e-3, rtol=0)
    means = images.float().view(10, 100, -1).mean(1)  # per class: mean images differ between classes
    assert torch.cdist(means, means).fill_diagonal_(1e9).min() > 1.0


@pytest.mark.parametrize("preset,num_iter", [("fractalmar_huge_in256", (1, 1, 1)), ("fractalar_in64", ())])
def test_official_presets_sample_in_bfloat16(preset, num_iter):
    torch.manual_seed(0)
    with torch.device(CUDA):
        model = FractalGen(get_preset(preset)).eval()
    settings = SamplingConfig.official(preset, **({"num_iter": num_iter} if num_iter else {}))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        images = model.sample(labels=torch.tensor([1, 2], device=CUDA), settings=settings, seed=0)
    size = model.config.image_size
    assert images.shape == (2, 3, size, size) and images.float().std() > 0


def test_inpaint_keeps_the_known_pixels(shipped):
    images = torch.randint(0, 256, (4, 1, 28, 28), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8).to(CUDA)
    mask = torch.zeros(4, 1, 28, 28, dtype=torch.bool, device=CUDA)
    mask[:, :, 10:20, 5:25] = True
    out = inpaint(shipped, images, mask, labels=torch.tensor([0, 1, 2, 3], device=CUDA), seed=0)
    assert torch.equal(out[~mask.expand_as(out)], images[~mask.expand_as(images)])
    assert not torch.equal(out[mask], images[mask])


def test_compress_and_decompress_on_cuda(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((rng.integers(0, 4, (28, 28)) * 60).astype(np.uint8), "L").save(folder / f"{i}.png")
    fractalgen_cli("compress", str(folder), "--out", str(tmp_path / "x.fgz"), "--model", "fmnist-ar",
                   "--device", "cuda")
    fractalgen_cli("decompress", str(tmp_path / "x.fgz"), "--out", str(tmp_path / "back"), "--model", "fmnist-ar",
                   "--device", "cuda")
    for i in range(3):
        original = np.asarray(Image.open(folder / f"{i}.png"))
        restored = np.asarray(Image.open(next((tmp_path / "back").glob(f"{i}*.png"))))
        assert np.array_equal(original, restored)


def test_nccl_training_resumes(tmp_path):
    from fractalgen import FractalConfig
    cfg = FractalConfig((8, 2, 1), (16, 16, 16), (1, 1, 1), (2, 2, 2), ("ar", "ar", "ar"), channels=1,
                        class_num=2, num_conds=1)
    cfg.save(tmp_path / "tiny.json")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", images=(rng.integers(0, 4, (32, 8, 8)) * 60).astype(np.uint8),
             labels=rng.integers(0, 2, 32))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "fractalgen"]

    def train(steps: int, *extra: str) -> subprocess.CompletedProcess:
        args = ["train", "--model", str(tmp_path / "tiny.json"), "--data", str(tmp_path / "data.npz"),
                "--out", str(tmp_path / "run"), "--steps", str(steps), "--batch-size", "8", "--eval-images", "0",
                "--save-every", "1", "--device", "cuda", *extra]
        proc = subprocess.run([*torchrun, *args], capture_output=True, text=True, env=ENV, timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc

    first = train(3, "--resume", "auto")  # the preemptible-job command: starts, then continues
    assert "starting a new run" in first.stdout
    assert (tmp_path / "run" / "latest").read_text().strip().endswith("3")
    resumed = train(5, "--resume")  # more steps: plain --resume continues with changed options
    assert "resuming from step 3" in resumed.stdout
    assert (tmp_path / "run" / "latest").read_text().strip().endswith("5")
