"""Evaluation: bits/dim on a dataset, per-pixel bits heat maps, and FID / precision / recall of samples.

* ``evaluate_nll``: mean bits/dim over a dataset. Exact for AR stacks; for MAR stacks the official
  estimator (random order, uniform mask count) averaged over ``passes`` forward passes, an upper
  bound on the bits/dim in expectation. With guiding pixels the value includes their losses, as in
  the paper.
* ``bits_heatmap`` / ``heatmap_figure``: where in an image the bits go.
* ``evaluate_fid``: class-balanced samples (``num_samples // class_num`` per class, as the paper's
  50 per class for 50,000 samples) against reference statistics (a dataset, or an ADM reference
  batch ``.npz``); ``fid_between`` compares two image sets (e.g. real vs real, to calibrate).
* ``add_cli``: the ``fractalgen eval {nll,fid}`` commands.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from . import fid
from .data import BUILTINS, build_dataset, collate
from .errors import DataError, FIDError, InputError, SamplingError
from .levels import MARLevel
from .model import FractalGen
from .runtime import autocast, eval_mode, make_grid
from .sampling import SamplingConfig

PathLike = str | os.PathLike

#: Five stops of an 'inferno'-like perceptual ramp (black -> purple -> red -> orange -> pale yellow).
COLORMAP = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float64)
UNSEEN_GREY = 128  # heat-map colour of pixels no pass scored


def is_exact(model: FractalGen) -> bool:
    """True when the likelihood is exact: every generator level is AR (no random masks)."""
    return not any(isinstance(level, MARLevel) for level in model.levels)


def _rng_fork(device: torch.device):
    """Fork the global RNG (and the CUDA one on CUDA) so evaluation leaves it untouched."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


# ------------------------------------------------------------------------------------------------
# Bits/dim on a dataset
# ------------------------------------------------------------------------------------------------

@dataclass
class NLLResult:
    """Bits/dim of a dataset: exact for AR stacks, an estimate of an upper bound for MAR stacks.

    ``stderr`` is the standard error of the mean over images; MAR masks are drawn independently
    for every image, so it covers the mask noise too. ``estimator_stderr`` is the mean over images
    of the per-image standard error over passes (MAR with passes > 1; 0 otherwise)."""

    bits_per_dim: float
    stderr: float
    estimator_stderr: float
    num_images: int
    per_image: Tensor         # (N,) float64 bits/dim of every image
    per_image_stderr: Tensor  # (N,) float64 standard error over passes
    labels: Tensor            # (N,) dataset labels (-1 when unlabelled)
    exact: bool
    passes: int
    conditional: bool
    guiding_pixel: bool

    @property
    def kind(self) -> str:
        """What the number is: 'exact', or for MAR stacks 'upper bound estimate'."""
        return "exact" if self.exact else "upper bound estimate"

    def summary(self) -> str:
        """One line, e.g. ``2.961 ± 0.009 bits/dim (exact, 10000 images)`` or, for MAR stacks,
        ``≤ 3.214 ± 0.012 bits/dim (MAR estimate, upper bound in expectation, 4 passes, 10000 images)``."""
        parts = ["exact"] if self.exact else ["MAR estimate, upper bound in expectation",
                                              f"{self.passes} pass{'es' if self.passes > 1 else ''}"]
        parts.append(f"{self.num_images} images")
        if not self.exact and self.passes > 1:
            parts.append(f"per-image estimator ± {self.estimator_stderr:.3f}")
        if self.conditional:
            parts.append("class-conditional")
        if self.guiding_pixel:
            parts.append("incl. guiding pixels")
        bound = "" if self.exact else "≤ "
        return f"{bound}{self.bits_per_dim:.3f} ± {self.stderr:.3f} bits/dim ({', '.join(parts)})"

    def write_csv(self, path: PathLike) -> None:
        """One row per image: index, label, bits_per_dim, stderr, kind (exact / upper bound estimate)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "label", "bits_per_dim", "stderr", "kind"])
            for i, (label, bpd, err) in enumerate(zip(self.labels.tolist(), self.per_image.tolist(),
                                                      self.per_image_stderr.tolist())):
                writer.writerow([i, label, f"{bpd:.6f}", f"{err:.6f}", self.kind])


def _batches(dataset: Dataset, batch_size: int, limit: int | None) -> tuple[DataLoader, int]:
    """Batches of (images, labels) over the first ``limit`` items, in order, and their count."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return DataLoader(Subset(dataset, range(n)), batch_size=batch_size, collate_fn=collate), n


