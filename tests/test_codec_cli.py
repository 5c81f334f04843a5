"""``fractalgen compress`` / ``decompress`` on image files: exact roundtrips, names, --info, and
one-line errors that leave no output behind."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fractalgen.cli import main
from fractalgen.container import VERSION
from test_codec import samples, tiny


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    """A saved grey 8x8 model with labels, and a folder of five PNGs it finds likely."""
    root = tmp_path_factory.mktemp("grey")
    model = tiny(channels=1)
    model.save_pretrained(root / "model")
    images, _ = samples(model)
    (root / "pngs").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(root / "pngs" / f"shirt {i}.png")
    return root


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_compress_a_folder_and_decompress_it(grey, tmp_path, capsys):
    fgz = tmp_path / "a.fgz"
    code, out, _ = run(capsys, "compress", grey / "pngs", "--out", fgz, "--model", grey / "model", "--group-size", 2)
    assert code == 0 and "5 images" in out and "bits/dim" in out
    code, out, _ = run(capsys, "compress", "--info", fgz, "--model", grey / "model")
    assert code == 0 and "5 images" in out and "(the model given)" in out and "shirt 0.png" in out
    code, _, _ = run(capsys, "decompress", fgz, "--out", tmp_path / "out", "--model", grey / "model")
    assert code == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [f"shirt {i}.png" for i in range(5)]
    for name in written:
        assert np.array_equal(pixels(tmp_path / "out" / name), pixels(grey / "pngs" / name))


def test_decompress_one_image_by_name(grey, tmp_path, capsys):
    fgz = tmp_path / "a.fgz"
    assert run(capsys, "compress", grey / "pngs", "--out", fgz, "--model", grey / "model", "--group-size", 2)[0] == 0
    code, _, _ = run(capsys, "decompress", fgz, "--out", tmp_path / "one", "--model", grey / "model",
                     "--image", "shirt 3.png")
    assert code == 0 and [p.name for p in (tmp_path / "one").iterdir()] == ["shirt 3.png"]
    code, _, err = run(capsys, "decompress", fgz, "--out", tmp_path / "none", "--model", grey / "model",
                       "--image", "coat.png")
    assert code == 2 and "coat.png is not in" in err and not (tmp_path / "none").exists()


def test_other_file_types_keep_their_pixels_and_get_png_names(grey, tmp_path, capsys):
    """A grey image stored as RGB and a BMP are taken exactly; decompression names them .png."""
    grey_rgb = pixels(grey / "pngs" / "shirt 0.png")
    Image.fromarray(np.stack([grey_rgb] * 3, -1)).save(tmp_path / "rgb.png")
    Image.open(grey / "pngs" / "shirt 1.png").save(tmp_path / "bitmap.bmp")
    fgz = tmp_path / "b.fgz"
    assert run(capsys, "compress", tmp_path / "rgb.png", tmp_path / "bitmap.bmp", "--out", fgz,
               "--model", grey / "model")[0] == 0
    assert run(capsys, "decompress", fgz, "--out", tmp_path / "out", "--model", grey / "model")[0] == 0
    assert np.array_equal(pixels(tmp_path / "out" / "rgb.png"), grey_rgb)
    assert np.array_equal(pixels(tmp_path / "out" / "bitmap.png"), pixels(grey / "pngs" / "shirt 1.png"))


@pytest.mark.parametrize("make, flag, message", [
    (lambda: Image.new("L", (10, 8)), "--resize", "is 10x8 but the model takes 8x8 images"),
    (lambda: Image.new("RGB", (8, 8), (255, 0, 0)), "--convert", "has colour but the model takes L images"),
    (lambda: Image.new("LA", (8, 8), (9, 100)), "--convert", "has transparency"),
    (lambda: Image.new("I;16", (8, 8), 4000), "--convert", "has I;16 pixels"),
])
def test_images_the_model_cannot_hold_exactly_are_refused_until_converted(grey, tmp_path, capsys, make, flag,
                                                                        message):
    make().save(tmp_path / "odd.png")
    fgz = tmp_path / "c.fgz"
    code, _, err = run(capsys, "compress", tmp_path / "odd.png", "--out", fgz, "--model", grey / "model")
    assert code == 2 and message in err and flag in err and "\n" not in err.strip()
    assert not fgz.exists()
    assert run(capsys, "compress", tmp_path / "odd.png", "--out", fgz, "--model", grey / "model", flag)[0] == 0
    assert run(capsys, "decompress", fgz, "--out", tmp_path / "out", "--model", grey / "model")[0] == 0
    assert pixels(tmp_path / "out" / "odd.png").shape == (8, 8)


def test_rgb_model_takes_rgb_and_refuses_transparency(tmp_path, capsys):
    tiny(channels=3, class_num=0).save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA").save(tmp_path / "rgba.png")
    fgz, model = tmp_path / "d.fgz", tmp_path / "model"
    code, _, err = run(capsys, "compress", tmp_path / "rgba.png", "--out", fgz, "--model", model)
    assert code == 2 and "has transparency but the model takes RGB images" in err
    code, _, err = run(capsys, "compress", tmp_path / "rgb.png", "--out", fgz, "--model", model, "--labels", "1")
    assert code == 2 and "unconditional" in err
    assert run(capsys, "compress", tmp_path / "rgb.png", "--out", fgz, "--model", model)[0] == 0
    assert run(capsys, "decompress", fgz, "--out", tmp_path / "out", "--model", model)[0] == 0
    assert np.array_equal(pixels(tmp_path / "out" / "rgb.png"), pixels(tmp_path / "rgb.png"))


@pytest.fixture
def coded(grey, tmp_path, capsys):
    fgz = tmp_path / "a.fgz"
    assert run(capsys, "compress", grey / "pngs", "--out", fgz, "--model", grey / "model", "--group-size", 2,
               "--labels", "0,1,2,3,4")[0] == 0
    return fgz, fgz.read_bytes()


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


@pytest.mark.parametrize("damage, message", [
    (_flip_last, "corrupt"),
    (lambda d: d[:-9], "truncated"),
    (lambda d: d[:4] + bytes([VERSION + 1]) + d[5:], f"format version {VERSION + 1}"),
    (lambda d: b"GIF89a" + d[6:], "not a fractalgen compressed file"),
])
def test_damaged_files_are_refused_and_nothing_is_written(grey, coded, tmp_path, capsys, damage, message):
    """The last group is damaged (the first two decode fine): still no PNG is written."""
    fgz, data = coded
    fgz.write_bytes(damage(data))
    code, _, err = run(capsys, "decompress", fgz, "--out", tmp_path / "out", "--model", grey / "model")
    assert code == 2 and message in err and err.startswith("fractalgen: error:") and "\n" not in err.strip()
    assert not (tmp_path / "out").exists()


def test_another_model_is_refused(coded, tmp_path, capsys):
    fgz, _ = coded
    tiny(channels=1, seed=3).save_pretrained(tmp_path / "other")
    (tmp_path / "out").mkdir()
    code, _, err = run(capsys, "decompress", fgz, "--out", tmp_path / "out", "--model", tmp_path / "other")
    assert code == 2 and "compressed with another model" in err
    assert list((tmp_path / "out").iterdir()) == []
    code, out, _ = run(capsys, "compress", "--info", fgz, "--model", tmp_path / "other")
    assert code == 0 and "(not the model given)" in out


def test_existing_outputs_are_kept_unless_forced(grey, coded, tmp_path, capsys):
    fgz, data = coded
    code, _, err = run(capsys, "compress", grey / "pngs", "--out", fgz, "--model", grey / "model")
    assert code == 2 and "exists" in err and "--force" in err and fgz.read_bytes() == data
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "shirt 2.png").write_bytes(b"mine")
    code, _, err = run(capsys, "decompress", fgz, "--out", tmp_path / "out", "--model", grey / "model")
    assert code == 2 and "shirt 2.png exists" in err and (tmp_path / "out" / "shirt 2.png").read_bytes() == b"mine"
    assert run(capsys, "decompress", fgz, "--out", tmp_path / "out", "--model", grey / "model", "--force")[0] == 0
    assert len(list((tmp_path / "out").iterdir())) == 5


@pytest.mark.parametrize("argv, message", [
    (["--labels", "1,2"], "--labels gives 2 classes for 5 images"),
    (["--labels", "12"], "class id 12 is out of range"),
])
def test_bad_labels_are_named(grey, tmp_path, capsys, argv, message):
    code, _, err = run(capsys, "compress", grey / "pngs", "--out", tmp_path / "e.fgz", "--model", grey / "model", *argv)
    assert code == 2 and message in err and not (tmp_path / "e.fgz").exists()


def test_bad_inputs_are_named(grey, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "a").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "a" / "x.png")
    Image.new("L", (8, 8)).save(tmp_path / "x.jpg")
    cases = [([tmp_path / "missing.png"], "does not exist"),
             ([tmp_path / "empty"], "no image files"),
             ([tmp_path / "notes.png"], "is not a readable image"),
             ([tmp_path / "a", tmp_path / "x.jpg"], "would both decompress to x.png")]
    for inputs, message in cases:
        code, _, err = run(capsys, "compress", *inputs, "--out", tmp_path / "f.fgz", "--model", grey / "model")
        assert code == 2 and message in err, err
    assert not (tmp_path / "f.fgz").exists()
    code, _, err = run(capsys, "decompress", tmp_path / "nothing.fgz", "--out", tmp_path / "o")
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "compress", tmp_path / "x.jpg")
    assert code == 2 and "--out FILE.fgz" in err
