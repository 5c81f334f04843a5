"""Tests for fractalgen.data: crops, image folders, arrays, built-in datasets and error messages."""

import gzip
import importlib.util
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fractalgen import data
from fractalgen.data import (ArrayDataset, DataError, FashionMNIST, ImageFolder, Photos32, build_dataset,
                             center_crop_arr, check_num_classes)

HAS_FASHION_MNIST = Path(data.FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz").is_file()
HAS_SKIMAGE = importlib.util.find_spec("skimage") is not None


def _noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Random uint8 image array (H, W) for one channel, else (H, W, C)."""
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _save(path: Path, array: np.ndarray) -> Path:
    """Save an array as an image file, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _corrupt_folder(root: Path) -> tuple[Path, Path]:
    """Two-class folder with mixed formats, sizes and modes plus a garbage PNG and a truncated JPEG."""
    _save(root / "cat" / "a.png", _noise(40, 50, seed=1))
    _save(root / "cat" / "nested" / "b.JPG", _noise(33, 70, channels=1, seed=2))
    _save(root / "dog" / "c.jpeg", _noise(64, 48, seed=3))
    _save(root / "dog" / "d.bmp", _noise(32, 32, channels=1, seed=4))
    _save(root / "dog" / "e.webp", _noise(45, 45, channels=4, seed=5))
    (root / "dog" / "notes.txt").write_text("not an image")
    garbage = root / "cat" / "garbage.png"
    garbage.write_bytes(b"this is not a png" * 20)
    whole = _save(root / "dog" / "truncated.jpg", _noise(64, 64, seed=6)).read_bytes()
    truncated = root / "dog" / "truncated.jpg"
    truncated.write_bytes(whole[: len(whole) // 2])
    return garbage, truncated


def test_center_crop_exact_size_and_keeps_centre() -> None:
    array = np.zeros((100, 300, 3), np.uint8)
    array[:, 100:200] = 255  # white centre square, black side bands
    for size in (32, 50, 100, 128):
        crop = center_crop_arr(Image.fromarray(array), size)
        assert crop.size == (size, size)
        pixels = np.asarray(crop)
        assert pixels[size // 2, size // 2].min() == 255
        assert pixels[:, 2:-2].min() >= 250  # only the white centre survives (bicubic ringing at the edges)


def test_center_crop_halves_with_box_then_bicubic() -> None:
    image = Image.fromarray(_noise(256, 320))
    expected = image.resize((160, 128), Image.BOX).resize((80, 64), Image.BOX).resize((40, 32), Image.BOX)
    expected = expected.resize((40, 32), Image.BICUBIC).crop((4, 0, 36, 32))
    assert np.array_equal(np.asarray(center_crop_arr(image, 32)), np.asarray(expected))


def test_image_folder_with_corrupt_files(tmp_path: Path) -> None:
    garbage, truncated = _corrupt_folder(tmp_path)
    with pytest.warns(UserWarning, match=re.escape(str(garbage))):
        dataset = ImageFolder(tmp_path, image_size=32, channels=3)
    assert dataset.classes == ["cat", "dog"] and dataset.num_classes == 2
    assert len(dataset) == 6 and dataset.num_skipped == 1  # garbage skipped at scan, truncated found on load
    assert sorted(label for _, label in dataset.samples) == [0, 0, 1, 1, 1, 1]
    with pytest.warns(UserWarning, match=re.escape(str(truncated))):
        batches = list(DataLoader(dataset, batch_size=4))
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 1, 1, 1, 0]  # the truncated JPEG (last item) is replaced by item 0
    assert torch.equal(images[5], images[0])
    assert dataset.num_skipped == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per bad file: no second warning, also in workers
        assert sum(len(b[1]) for b in DataLoader(dataset, batch_size=4, num_workers=2)) == 6


def test_image_folder_grey_and_rgba_channels(tmp_path: Path) -> None:
    _save(tmp_path / "x" / "rgb.png", _noise(40, 40))
    _save(tmp_path / "x" / "grey.png", _noise(40, 40, channels=1))
    for channels in (1, 3, 4):
        dataset = ImageFolder(tmp_path, 32, channels)
        for image, _ in (dataset[0], dataset[1]):
            assert image.shape == (channels, 32, 32) and image.dtype == torch.uint8
    alpha = ImageFolder(tmp_path, 32, 4)[0][0][3]
    assert (alpha == 255).all()


def test_image_folder_flip(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _noise(32, 32))
    dataset = ImageFolder(tmp_path, 32, 3, flip=True)
    seen = {tuple(dataset[0][0][0, 0, :2].tolist()) for _ in range(40)}
    assert len(seen) == 2  # both the original and the mirrored image appear
    original = torch.from_numpy(_noise(32, 32)).permute(2, 0, 1)
    assert all(torch.equal(img, original) or torch.equal(img, original.flip(-1))
               for img in (dataset[0][0] for _ in range(10)))


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    for i in range(3):
        _save(tmp_path / f"img{i}.PNG", _noise(36, 40, seed=i))
    dataset = ImageFolder(tmp_path, 32, 3)
    assert dataset.classes == [] and dataset.num_classes == 0 and len(dataset) == 3
    assert [dataset[i][1] for i in range(3)] == [-1, -1, -1]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing", 32, 3)
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no image files"):
        ImageFolder(tmp_path / "empty" / "class_a", 32, 3)
    with pytest.raises(DataError, match="no image files"):
        ImageFolder(tmp_path / "empty", 32, 3)
    _save(tmp_path / "mixed" / "loose.png", _noise(32, 32))
    _save(tmp_path / "mixed" / "cls" / "a.png", _noise(32, 32))
    with pytest.raises(DataError, match="mixes"):
        ImageFolder(tmp_path / "mixed", 32, 3)
    with pytest.raises(DataError, match="channels must be"):
        ImageFolder(tmp_path / "mixed" / "cls", 32, 2)


def test_too_small_image(tmp_path: Path) -> None:
    _save(tmp_path / "big.png", _noise(64, 64))
    small = _save(tmp_path / "small.png", _noise(20, 40))
    with pytest.raises(DataError, match=r"small\.png is 40x20, smaller than image_size=32.*allow_upscale=True"):
        ImageFolder(tmp_path, 32, 3)
    dataset = ImageFolder(tmp_path, 32, 3, allow_upscale=True)
    index = [path for path, _ in dataset.samples].index(str(small))
    assert dataset[index][0].shape == (3, 32, 32)


def test_all_files_corrupt(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="bad.png"), pytest.raises(DataError, match="no readable images"):
        ImageFolder(tmp_path, 32, 3)


def test_npz_with_labels_and_channel_conversion(tmp_path: Path) -> None:
    images = _noise(5 * 16, 16).reshape(5, 16, 16, 3)
    path = tmp_path / "data.npz"
    np.savez(path, images=images, labels=np.array([0, 2, 1, 2, 0]))
    native = ArrayDataset(path)
    assert len(native) == 5 and native.classes == ["0", "1", "2"]
    image, label = native[1]
    assert label == 2 and torch.equal(image, torch.from_numpy(images[1]).permute(2, 0, 1))
    grey = ArrayDataset(path, channels=1)[1][0]
    expected = np.asarray(Image.fromarray(images[1]).convert("L"))  # ITU-R 601-2 luma, as Pillow
    assert grey.shape == (1, 16, 16) and np.array_equal(grey[0].numpy(), expected)
    rgba = ArrayDataset(path, channels=4)[1][0]
    assert torch.equal(rgba[:3], image) and (rgba[3] == 255).all()
    resized = ArrayDataset(path, image_size=8)[1][0]
    assert resized.shape == (3, 8, 8)
    assert torch.equal(resized, torch.from_numpy(np.array(center_crop_arr(Image.fromarray(images[1]), 8)))
                       .permute(2, 0, 1))


def test_npz_layouts_without_labels(tmp_path: Path) -> None:
    grey = _noise(4 * 12, 12, channels=1).reshape(4, 12, 12)
    np.savez(tmp_path / "x.npz", x=grey)
    dataset = ArrayDataset(tmp_path / "x.npz", channels=3)
    assert dataset.classes == [] and dataset[0][1] == -1
    assert torch.equal(dataset[2][0], torch.from_numpy(grey[2]).expand(3, 12, 12))
    nchw = _noise(3 * 3 * 10, 10, channels=1).reshape(3, 3, 10, 10)
    np.savez(tmp_path / "arr.npz", nchw, np.array([1, 0, 1]))
    dataset = ArrayDataset(tmp_path / "arr.npz")
    assert dataset[0][1] == 1 and torch.equal(dataset[0][0], torch.from_numpy(nchw[0]))
    np.save(tmp_path / "images.npy", grey[..., None])
    dataset = build_dataset(str(tmp_path / "images.npy"), "all", 12, 1)
    assert len(dataset) == 4 and torch.equal(dataset[3][0][0], torch.from_numpy(grey[3]))


def test_array_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 8, 8), np.float32))
    with pytest.raises(DataError, match="dtype float32; expected uint8"):
        ArrayDataset(tmp_path / "float.npz")
    np.savez(tmp_path / "shape.npz", images=np.zeros((2, 8, 8, 2), np.uint8))
    with pytest.raises(DataError, match=r"shape \(2, 8, 8, 2\)"):
        ArrayDataset(tmp_path / "shape.npz")
    np.savez(tmp_path / "labels.npz", images=np.zeros((2, 8, 8), np.uint8), labels=np.zeros(3, int))
    with pytest.raises(DataError, match="one label per image"):
        ArrayDataset(tmp_path / "labels.npz")
    np.savez(tmp_path / "negative.npz", images=np.zeros((2, 8, 8), np.uint8), labels=np.array([0, -1]))
    with pytest.raises(DataError, match="non-negative integers"):
        ArrayDataset(tmp_path / "negative.npz")
    np.savez(tmp_path / "keys.npz", pictures=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"\['pictures'\] but none named images"):
        ArrayDataset(tmp_path / "keys.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        ArrayDataset(tmp_path / "broken.npz")


def test_build_dataset_dispatch_and_splits(tmp_path: Path) -> None:
    _save(tmp_path / "plain" / "a" / "1.png", _noise(32, 32))
    assert isinstance(build_dataset(str(tmp_path / "plain"), "all", 32, 3), ImageFolder)
    _save(tmp_path / "split" / "train" / "a" / "1.png", _noise(32, 32))
    _save(tmp_path / "split" / "train" / "b" / "2.png", _noise(32, 32))
    _save(tmp_path / "split" / "val" / "a" / "3.png", _noise(32, 32))
    train = build_dataset(str(tmp_path / "split"), "train", 32, 3)
    test = build_dataset(str(tmp_path / "split"), "test", 32, 3)
    assert train.classes == ["a", "b"] and len(train) == 2
    assert test.root == tmp_path / "split" / "val" and len(test) == 1
    with pytest.raises(DataError, match="fashion-mnist, photos32"):
        build_dataset("imagenet-typo", "train", 32, 3)
    with pytest.raises(DataError, match="split must be"):
        build_dataset("photos32", "valid", 32, 3)
    with pytest.raises(DataError, match=r"has splits \(train, val\); ask for one of them"):
        build_dataset(str(tmp_path / "split"), "all", 32, 3)
    with pytest.raises(DataError, match=r"has splits \(train, test\)"):
        build_dataset("fashion-mnist", "all", 28, 1)


@pytest.mark.parametrize("split", ["train", "test", "val"])
def test_data_without_splits_refuses_a_split(tmp_path: Path, split: str) -> None:
    """A flat folder, a class folder, a plain .npz and a .npy have no splits: asking for one is an
    error naming the layouts that carry splits and --split all; 'all' gives every image."""
    for i in range(3):
        _save(tmp_path / "flat" / f"{i}.png", _noise(32, 32, seed=i))
        _save(tmp_path / "classes" / "a" / f"{i}.png", _noise(32, 32, seed=i))
    np.savez(tmp_path / "plain.npz", images=np.zeros((3, 8, 8), np.uint8), labels=np.arange(3))
    np.save(tmp_path / "plain.npy", np.zeros((3, 8, 8), np.uint8))
    for name in ("flat", "classes", "plain.npz", "plain.npy"):
        spec = str(tmp_path / name)
        with pytest.raises(DataError, match=rf"has no {split} split; splits come from train/ and test/ .*"
                                            r"images_train.*x_train/x_test.*--split all.*--val-fraction"):
            build_dataset(spec, split, 8, 1)
        assert len(build_dataset(spec, "all", 8, 1)) == 3


def test_npz_splits(tmp_path: Path) -> None:
    """x_<split>/y_<split> and images_<split>/labels_<split> arrays are the splits of a .npz."""
    train, test = _noise(4 * 8, 8, channels=1).reshape(4, 8, 8), _noise(2 * 8, 8, channels=1, seed=1).reshape(2, 8, 8)
    np.savez(tmp_path / "keras.npz", x_train=train, y_train=np.array([0, 1, 2, 3]), x_test=test,
             y_test=np.array([5, 6]))
    got = build_dataset(str(tmp_path / "keras.npz"), "train", 8, 1)
    assert len(got) == 4 and got[3][1] == 3 and torch.equal(got[3][0][0], torch.from_numpy(train[3]))
    for split in ("test", "val"):  # val stands in for test
        got = build_dataset(str(tmp_path / "keras.npz"), split, 8, 1)
        assert len(got) == 2 and got[1][1] == 6 and torch.equal(got[1][0][0], torch.from_numpy(test[1]))
    np.savez(tmp_path / "named.npz", images_train=train, images_val=test)
    assert data.available_splits(str(tmp_path / "named.npz")) == ("train", "val")
    got = build_dataset(str(tmp_path / "named.npz"), "test", 8, 1)
    assert len(got) == 2 and got[0][1] == -1 and torch.equal(got[0][0][0], torch.from_numpy(test[0]))
    np.savez(tmp_path / "test_only.npz", images_test=test)
    with pytest.raises(DataError, match=r"has the splits test but none for split='train'; add a train split"):
        build_dataset(str(tmp_path / "test_only.npz"), "train", 8, 1)
    np.save(tmp_path / "x.npy", train)
    with pytest.raises(DataError, match="holds no splits"):
        ArrayDataset(tmp_path / "x.npy", split="test")


def test_val_fraction_holds_out_a_fixed_disjoint_part(tmp_path: Path) -> None:
    """--val-fraction: 'val'/'test' and 'train' are disjoint, together every image, the same on every call."""
    images = np.arange(20, dtype=np.uint8).repeat(64).reshape(20, 8, 8)  # image i is filled with the value i
    np.savez(tmp_path / "d.npz", images=images)
    ids = lambda ds: sorted(int(ds[i][0][0, 0, 0]) for i in range(len(ds)))
    spec = str(tmp_path / "d.npz")
    val, test, train = (build_dataset(spec, split, 8, 1, val_fraction=0.25) for split in ("val", "test", "train"))
    assert len(val) == 5 and ids(val) == ids(test) == ids(build_dataset(spec, "val", 8, 1, val_fraction=0.25))
    assert sorted(ids(val) + ids(train)) == list(range(20))
    assert ids(val) != list(range(5)) and ids(val) != list(range(15, 20))  # spread over the data, not its end
    assert len(build_dataset(spec, "all", 8, 1, val_fraction=0.25)) == 20
    for i in range(8):
        _save(tmp_path / "folder" / f"{i}.png", np.full((8, 8), i * 30, np.uint8))
    folder_val = build_dataset(str(tmp_path / "folder"), "val", 8, 1, val_fraction=0.25)
    folder_train = build_dataset(str(tmp_path / "folder"), "train", 8, 1, val_fraction=0.25)
    assert len(folder_val) == 2 and len(folder_train) == 6
    assert not {p for p, _ in folder_val.samples} & {p for p, _ in folder_train.samples}
    with pytest.raises(DataError, match="at least 0 and below 1"):
        build_dataset(spec, "val", 8, 1, val_fraction=1.0)
    with pytest.raises(DataError, match="leaves none to train on"):
        build_dataset(spec, "val", 8, 1, val_fraction=0.99)


def test_val_fraction_on_data_with_splits_carves_val_from_train(tmp_path: Path) -> None:
    """With train/test splits, --val-fraction takes val from the train split (disjoint from what
    is trained on) and leaves the test split untouched, so choices made on val never see test."""
    for i in range(8):
        _save(tmp_path / "d" / "train" / f"{i}.png", np.full((8, 8), i * 30, np.uint8))
    for i in range(3):
        _save(tmp_path / "d" / "test" / f"{i}.png", np.full((8, 8), 250 - i, np.uint8))
    spec = str(tmp_path / "d")
    val, train, test = (build_dataset(spec, split, 8, 1, val_fraction=0.25) for split in ("val", "train", "test"))
    paths = lambda ds: {p for p, _ in ds.samples}
    assert len(val) == 2 and len(train) == 6 and not paths(val) & paths(train)
    assert paths(val) | paths(train) == paths(build_dataset(spec, "train", 8, 1))
    assert paths(test) == paths(build_dataset(spec, "test", 8, 1))
    assert data.training_splits(spec, 0.25) == ("train", "val")
    _save(tmp_path / "d" / "val" / "0.png", _noise(8, 8))
    with pytest.raises(DataError, match="already has a val split; drop --val-fraction"):
        build_dataset(spec, "val", 8, 1, val_fraction=0.25)


def test_training_splits(tmp_path: Path) -> None:
    """Training validates on held-out images only: the data's own test/val split, a carved fraction, or none."""
    _save(tmp_path / "split" / "train" / "1.png", _noise(8, 8))
    _save(tmp_path / "split" / "val" / "1.png", _noise(8, 8))
    _save(tmp_path / "flat" / "1.png", _noise(8, 8))
    assert data.training_splits("fashion-mnist") == ("train", "test")
    assert data.training_splits(str(tmp_path / "split")) == ("train", "test")  # test is served by val/
    assert data.training_splits(str(tmp_path / "flat")) == ("all", None)
    assert data.training_splits(str(tmp_path / "flat"), 0.1) == ("train", "val")


def test_check_num_classes(tmp_path: Path) -> None:
    for name in "abc":
        _save(tmp_path / name / "1.png", _noise(32, 32))
    dataset = ImageFolder(tmp_path, 32, 3)
    check_num_classes(dataset, 3)
    check_num_classes(dataset, 1000)
    with pytest.raises(DataError, match="3 classes but the model only 2"):
        check_num_classes(dataset, 2)


def test_fashion_mnist_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        FashionMNIST("train", root=tmp_path)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip IDX file."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    path.write_bytes(gzip.compress(header + array.tobytes()))


def test_fashion_mnist_idx_parsing(tmp_path: Path) -> None:
    images, labels = _noise(3 * 28, 28, channels=1).reshape(3, 28, 28), np.array([4, 0, 9], np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    dataset = FashionMNIST("test", root=tmp_path)
    assert len(dataset) == 3 and [dataset[i][1] for i in range(3)] == [4, 0, 9]
    assert torch.equal(dataset[1][0][0], torch.from_numpy(images[1]))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x03 too short"))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError, match="cannot decode .*train-images.*--reinstall"):
        FashionMNIST("train", root=tmp_path)


@pytest.mark.skipif(not HAS_FASHION_MNIST, reason="needs `apt-get install -y dataset-fashion-mnist`")
def test_fashion_mnist() -> None:
    train, test = FashionMNIST("train"), FashionMNIST("test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.classes[0] == "T-shirt/top" and train.num_classes == 10
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8
    assert label == 9 and image.float().mean() > 50  # first training item is an ankle boot
    assert sorted({test[i][1] for i in range(100)}) == list(range(10))
    rgb = build_dataset("fashion-mnist", "test", 32, 3)[0][0]
    assert rgb.shape == (3, 32, 32) and torch.equal(rgb[0], rgb[2])


@pytest.mark.skipif(not HAS_SKIMAGE, reason="needs `pip install scikit-image`")
def test_photos32_deterministic_and_disjoint() -> None:
    train, test = Photos32("train"), Photos32("test")
    assert len(train) > 1000 and len(test) > 100 and train.num_classes == len(data.PHOTOS32_SOURCES)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == 0
    data._photos32_arrays.cache_clear()  # rebuild from the photos
    again = Photos32("train")
    assert all(torch.equal(train[i][0], again[i][0]) for i in range(0, len(train), 97))
    assert np.array_equal(train.images, again.images) and np.array_equal(train.labels, again.labels)
    train_keys = {crop.tobytes() for crop in train.images}
    assert not any(crop.tobytes() in train_keys for crop in test.images)
    assert set(test.labels.tolist()) == set(range(train.num_classes))


def test_photos32_without_skimage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    data._photos32_arrays.cache_clear()
    with pytest.raises(DataError, match="pip install scikit-image"):
        Photos32("train")
    data._photos32_arrays.cache_clear()