def _nll_labels(model: FractalGen, labels: Tensor, use_labels: bool) -> Tensor | None:
    """Dataset labels for class-conditional likelihood, or None for the null condition."""
    if not use_labels:
        return None
    if not model.config.conditional:
        raise InputError("the model is unconditional (class_num=0); drop labels=True / --conditional")
    if (labels < 0).any():
        raise DataError("the dataset has no class labels; drop labels=True / --conditional "
                        "(the unconditional likelihood needs none)")
    return labels.to(model.device)


@torch.no_grad()
def evaluate_nll(model: FractalGen, dataset: Dataset, batch_size: int = 64, passes: int = 1,
                 limit: int | None = None, dtype: str | torch.dtype = "float32", labels: bool = False,
                 progress: bool = True, seed: int = 0) -> NLLResult:
    """Bits/dim of the first ``limit`` images of ``dataset`` (all by default), on the model's device.

    Unconditional (null condition, as in the paper) unless ``labels=True``. MAR masks are drawn
    from the global RNG seeded with ``seed``; its state is restored afterwards, so the result is
    repeatable and the caller's random stream is untouched.
    """
    loader, n = _batches(dataset, batch_size, limit)
    exact = is_exact(model)
    device = model.device
    values, errors, all_labels = [], [], []
    with _rng_fork(device), tqdm(total=n, unit="img", desc="bits/dim", disable=not progress,
                                 dynamic_ncols=True) as bar:
        torch.manual_seed(seed)
        for images, batch_labels in loader:
            cond = _nll_labels(model, batch_labels, labels)
            with autocast(device, dtype):
                bpd, err = model.nll(images.to(device), cond, passes=passes)
            values.append(bpd.double().cpu())
            errors.append(err.double().cpu())
            all_labels.append(batch_labels)
            bar.update(len(images))
            bar.set_postfix(bpd=f"{torch.cat(values).mean().item():.4f}")
    per_image, per_err = torch.cat(values), torch.cat(errors)
    stderr = per_image.std().item() / math.sqrt(n) if n > 1 else 0.0
    return NLLResult(per_image.mean().item(), stderr, per_err.mean().item(), n, per_image, per_err,
                     torch.cat(all_labels), exact, 1 if exact else passes, labels,
                     model.config.guiding_pixel and not exact)


def build_eval_dataset(spec: str, split: str, model: FractalGen, resize: bool = False,
                       val_fraction: float = 0.0) -> Dataset:
    """The ``split`` of dataset ``spec`` (built-in name, folder, .npz/.npy; ``val_fraction`` as in
    training) at the model's size and channels.

    Array datasets (built-ins, .npz/.npy) whose images differ from the model's size or channel
    count are refused unless ``resize`` (centre crop / resize and convert, which changes what is
    measured). Image folders are always ADM-centre-cropped to the model's size (the ImageNet protocol).
    """
    cfg = model.config
    dataset = build_dataset(spec, split, cfg.image_size, cfg.channels, val_fraction=val_fraction)
    array = getattr(dataset, "images", None)
    if array is not None and not resize:
        h, w = array.shape[1:3]
        c = 1 if array.ndim == 3 else array.shape[3]
        if (h, w, c) != (cfg.image_size, cfg.image_size, cfg.channels):
            raise DataError(f"{spec} holds {h}x{w} images with {c} channel(s) but the model takes "
                            f"{cfg.image_size}x{cfg.image_size} with {cfg.channels}; use data at the model's "
                            "size, or pass --resize (resize=True) to centre-crop/resize and convert them")
    return dataset


