"""Image datasets for training: folders of images, .npz/.npy arrays and two small built-ins.

Every dataset yields ``(image, label)`` with ``image`` a ``torch.uint8`` tensor of shape
(C, S, S) and ``label`` an int (-1 when unlabelled), and exposes ``.classes`` and ``.num_classes``.
Images are resized with the ADM centre crop (``center_crop_arr``) and converted with Pillow.

Splits (``build_dataset(..., split=...)``): a dataset carries splits when it is

* a built-in (``train`` and ``test``);
* an image folder with ``train/`` and ``test/`` (or ``val/``) sub-folders;
* a ``.npz`` with one image array per split named ``images_<split>`` (labels ``labels_<split>``)
  or ``x_<split>`` (labels ``y_<split>``), e.g. ``x_train``, ``y_train``, ``x_test``, ``y_test``.

``test`` and ``val`` stand in for each other. Asking data without splits for one is an error:
``split="all"`` takes every image, and ``val_fraction`` holds out a fixed random part of it as
``val``/``test`` (the same data and fraction always give the same part). On data with train and
test splits, ``val_fraction`` carves ``val`` out of the train split instead (``train`` is the
rest) and ``test`` stays the data's own: choices made on ``val`` never see the test images.
"""

import copy
import gzip
import os
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from .config import FASHION_MNIST_CLASSES
from .errors import DataError
from .runtime import MODES as _MODES

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
# Photographs shipped inside the scikit-image wheel (skimage.data loads them without network).
PHOTOS32_SOURCES = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"]
PHOTOS32_SCALES = (64, 128, 256)  # short side of each photo before cutting crops
PHOTOS32_STRIDE = 16
BUILTINS = ("fashion-mnist", "photos32")

_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_NPZ_IMAGE_KEYS = ("images", "x", "arr_0")
_NPZ_LABEL_KEYS = ("labels", "y", "arr_1")
SPLITS = ("train", "test", "val")
SPLIT_LAYOUTS = ("train/ and test/ (or val/) sub-folders of an image folder, or .npz arrays images_train/"
                 "images_test (labels_train/labels_test) or x_train/x_test (y_train/y_test)")
VAL_SEED = 0  # seed of the permutation that carves val_fraction out of data without splits


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM centre crop: halve with BOX while large, bicubic-scale the short side to image_size, crop the centre."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    left = (pil_image.width - image_size) // 2
    top = (pil_image.height - image_size) // 2
    return pil_image.crop((left, top, left + image_size, top + image_size))


def _mode(channels: int) -> str:
    """Pillow mode for a channel count."""
    if channels not in _MODES:
        raise DataError(f"channels must be 1 (grey), 3 (RGB) or 4 (RGBA), got {channels}")
    return _MODES[channels]


def _check_image_size(image_size: int) -> None:
    """Reject non-positive image sizes."""
    if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise DataError(f"image_size must be a positive int, got {image_size!r}")


def _to_tensor(image: Image.Image, image_size: int, mode: str, flip: bool) -> torch.Tensor:
    """Convert a Pillow image to a (C, S, S) uint8 tensor, centre-cropping and maybe flipping it."""
    image = image.convert(mode)
    if image.size != (image_size, image_size):
        image = center_crop_arr(image, image_size)
    if flip and torch.rand(()) < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image).reshape(image_size, image_size, -1)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class ImageFolder(Dataset):
    """Images in class sub-folders (ImageNet layout, labels = sorted folder names) or a flat folder (label -1).

    Files Pillow cannot identify are skipped with one warning when the folder is scanned; files that
    fail to decode later (e.g. truncated) are warned about once and replaced by the next readable item.
    ``num_skipped`` counts both in this process (DataLoader workers keep their own count).
    """

    def __init__(self, root: str | os.PathLike, image_size: int, channels: int,
                 flip: bool = False, allow_upscale: bool = False) -> None:
        _check_image_size(image_size)
        self.root = Path(root)
        self.image_size = image_size
        self.mode = _mode(channels)
        self.flip = flip
        self.classes, candidates = _list_images(self.root)
        self.num_classes = len(self.classes)
        self.samples, bad = _scan(candidates, image_size, allow_upscale)
        if not self.samples:
            raise DataError(f"no readable images in {self.root} (all {len(bad)} image files are corrupt)")
        self.num_skipped = len(bad)
        self._bad_indices: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            if i in self._bad_indices:
                continue
            path, label = self.samples[i]
            try:
                with Image.open(path) as image:
                    return _to_tensor(image, self.image_size, self.mode, self.flip), label
            except _READ_ERRORS as error:
                self._bad_indices.add(i)
                self.num_skipped += 1
                warnings.warn(f"skipping unreadable image {path}: {error}", stacklevel=2)
        raise DataError(f"no readable images left in {self.root}; every file failed to decode")

    def select(self, indices: list[int]) -> "ImageFolder":
        """A copy holding only the items at ``indices`` (to hold out a validation part)."""
        subset = copy.copy(self)
        subset.samples = [self.samples[i] for i in indices]
        subset._bad_indices = set()
        return subset