# ------------------------------------------------------------------------------------------------
# Per-pixel bits
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def bits_heatmap(model: FractalGen, images: Tensor, labels: Tensor | None = None, passes: int = 4,
                 max_passes: int = 64, seed: int = 0) -> Tensor:
    """Bits per pixel (summed over channels) as float64 (B, H, W) on the model's device.

    AR stacks: one pass gives every pixel's exact conditional bits, and the map's mean divided by
    the channel count is the image's bits/dim. MAR stacks: a pass scores only the pixels it masks,
    so each pixel's value is its bits averaged over the passes that scored it; at least ``passes``
    passes run, continuing until every pixel was scored once or ``max_passes`` is reached (pixels
    never scored are NaN). MAR values are losses given a random partial context and, like the
    guiding-pixel losses (not in the map), do not add up to the bits/dim estimate.
    Masks come from the global RNG seeded with ``seed``; its state is restored afterwards.
    """
    if not 1 <= passes <= max_passes:
        raise InputError(f"need 1 <= passes <= max_passes, got passes={passes}, max_passes={max_passes}")
    model.check_images(images)
    images = images.to(model.device)
    labels = model.check_labels(labels, images.shape[0])
    b, size, channels = images.shape[0], model.config.image_size, model.config.channels
    total = torch.zeros(b, size, size, dtype=torch.float64, device=model.device)
    count = torch.zeros_like(total)
    with eval_mode(model), _rng_fork(model.device):
        torch.manual_seed(seed)
        for done in range(1, (1 if is_exact(model) else max_passes) + 1):
            bits, seen = model(images, labels).bits_map(b, size, channels)
            total += bits
            count += seen
            if done >= passes and bool((count > 0).all()):
                break
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to uint8 RGB (..., 3) along COLORMAP; NaN becomes grey."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0, 1)
    stops = np.linspace(0, 1, len(COLORMAP))
    rgb = np.stack([np.interp(v, stops, COLORMAP[:, c]) for c in range(3)], axis=-1)
    rgb[np.isnan(values)] = UNSEEN_GREY
    return rgb.round().astype(np.uint8)


def _as_rgb(images: Tensor) -> Tensor:
    """uint8 (B, C, H, W) -> (B, 3, H, W): grey repeated, extra channels (alpha) dropped."""
    return images[:, :3] if images.shape[1] >= 3 else images[:, :1].expand(-1, 3, -1, -1)


def heatmap_figure(images: Tensor, bits: Tensor, vmax: float | None = None, scale: int | None = None) -> Tensor:
    """uint8 (3, H', W') figure: each image next to its heat map (shared scale 0..``vmax`` bits,
    default the largest value), pairs tiled in rows and enlarged ``scale`` times with nearest
    neighbour (default: to about 128 px per image)."""
    if images.dim() != 4 or bits.shape != (images.shape[0], *images.shape[2:]):
        raise InputError(f"need images (B, C, H, W) and bits (B, H, W), got {tuple(images.shape)} and {tuple(bits.shape)}")
    values = bits.detach().double().cpu().numpy()
    finite = values[np.isfinite(values)]
    if vmax is None:
        vmax = float(finite.max()) if finite.size else 1.0
    heat = colorize(values / vmax if vmax > 0 else np.zeros_like(values))
    heat = torch.from_numpy(heat).permute(0, 3, 1, 2)
    cells = torch.stack([_as_rgb(images.cpu()), heat], dim=1).flatten(0, 1)  # image, map, image, map, ...
    grid = make_grid(cells, nrow=2 * math.ceil(math.sqrt(images.shape[0])))
    scale = scale or max(1, 128 // images.shape[-1])
    return grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


# ------------------------------------------------------------------------------------------------
# FID, precision, recall
# ------------------------------------------------------------------------------------------------

@dataclass
class FIDResult:
    """FID of samples against a reference, with Inception precision/recall (k=3) when the
    reference features are known (``None`` otherwise, with the reason in ``note``)."""

    fid: float
    precision: float | None
    recall: float | None
    num_samples: int
    num_reference: int | None
    note: str = ""

    def summary(self) -> str:
        """Two lines: FID, then precision and recall (or why they are unavailable)."""
        ref = f"{self.num_reference} reference images" if self.num_reference else "reference statistics"
        line = f"FID {self.fid:.3f} ({self.num_samples} samples vs {ref})"
        if self.precision is None:
            return f"{line}\nprecision/recall unavailable: {self.note}"
        return f"{line}\nprecision {self.precision:.4f}  recall {self.recall:.4f} (Inception, k=3)"


@dataclass
class Reference:
    """Reference Inception statistics and, when known, the reference features."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    note: str = ""


def _has_statistics(spec: PathLike) -> bool:
    """Whether ``spec`` is an .npz holding mu and sigma (ADM reference batch / saved statistics)."""
    path = Path(spec)
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path) as data:
            return {"mu", "sigma"} <= set(data.files)
    except (OSError, ValueError) as e:
        raise FIDError(f"cannot read {path} ({e}); pass a dataset or an .npz of mu/sigma statistics") from None


def _adm_batches(path: Path, image_size: int, batch_size: int) -> Iterator[Tensor]:
    """uint8 (n, C, H, W) batches of the NHWC ``arr_0`` images of an ADM reference batch (read lazily)."""
    with np.load(path) as data:
        images = data["arr_0"]
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1:3] != (image_size, image_size):
        raise FIDError(f"{path}: arr_0 holds {images.dtype} images of shape {images.shape} but the model generates "
                       f"{image_size}x{image_size}; use the reference batch for this resolution "
                       f"(e.g. VIRTUAL_imagenet{image_size}_labeled.npz)")
    for i in range(0, len(images), batch_size):
        yield torch.from_numpy(images[i: i + batch_size]).permute(0, 3, 1, 2)


def load_reference(spec: PathLike, image_size: int, channels: int, split: str = "train",
                   limit: int | None = None, cache: PathLike | None = None,
                   device: str | torch.device | None = None, batch_size: int = 50,
                   allow_small: bool = False) -> Reference:
    """Reference statistics from ``spec``.

    * an .npz with ``mu``/``sigma`` (ADM reference batch or ``fid.save_statistics``): those are
      used as they are; features for precision/recall come from its ``arr_0`` images when present
      (cached at ``cache``), otherwise precision/recall are unavailable;
    * otherwise a dataset (built-in name, folder, .npz/.npy of images) at ``image_size`` and
      ``channels``, of which the first ``limit`` images are used; statistics and features are
      cached at ``cache`` (reused when present, whatever the source: name caches by their source).
    """
    path = Path(spec)
    if _has_statistics(path):
        mu, sigma = fid.load_statistics(path)
        with np.load(path) as data:
            has_images = "arr_0" in data.files
        if not has_images:
            return Reference(mu, sigma, None, f"{path} holds statistics only (no arr_0 images); pass an ADM "
                                              "reference batch with images, or a dataset, for precision/recall")
        features = fid.reference_statistics(_adm_batches(path, image_size, batch_size), cache, device,
                                            batch_size, allow_small)[2]
        return Reference(mu, sigma, features)
    dataset = build_dataset(str(spec), split, image_size, channels)
    loader, _ = _batches(dataset, batch_size, limit)
    mu, sigma, features = fid.reference_statistics((images for images, _ in loader), cache, device,
                                                   batch_size, allow_small)
    return Reference(mu, sigma, features)


def _rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sample_labels(model: FractalGen, num_samples: int) -> Tensor | None:
    """Class-balanced labels: ``num_samples // class_num`` of every class in class order (None if
    the model is unconditional)."""
    classes = model.config.class_num
    if num_samples < max(2, classes):
        raise FIDError(f"num_samples={num_samples} is too small: need at least one sample per class "
                       f"({classes} classes) and 2 samples in all; the paper uses 50,000 (50 per class)")
    if not classes:
        return None
    return torch.arange(classes).repeat_interleave(num_samples // classes)


@torch.no_grad()
def sample_features(model: FractalGen, num_samples: int, batch_size: int = 64,
                    settings: SamplingConfig | None = None, seed: int = 0,
                    dtype: str | torch.dtype = "float32", progress: bool = True) -> np.ndarray:
    """Inception features (N, 2048) of this rank's share of the class-balanced samples.

    Under an initialised process group rank r generates labels r::world with seed + r; alone,
    all of them with ``seed``. Samples are generated ``batch_size`` at a time and discarded.
    """
    rank, world = _rank_world()
    labels = sample_labels(model, num_samples)
    mine = labels[rank::world] if labels is not None else None
    count = len(mine) if mine is not None else len(range(rank, num_samples, world))
    generator = torch.Generator(model.device).manual_seed(seed + rank)
    features = []
    with tqdm(total=count, unit="img", desc="sampling", disable=not progress or rank != 0,
              dynamic_ncols=True) as bar:
        for start in range(0, count, batch_size):
            n = min(batch_size, count - start)
            batch_labels = mine[start: start + n] if mine is not None else None
            with autocast(model.device, dtype):
                images = model.sample(labels=batch_labels, num_images=n, settings=settings, generator=generator)
            features.append(fid.inception_features(images, model.device, progress=False))
            bar.update(n)
    return np.concatenate(features) if features else np.zeros((0, fid.FEATURE_DIM))


def evaluate_fid(model: FractalGen, reference: PathLike, num_samples: int = 50_000, batch_size: int = 64,
                 settings: SamplingConfig | None = None, seed: int = 0, dtype: str | torch.dtype = "float32",
                 ref_split: str = "train", ref_limit: int | None = None, ref_cache: PathLike | None = None,
                 allow_small: bool = False, progress: bool = True) -> FIDResult | None:
    """FID and precision/recall (k=3) of ``num_samples`` class-balanced samples against ``reference``
    (see ``load_reference``).

    The reference is checked and loaded first (on rank 0), so a bad one fails before sampling.
    Under torchrun every rank samples its share (see ``sample_features``), rank 0 gathers the
    features with ``all_gather_object`` and returns the result; other ranks return None.
    """
    if num_samples < fid.MIN_SAMPLES and not allow_small:
        raise FIDError(f"num_samples={num_samples} is below {fid.MIN_SAMPLES}, too few for a stable 2048-d "
                       "covariance (the paper uses 50,000); pass --allow-small (allow_small=True) for smoke tests")
    labels = sample_labels(model, num_samples)
    if settings is not None and settings.guided and labels is None:
        raise SamplingError("classifier-free guidance (cfg != 1) needs a class-conditional model; drop --cfg")
    rank, world = _rank_world()
    cfg = model.config
    ref = None
    if rank == 0:
        ref = load_reference(reference, cfg.image_size, cfg.channels, ref_split, ref_limit, ref_cache,
                             model.device, allow_small=allow_small)
        fid.load_inception(model.device)  # fail now, not after sampling, when the weights are missing
    features = sample_features(model, num_samples, batch_size, settings, seed, dtype, progress)
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, features)
        features = np.concatenate(gathered)
    if rank != 0:
        return None
    mu, sigma = fid.feature_statistics(features, allow_small)
    score = fid.frechet_distance(ref.mu, ref.sigma, mu, sigma)
    total = len(labels) if labels is not None else num_samples
    if ref.features is None:
        return FIDResult(score, None, None, total, None, ref.note)
    precision, recall = fid.precision_recall(ref.features, features, k=3, device=model.device)
    return FIDResult(score, precision, recall, total, len(ref.features))


def fid_between(real_images: fid.Images, fake_images: fid.Images, device: str | torch.device | None = None,
                batch_size: int = 50, allow_small: bool = False) -> FIDResult:
    """FID and precision/recall (k=3) between two sets of uint8 (N, C, H, W) images (tensors or
    iterables of batches); e.g. two halves of a dataset, to see what a real-vs-real FID is."""
    real = fid.inception_features(real_images, device, batch_size)
    fake = fid.inception_features(fake_images, device, batch_size)
    score = fid.fid_from_features(real, fake, allow_small)
    precision, recall = fid.precision_recall(real, fake, k=3, device=device)
    return FIDResult(score, precision, recall, len(fake), len(real))


# ------------------------------------------------------------------------------------------------
# Command line: fractalgen eval {nll,fid}
# ------------------------------------------------------------------------------------------------

def cmd_eval_nll(args: argparse.Namespace) -> None:
    from .cli_common import load_from_args
    from .runtime import save_image

    model, device = load_from_args(args)
    dataset = build_eval_dataset(args.data, args.split, model, resize=args.resize, val_fraction=args.val_fraction)
    result = evaluate_nll(model, dataset, batch_size=args.batch_size, passes=args.passes, limit=args.limit,
                          dtype=args.dtype, labels=args.conditional, seed=args.seed)
    print(result.summary())
    if args.csv:
        result.write_csv(args.csv)
        print(f"wrote {args.csv} ({result.num_images} rows)")
    if args.heatmap:
        count = min(args.heatmap_count, result.num_images)
        images, labels = collate([dataset[i] for i in range(count)])
        with autocast(device, args.dtype):
            bits = bits_heatmap(model, images, _nll_labels(model, labels, args.conditional),
                                passes=args.passes, seed=args.seed)
        vmax = float(bits.nan_to_num(0).max())
        save_image(heatmap_figure(images, bits, vmax=vmax), args.heatmap)
        print(f"wrote {args.heatmap} ({count} images; colour scale 0 to {vmax:.2f} bits/pixel)")


def cache_dir() -> Path:
    """The user's cache folder for fractalgen: $XDG_CACHE_HOME/fractalgen, else ~/.cache/fractalgen."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "fractalgen"