def _image_files(folder: Path) -> list[str]:
    """Image files under folder, recursively, sorted, skipping hidden files and folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _list_images(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and (path, label) pairs for a class-folder or flat image folder."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; check the path")
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    class_dirs = [e for e in entries if (root / e).is_dir()]
    loose = [e for e in entries if e.lower().endswith(IMAGE_EXTENSIONS) and (root / e).is_file()]
    if class_dirs and loose:
        raise DataError(f"{root} mixes {len(loose)} loose images with class sub-folders {class_dirs[:5]}; "
                        "put every image in a class folder, or use a flat folder without sub-folders")
    if loose:
        samples = [(str(root / e), -1) for e in loose]
    else:
        samples = [(path, label) for label, name in enumerate(class_dirs) for path in _image_files(root / name)]
    if not samples:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {root}; "
                        "use a folder of images or one sub-folder of images per class")
    return class_dirs, samples


def _probe(path: str) -> tuple[int, int] | None:
    """Image (width, height) from the file header, or None when Pillow cannot identify the file."""
    try:
        with Image.open(path) as image:
            return image.size
    except _READ_ERRORS:
        return None


def _scan(samples: list[tuple[str, int]], image_size: int,
          allow_upscale: bool) -> tuple[list[tuple[str, int]], list[str]]:
    """Split samples into readable ones and bad paths; raise if an image is too small and upscaling is off."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        sizes = list(tqdm(pool.map(_probe, (path for path, _ in samples)), total=len(samples),
                          desc="scanning images", unit="img", disable=len(samples) < 10_000))
    good = [(sample, size) for sample, size in zip(samples, sizes) if size is not None]
    bad = [path for (path, _), size in zip(samples, sizes) if size is None]
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        warnings.warn(f"skipping {len(bad)} unreadable image files: {', '.join(bad[:10])}{more}", stacklevel=3)
    small = [(path, size) for (path, _), size in good if min(size) < image_size]
    if small and not allow_upscale:
        (path, (width, height)), more = small[0], len(small) - 1
        raise DataError(f"image {path} is {width}x{height}, smaller than image_size={image_size} on its short side"
                        f"{f' (and {more} more)' if more else ''}; upscale it with --allow-upscale "
                        "(allow_upscale=True in Python) or use a model with a smaller image size")
    return [sample for sample, _ in good], bad