def _default_ref_cache(args: argparse.Namespace, model: FractalGen) -> Path:
    """A file in the user cache folder named after the reference (its name and a hash of its full
    path, so two folders of the same name do not share it) and what is taken from it."""
    ref = str(args.ref)
    if ref not in BUILTINS:
        path = Path(ref).resolve()
        ref = f"{path.name.replace('.', '_')}_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"
    if _has_statistics(args.ref):
        return cache_dir() / "fid" / f"{ref}_features.npz"
    cfg = model.config
    limit = f"_n{args.ref_limit}" if args.ref_limit else ""
    return cache_dir() / "fid" / f"ref_{ref}_{args.ref_split}_{cfg.image_size}px_{cfg.channels}c{limit}.npz"


def cmd_eval_fid(args: argparse.Namespace) -> None:
    from .checkpoint import load_model
    from .cli_common import model_ref, sampling_config
    from .distributed import device_for_rank, init_distributed

    device = device_for_rank(args.device)
    rank, world = init_distributed(device)
    model = load_model(model_ref(args), preset=args.preset, device=device)
    settings = sampling_config(args)
    cache = Path(args.ref_cache) if args.ref_cache else _default_ref_cache(args, model)
    try:
        result = evaluate_fid(model, args.ref, num_samples=args.num_samples, batch_size=args.batch_size,
                              settings=settings, seed=args.seed, dtype=args.dtype, ref_split=args.ref_split,
                              ref_limit=args.ref_limit, ref_cache=cache, allow_small=args.allow_small)
    finally:
        if world > 1:
            dist.destroy_process_group()
    if result is None:
        return
    print(result.summary())
    if cache.is_file():
        print(f"reference statistics cached in {cache} (delete it to recompute)")
    if args.out_json:
        record = {**dataclasses.asdict(result), "model": args.model, "reference": str(args.ref),
                  "reference_cache": str(cache) if cache.is_file() else None, "seed": args.seed, "world_size": world,
                  "settings": dataclasses.asdict(settings)}
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out_json}")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``eval nll`` and ``eval fid`` on the top-level subparsers of ``fractalgen``."""
    from .cli_common import int8_arg, model_args, sampling_args

    parser = subparsers.add_parser("eval", help="bits/dim on a dataset, or FID / precision / recall of samples")
    sub = parser.add_subparsers(dest="eval_command", required=True)

    p = sub.add_parser("nll", help="bits/dim on a dataset (exact for AR, an upper-bound estimate for MAR)")
    model_args(p)
    int8_arg(p)
    p.add_argument("--data", required=True, help="fashion-mnist, photos32, an image folder or a .npz/.npy")
    p.add_argument("--split", default="test", choices=["train", "test", "val", "all"],
                   help="split to score: train/ test/ (or val/) sub-folders, .npz arrays x_test or images_test, "
                        "the built-ins' test set; 'all' for data without splits")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="the held-out fraction that `train --val-fraction` carved: --split val scores it, "
                        "--split train the rest (of the train split, when the data has one; --split test is then "
                        "its own test split)")
    p.add_argument("--passes", type=int, default=1, help="MAR forward passes per image (ignored for AR)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--limit", type=int, help="evaluate the first N images only")
    p.add_argument("--conditional", action="store_true",
                   help="class-conditional likelihood (default: null condition, as the paper)")
    p.add_argument("--resize", action="store_true", help="resize/convert array images that do not fit the model")
    p.add_argument("--seed", type=int, default=0, help="seed of the MAR masks")
    p.add_argument("--csv", help="write per-image bits/dim to this CSV")
    p.add_argument("--heatmap", help="write a PNG of images next to their per-pixel bits")
    p.add_argument("--heatmap-count", type=int, default=8, help="images in the heat map figure")
    p.set_defaults(func=cmd_eval_nll)

    p = sub.add_parser("fid", help="FID, precision and recall of class-balanced samples "
                                   "(torchrun --nproc_per_node=N -m fractalgen eval fid ...)")
    model_args(p)
    sampling_args(p)
    p.add_argument("--ref", required=True, help="reference: dataset (name, folder, .npz of images) or a "
                                                "statistics .npz (mu, sigma; ADM reference batch)")
    p.add_argument("--ref-split", default="train", choices=["train", "test", "val", "all"],
                   help="split of a reference dataset ('all' for data without splits)")
    p.add_argument("--ref-limit", type=int, help="use the first N reference images")
    p.add_argument("--ref-cache", help="reference statistics cache (.npz; default: a file named after the reference "
                                       "in $XDG_CACHE_HOME/fractalgen/fid, ~/.cache/fractalgen/fid)")
    p.add_argument("--num-samples", type=int, default=50_000, help="samples, num_samples // classes per class")
    p.add_argument("--batch-size", type=int, default=64, help="images sampled at a time")
    p.add_argument("--allow-small", action="store_true", help=f"allow fewer than {fid.MIN_SAMPLES} images (smoke tests)")
    p.add_argument("--out-json", help="write the numbers and settings to this JSON file")
    p.set_defaults(func=cmd_eval_fid)