class _ArrayImages(Dataset):
    """In-memory uint8 images (N, H, W) or (N, H, W, 3|4), converted to the requested size and channels per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, classes: list[str],
                 image_size: int, channels: int, flip: bool) -> None:
        _check_image_size(image_size)
        self.images = images
        self.labels = labels
        self.classes = classes
        self.num_classes = len(classes)
        self.image_size = image_size
        self.mode = _mode(channels)
        self.flip = flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(np.ascontiguousarray(self.images[index]))
        label = -1 if self.labels is None else int(self.labels[index])
        return _to_tensor(image, self.image_size, self.mode, self.flip), label

    def select(self, indices: list[int]) -> "_ArrayImages":
        """A copy holding only the items at ``indices`` (to hold out a validation part)."""
        subset = copy.copy(self)
        subset.images = self.images[indices]
        subset.labels = None if self.labels is None else self.labels[indices]
        return subset


class ArrayDataset(_ArrayImages):
    """Images from a .npz (``images``/``x``/``arr_0`` plus optional ``labels``/``y``/``arr_1``; with
    ``split``, ``images_<split>``/``x_<split>`` plus ``labels_<split>``/``y_<split>``) or a .npy file.

    Images are uint8 (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1, 3, 4; image_size and
    channels default to the array's own. Labels are non-negative ints; classes are "0".."max".
    """

    def __init__(self, path: str | os.PathLike, image_size: int | None = None,
                 channels: int | None = None, flip: bool = False, split: str | None = None) -> None:
        self.path = Path(path)
        images, labels = _load_arrays(self.path, split)
        images = _to_nhwc(images, self.path)
        if labels is not None:
            _check_labels(labels, len(images), self.path)
        classes = [] if labels is None else [str(i) for i in range(int(labels.max()) + 1)]
        native_channels = 1 if images.ndim == 3 else images.shape[3]
        super().__init__(images, labels, classes,
                         min(images.shape[1:3]) if image_size is None else image_size,
                         native_channels if channels is None else channels, flip)


def _npz_keys(split: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names the images and labels of ``split`` (None: of data without splits) may have in a .npz."""
    if split is None:
        return _NPZ_IMAGE_KEYS, _NPZ_LABEL_KEYS
    return (f"images_{split}", f"x_{split}"), (f"labels_{split}", f"y_{split}")


def _read_error(path: Path, error: Exception) -> DataError:
    """The error for an array file numpy cannot read."""
    return DataError(f"cannot read {path} ({error}); re-save it with np.savez / np.save and plain (non-object) arrays")


def _npz_names(path: Path) -> list[str]:
    """The array names stored in a .npz file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise _read_error(path, error) from error


def _load_arrays(path: Path, split: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Images and optional labels from a .npz (those of ``split`` when given) or .npy file."""
    if path.suffix.lower() not in (".npz", ".npy"):
        raise DataError(f"{path} is not a .npz or .npy file; save images with np.savez(path, images=..., labels=...)")
    if not path.is_file():
        raise DataError(f"array file {path} does not exist; check the path")
    if path.suffix.lower() == ".npy":
        if split is not None:
            raise DataError(f"{path} is a .npy file, which holds no splits; use a .npz with {SPLIT_LAYOUTS}")
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False), None
        except (OSError, ValueError, EOFError) as error:
            raise _read_error(path, error) from error
    image_keys, label_keys = _npz_keys(split)
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = archive.files
            arrays = {k: archive[k] for k in names if k in image_keys + label_keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise _read_error(path, error) from error
    image_key = next((k for k in image_keys if k in arrays), None)
    if image_key is None:
        raise DataError(f"{path} has arrays {names} but none named {' / '.join(image_keys)}; "
                        f"save the images as {image_keys[0]}=...")
    return arrays[image_key], next((arrays[k] for k in label_keys if k in arrays), None)


def _check_labels(labels: np.ndarray, count: int, path: Path) -> None:
    """Labels must be a 1-D array of non-negative ints, one per image."""
    if labels.ndim != 1 or len(labels) != count:
        raise DataError(f"labels in {path} have shape {labels.shape}; expected ({count},), one label per image")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise DataError(f"labels in {path} must be non-negative integers (got dtype {labels.dtype}); "
                        "map class names to 0..K-1 first")


def _to_nhwc(images: np.ndarray, path: Path) -> np.ndarray:
    """Validate an image array and view it as (N, H, W) or (N, H, W, 3|4)."""
    if images.dtype != np.uint8:
        raise DataError(f"images in {path} have dtype {images.dtype}; expected uint8 in 0..255 "
                        "(e.g. (x * 255).round().clip(0, 255).astype(np.uint8))")
    if images.ndim == 4 and images.shape[3] not in (1, 3, 4) and images.shape[1] in (1, 3, 4):
        images = images.transpose(0, 2, 3, 1)
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (3, 4)) or len(images) == 0:
        raise DataError(f"images in {path} have shape {images.shape}; expected a non-empty (N, H, W), "
                        "(N, H, W, C) or (N, C, H, W) array with C in 1, 3, 4")
    return images


class FashionMNIST(_ArrayImages):
    """Fashion-MNIST (28x28 grey, 10 classes) read from the Debian package's gzip IDX files."""

    def __init__(self, split: str = "train", root: str | os.PathLike = FASHION_MNIST_ROOT,
                 image_size: int = 28, channels: int = 1, flip: bool = False) -> None:
        if split not in ("train", "test"):
            raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        images, labels = _fashion_mnist_arrays(str(root), split)
        super().__init__(images, labels, list(FASHION_MNIST_CLASSES), image_size, channels, flip)


@lru_cache(maxsize=None)
def _fashion_mnist_arrays(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decoded Fashion-MNIST images (N, 28, 28) and labels (N,), cached per process."""
    prefix = "train" if split == "train" else "t10k"
    image_path = Path(root) / f"{prefix}-images-idx3-ubyte.gz"
    label_path = Path(root) / f"{prefix}-labels-idx1-ubyte.gz"
    if not image_path.is_file() or not label_path.is_file():
        raise DataError(f"Fashion-MNIST files not found in {root}; install them with "
                        "`apt-get update && apt-get install -y dataset-fashion-mnist`")
    images, labels = _read_idx(image_path), _read_idx(label_path)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DataError(f"Fashion-MNIST files in {root} disagree ({images.shape} images, {labels.shape} labels); "
                        "reinstall with `apt-get install --reinstall -y dataset-fashion-mnist`")
    return images, labels


def _read_idx(path: Path) -> np.ndarray:
    """Decode a gzip IDX file (the MNIST format: magic 0x0000080N, N big-endian sizes, uint8 data)."""
    try:
        with gzip.open(path, "rb") as file:
            data = file.read()
        if data[:3] != b"\0\0\x08":
            raise ValueError("not a uint8 IDX file")
        ndim = data[3]
        shape = np.frombuffer(data, ">u4", ndim, offset=4).tolist()
        return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, ValueError, IndexError) as error:
        raise DataError(f"cannot decode {path} ({error}); reinstall it with "
                        "`apt-get install --reinstall -y dataset-fashion-mnist`") from error


class Photos32(_ArrayImages):
    """32x32 RGB crops of the photographs bundled with scikit-image, labelled by source photo.

    Each photo in PHOTOS32_SOURCES is resized (Lanczos) so its short side is each of
    PHOTOS32_SCALES, then cut into 32x32 crops with stride PHOTOS32_STRIDE. Crops are ordered by
    (photo, scale, row, column); every 10th crop is 'test', the rest 'train'. Neighbouring crops
    overlap, so the test split measures fit on held-out crops, not on unseen photos.
    """

    def __init__(self, split: str = "train", image_size: int = 32, channels: int = 3, flip: bool = False) -> None:
        if split not in ("train", "test"):
            raise DataError(f"Photos32 split must be 'train' or 'test', got {split!r}")
        crops, labels = _photos32_arrays()
        is_test = np.arange(len(crops)) % 10 == 9
        keep = is_test if split == "test" else ~is_test
        super().__init__(crops[keep], labels[keep], list(PHOTOS32_SOURCES), image_size, channels, flip)


@lru_cache(maxsize=None)
def _photos32_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All Photos32 crops (N, 32, 32, 3) and their photo labels (N,), cached per process."""
    try:
        import skimage.data
    except ImportError as error:
        raise DataError("the photos32 dataset needs scikit-image: pip install scikit-image") from error
    crops, labels = [], []
    for label, name in enumerate(PHOTOS32_SOURCES):
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for short_side in PHOTOS32_SCALES:
            scale = short_side / min(photo.size)
            resized = np.asarray(photo.resize(tuple(round(x * scale) for x in photo.size), Image.LANCZOS))
            windows = np.lib.stride_tricks.sliding_window_view(resized, (32, 32, 3))
            crops.append(windows[::PHOTOS32_STRIDE, ::PHOTOS32_STRIDE].reshape(-1, 32, 32, 3))
            labels.append(np.full(len(crops[-1]), label))
    return np.concatenate(crops), np.concatenate(labels)


def available_splits(name_or_path: str) -> tuple[str, ...]:
    """The splits a dataset carries (see the module docstring); () for data without splits."""
    if name_or_path in BUILTINS:
        return ("train", "test")
    path = Path(name_or_path)
    if path.is_dir():
        return tuple(name for name in SPLITS if (path / name).is_dir())
    if path.is_file() and path.suffix.lower() == ".npz":
        names = _npz_names(path)
        return tuple(name for name in SPLITS if any(key in names for key in _npz_keys(name)[0]))
    if path.is_file() and path.suffix.lower() == ".npy":
        return ()
    if not path.exists():
        raise DataError(f"dataset {name_or_path!r} does not exist: give a built-in ({', '.join(BUILTINS)}), "
                        "an image folder, or a .npz/.npy file")
    raise DataError(f"unknown dataset {name_or_path!r}: not a built-in ({', '.join(BUILTINS)}), "
                    "an image folder, or a .npz/.npy file")


def build_dataset(name_or_path: str, split: str, image_size: int, channels: int, flip: bool = False,
                  allow_upscale: bool = False, val_fraction: float = 0.0) -> Dataset:
    """``split`` ('train', 'test', 'val' or 'all') of a built-in (by name), an image folder or a .npz/.npy.

    Data without splits gives only 'all', unless ``val_fraction`` > 0 holds out that fraction of it
    as 'val'/'test' and leaves the rest as 'train'; so no split ever silently serves the training images.
    Data with splits and ``val_fraction`` > 0: 'val' is that fraction of its train split, 'train'
    the rest, 'test' its own test split.
    """
    if split not in SPLITS + ("all",):
        raise DataError(f"split must be 'train', 'test', 'val' or 'all', got {split!r}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be at least 0 and below 1, got {val_fraction}")
    present = available_splits(name_or_path)
    if "val" in present and val_fraction:
        raise DataError(f"{name_or_path} already has a val split; drop --val-fraction")
    if present and split == "all":
        raise DataError(f"{name_or_path} has splits ({', '.join(present)}); ask for one of them "
                        "('all' is for data without splits)")
    if not present and not val_fraction and split != "all":
        raise DataError(f"{name_or_path} has no {split} split; splits come from {SPLIT_LAYOUTS}. Pass --split all "
                        "to use every image, or --val-fraction F to hold out a fraction F of them")
    carve = bool(val_fraction) and split != "all" and not (present and split == "test")
    source = "train" if carve and present else split  # with splits, val is carved out of the train split
    stored = _stored_split(name_or_path, present, source) if present else None
    dataset = _load(name_or_path, stored, image_size, channels, flip, allow_upscale)
    return _carve(dataset, split, val_fraction) if carve else dataset


def _stored_split(name_or_path: str, present: tuple[str, ...], split: str) -> str:
    """Which stored split serves ``split`` (test and val stand in for each other)."""
    wanted = ("train",) if split == "train" else (split, "val" if split == "test" else "test")
    for name in wanted:
        if name in present:
            return name
    raise DataError(f"{name_or_path} has the splits {', '.join(present)} but none for split={split!r}; "
                    f"add a {wanted[0]} split or ask for one of those")


def _load(name_or_path: str, split: str | None, image_size: int, channels: int, flip: bool,
          allow_upscale: bool) -> Dataset:
    """The stored ``split`` of a dataset (None: all of a dataset without splits)."""
    if name_or_path == "fashion-mnist":
        return FashionMNIST(split, image_size=image_size, channels=channels, flip=flip)
    if name_or_path == "photos32":
        return Photos32(split, image_size=image_size, channels=channels, flip=flip)
    path = Path(name_or_path)
    if path.is_dir():
        return ImageFolder(path / split if split else path, image_size, channels, flip, allow_upscale)
    return ArrayDataset(path, image_size, channels, flip, split=split)


def _carve(dataset: Dataset, split: str, fraction: float) -> Dataset:
    """The held-out ``fraction`` ('val'/'test') or the rest ('train') of ``dataset``, by a fixed permutation."""
    n = len(dataset)
    held = max(1, round(n * fraction))
    if held >= n:
        raise DataError(f"val_fraction={fraction} of {n} images leaves none to train on; use a smaller fraction")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SEED))
    part = order[:held] if split in ("val", "test") else order[held:]
    return dataset.select(sorted(part.tolist()))


def training_splits(name_or_path: str, val_fraction: float = 0.0) -> tuple[str, str | None]:
    """(split to train on, split to validate on or None): the data's own train/test splits, a held-out
    ``val_fraction``, or every image with no validation."""
    present = available_splits(name_or_path)
    if val_fraction or not present:
        return ("train", "val") if val_fraction else ("all", None)
    return "train", "test" if {"test", "val"} & set(present) else None


def collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack dataset items into (images (B, C, S, S) uint8, labels (B,))."""
    images, labels = zip(*items)
    return torch.stack(images), torch.tensor(labels)


def check_num_classes(dataset: Dataset, num_classes: int) -> None:
    """Raise if the dataset has more classes than the model has class embeddings."""
    if dataset.num_classes > num_classes:
        raise DataError(f"the dataset has {dataset.num_classes} classes but the model only {num_classes}; "
                        f"use a model with num_classes >= {dataset.num_classes} or a dataset with fewer classes")
