"""The web demo (``fractalgen demo``): upload checks, masks, streaming, cancelling and the Compress
tab's handlers without a browser, then end-to-end runs in headless Chromium (sample, edit, refused
uploads; compress, download, decompress).

The browser tests need ``pip install 'fractalgen[demo]' playwright`` and Debian's
``apt-get install -y chromium`` (never ``playwright install``). Set FRACTALGEN_SCREENSHOTS=docs to
also write ``docs/demo_sample.png``, ``docs/demo_edit.png`` and ``docs/demo_compress.png``;
FRACTALGEN_DEMO_MODEL=folder takes those screenshots with a real model instead of the tiny random one
(and FRACTALGEN_DEMO_EDIT_MODEL=folder gives the Edit tab its own, as ``fractalgen demo`` does).
"""

import contextlib
import importlib.util
import io
import math
import os
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest
import torch
from PIL import Image

from fractalgen import FractalConfig, FractalGen, InputError, load_model
from fractalgen.demo import (Cancelled, Runner, box_mask, display, fit, mask_from_editor, read_upload,
                             domain_images)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAS_GRADIO = importlib.util.find_spec("gradio") is not None
HAS_PLAYWRIGHT = importlib.util.find_spec("playwright") is not None
needs_gradio = pytest.mark.skipif(not HAS_GRADIO, reason="needs `pip install 'fractalgen[demo]'` (gradio)")
needs_browser = pytest.mark.skipif(
    not (HAS_GRADIO and HAS_PLAYWRIGHT and os.path.exists(CHROMIUM)),
    reason="needs gradio (`pip install 'fractalgen[demo]'`), `pip install playwright` and "
           "`apt-get install -y chromium` (not `playwright install`)")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NUM_ITER = (4, 2)


def tiny_model() -> FractalGen:
    torch.manual_seed(0)
    config = FractalConfig((16, 4, 1), (32, 16, 16), (1, 1, 1), (2, 2, 2), ("mar", "mar", "ar"), channels=1,
                           class_num=3, num_conds=5, class_names=("a", "b", "c"))
    return FractalGen(config).eval()


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


# ------------------------------------------------------------------------------------------------
# Without a browser
# ------------------------------------------------------------------------------------------------

def test_read_upload_checks(tmp_path):
    rng = np.random.default_rng(0)
    exact = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    image = read_upload(write_png(tmp_path / "a.png", exact), 16, 1)
    assert image.dtype == torch.uint8 and image.shape == (1, 16, 16) and np.array_equal(image[0].numpy(), exact)

    other = write_png(tmp_path / "b.png", rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    assert read_upload(other, 16, 1).shape == (1, 16, 16)            # centre-cropped, converted to grey
    assert read_upload(other, 16, 3).shape == (3, 16, 16)
    with pytest.raises(InputError, match="30x40 but the model takes 16x16"):
        read_upload(other, 16, 1, resize=False)

    text = tmp_path / "notes.png"
    text.write_text("not an image\n" * 20)
    with pytest.raises(InputError, match="notes.png is not an image"):
        read_upload(text, 16, 1)
    with pytest.raises(InputError, match="over the 0.001 MB limit"):
        read_upload(other, 16, 1, max_bytes=1000)


def test_masks_and_fit():
    box = box_mask((4, 2, 12, 10), 16)
    assert box.sum() == 8 * 8 and box[2:10, 4:12].all()
    assert box_mask((0, 0, 0, 0), 16) is None and box_mask((None,) * 4, 16) is None
    with pytest.raises(InputError, match="must satisfy"):
        box_mask((4, 4, 20, 8), 16)

    layer = np.zeros((160, 160, 4), np.uint8)
    layer[40:80, 0:160, 3] = 150                                       # a painted band, 10x canvas scale
    mask = mask_from_editor({"background": None, "layers": [layer], "composite": None}, 16)
    assert mask[4:8].all() and not mask[:4].any() and not mask[8:].any()
    assert not mask_from_editor(None, 16).any()

    image = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    assert fit(image, 16, 16) is image and fit(image, 8, 8).shape == (1, 8, 8) and fit(image, 8, 12).shape == (1, 8, 12)
    assert display(image).shape == (384, 384)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs `apt-get install -y dataset-fashion-mnist`")
def test_domain_images():
    from fractalgen import get_preset

    with torch.device("meta"):
        fmnist = FractalGen(get_preset("fractalmar_fmnist28"))
    images = domain_images(fmnist)
    assert len(images) == 6 and all(im.shape == (1, 28, 28) and im.dtype == torch.uint8 for im, _ in images)
    assert images[0][1].startswith("T-shirt/top") and domain_images(tiny_model()) == []


def _slow_call(steps: list, n: int = 10_000, delay: float = 0.002):
    def call(on_step):
        for i in range(n):
            time.sleep(delay)
            steps.append(i)
            on_step(i, n, torch.full((1, 1, 2, 2), i % 256, dtype=torch.uint8))
        return torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    return call


def _wait_idle(runner: Runner, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while runner.busy() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not runner.busy(), "the worker did not stop"


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_runner_streams_and_stops(how):
    runner, steps = Runner(frame_interval=0.0, tick=0.05), []
    stream = runner.stream("page", _slow_call(steps))
    kind, payload = next(stream)
    while kind == "tick":
        kind, payload = next(stream)
    step, total, images = payload
    assert kind == "frame" and total == 10_000 and images.shape == (1, 1, 2, 2)
    if how == "cancel":                 # the Cancel button
        assert runner.cancel("page")
        with pytest.raises(Cancelled):
            for _ in stream:
                pass
    else:                               # Gradio closing the handler's generator
        stream.close()
    _wait_idle(runner)
    done = len(steps)
    time.sleep(0.05)
    assert len(steps) == done < 10_000
    assert not runner.cancel("page")    # nothing left to cancel


def test_runner_one_at_a_time():
    runner, spans = Runner(frame_interval=0.0, tick=0.02), []

    def call(on_step):
        start = time.monotonic()
        for i in range(5):
            time.sleep(0.01)
            on_step(i, 5, torch.zeros(1, 1, 1, 1, dtype=torch.uint8))
        spans.append((start, time.monotonic()))
        return torch.ones(1, 1, 1, 1, dtype=torch.uint8)

    results = []
    threads = [threading.Thread(target=lambda k=k: results.append(list(runner.stream(k, call))[-1]))
               for k in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert [r[0] for r in results] == ["done"] * 3
    spans.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


def test_cli_registers_demo():
    import argparse

    from fractalgen.demo import add_cli

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--model", "m", "--port", "9999", "--num-iter", "4,2"])
    assert (args.host, args.port, args.num_iter, args.max_upload_mb) == ("127.0.0.1", 9999, (4, 2), 10.0)


@needs_gradio
@pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a page is a warnings.warn
def test_handlers_stream_frames(tmp_path, monkeypatch):
    from fractalgen.demo import NO_CLASS, build_app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    app = build_app(tiny_model(), num_iter=NUM_ITER, frame_interval=0.0)
    handlers = app.fractalgen_handlers
    outs = list(handlers["sample"](NO_CLASS, 2, 1.0, 1.0, 0, None))
    frames = [o for o in outs if isinstance(o[0], np.ndarray)]
    assert len(frames) == NUM_ITER[0] + 1                      # one per level-0 step, then the final grid
    assert Path(outs[-1][1]).is_file() and "done" in outs[-1][2]
    bad = list(handlers["sample"](NO_CLASS, 99, 1.0, 1.0, 0, None))
    assert "number of images must be 1..16" in bad[-1][2]
    upload = handlers["upload"](str(write_png(tmp_path / "x.png", np.zeros((16, 16), np.uint8))), True)
    assert upload[0].shape == (1, 16, 16)
    edit = list(handlers["edit"](upload[0], upload[1], "uncrop", 0, 0, 16, 8, 0, 0, 0, 0, NO_CLASS, 1.0, 1.0, 0, None))
    result = np.asarray(Image.open(edit[-1][3]))
    assert "done" in edit[-1][4] and (result[:8] == 0).all()
    outside = list(handlers["edit"](upload[0], upload[1], "outpaint", 0, 0, 0, 0, 0, 20, 0, 0, NO_CLASS, 1.0, 1.0, 0,
                                    None))
    assert "outpaint: give margins" in outside[-1][4]


@needs_gradio
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_edit_tab_uses_its_own_model(tmp_path, monkeypatch):
    """With ``edit_model`` the Edit tab's uploads, test images and edits go to that model (here 8x8)
    while the Sample tab keeps the main one (16x16)."""
    from fractalgen.demo import NO_CLASS, build_app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    editor = FractalGen(FractalConfig((8, 4, 1), (32, 16, 16), (1, 1, 1), (2, 2, 2), ("ar", "ar", "ar"),
                                      channels=1, class_num=3, num_conds=1)).eval()
    handlers = build_app(tiny_model(), num_iter=NUM_ITER, frame_interval=0.0, edit_model=editor).fractalgen_handlers
    upload = handlers["upload"](str(write_png(tmp_path / "x.png", np.zeros((16, 16), np.uint8))), True)
    assert upload[0].shape == (1, 8, 8)
    edit = list(handlers["edit"](upload[0], upload[1], "inpaint", 0, 4, 8, 8, 0, 0, 0, 0, NO_CLASS, 1.0, 1.0, 0, None))
    result = np.asarray(Image.open(edit[-1][3]))
    assert "done" in edit[-1][4] and result.shape == (8, 8) and (result[:4] == 0).all()
    grid = list(handlers["sample"](NO_CLASS, 1, 1.0, 1.0, 0, None))[-1]
    assert min(np.asarray(Image.open(grid[1])).shape[:2]) >= 16  # a 16x16 image and the grid's padding


@needs_gradio
def test_demo_command_edits_with_the_edit_model_unless_given_a_model(monkeypatch, capsys):
    """``fractalgen demo`` alone: the default model everywhere but the Edit tab, which gets the shipped
    editing model when that is another one; with --model, that model everywhere unless --edit-model
    says otherwise; --edit-preset goes with the edit model's .pth only."""
    from fractalgen import cli_common, demo
    from fractalgen.checkpoint import DEFAULT_MODEL
    from fractalgen.cli import main

    loaded, built = [], []

    def fake_load(ref, preset=None, **kwargs):
        loaded.append(ref if preset is None else (ref, preset))
        return tiny_model()

    monkeypatch.setattr(cli_common, "load_model", fake_load)
    monkeypatch.setattr(demo, "load_model", fake_load)
    monkeypatch.setattr(demo, "build_app", lambda model, **kwargs: built.append((model, kwargs["edit_model"])))
    monkeypatch.setattr(demo, "serve", lambda *args, **kwargs: None)
    monkeypatch.setattr(demo, "EDIT_MODEL", "editor")  # today's shipped editing model is the default one
    for argv, refs, same in [([], [DEFAULT_MODEL, "editor"], False), (["--model", "mine"], ["mine"], True),
                             (["--model", "mine", "--edit-model", "other"], ["mine", "other"], False),
                             (["--model", "a.pth", "--preset", "fractalar_in64", "--edit-model", "b.pth",
                               "--edit-preset", "fractalmar_in64"],
                              [("a.pth", "fractalar_in64"), ("b.pth", "fractalmar_in64")], False),
                             (["--model", "a.pth", "--preset", "fractalar_in64", "--edit-model", "a.pth",
                               "--edit-preset", "fractalmar_in64"],
                              [("a.pth", "fractalar_in64"), ("a.pth", "fractalmar_in64")], False)]:
        loaded.clear(), built.clear()
        assert main(["demo", *argv]) == 0
        assert loaded == refs and (built[0][0] is built[0][1]) == same
    loaded.clear()
    assert main(["demo", "--edit-preset", "fractalmar_in64"]) == 2
    assert "give --edit-model too" in capsys.readouterr().err and loaded == []


@needs_gradio
@pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a page is a warnings.warn
def test_internal_errors_show_a_short_message_and_log_the_details(tmp_path, monkeypatch, caplog):
    from fractalgen.demo import NO_CLASS, build_app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    model = tiny_model()

    def broken(**kwargs):
        raise RuntimeError("CUDA kernel 0x1f failed in secret_module.py")

    monkeypatch.setattr(model, "sample", broken)
    app = build_app(model, num_iter=NUM_ITER, frame_interval=0.0)
    status = list(app.fractalgen_handlers["sample"](NO_CLASS, 2, 1.0, 1.0, 0, None))[-1][2]
    assert "something went wrong" in status and "details are in its log" in status
    assert "secret_module" not in status and "RuntimeError" not in status
    assert "secret_module.py" in caplog.text and "Traceback" in caplog.text


# ------------------------------------------------------------------------------------------------
# Compress tab, without a browser
# ------------------------------------------------------------------------------------------------

def _png_size(array: np.ndarray) -> int:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", optimize=True)
    return len(buffer.getvalue())


def _number(cell: str) -> int:
    return int(cell.replace(",", ""))


def test_lossless_sizes_code_each_image_check_it_and_name_missing_codecs(monkeypatch):
    from fractalgen import image_codecs

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16), dtype=np.uint8), np.full((16, 16, 3), 7, np.uint8)]
    sizes = image_codecs.lossless_sizes(images)
    assert sizes[image_codecs.PNG] == sum(_png_size(a) for a in images)       # one PNG file per image
    assert all(isinstance(v, int) and v > 0 for v in sizes.values() if v != image_codecs.NO_IMAGECODECS)
    assert len(sizes) == 3 and list(sizes)[1].startswith("WebP lossless") and list(sizes)[2].startswith("JPEG-XL")
    monkeypatch.setattr(image_codecs, "_imagecodecs", lambda: None)
    assert image_codecs.lossless_sizes(images)["JPEG-XL lossless (imagecodecs, effort 9)"] == \
        "n/a (pip install imagecodecs)"
    lossy = {"lossy": (lambda a: a.tobytes(), lambda data: np.zeros((16, 16), np.uint8))}
    with pytest.raises(RuntimeError, match="lossy did not decode an image exactly"):
        image_codecs.lossless_sizes(images, lossy)


@needs_gradio
@pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a page is a warnings.warn
def test_compress_handlers_report_the_real_file_and_roundtrip(tmp_path, monkeypatch):
    from fractalgen.codec import decompress
    from fractalgen.demo import build_app
    from fractalgen.demo_compress import CompressHandlers

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    model = tiny_model()
    handlers = build_app(model, num_iter=NUM_ITER, frame_interval=0.0).fractalgen_handlers
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(3)]
    paths = [str(write_png(tmp_path / f"img{i}.png", a)) for i, a in enumerate(arrays)]
    sizes, heat, note, download, status = list(handlers["compress_uploads"](paths, False, False))[-1]
    data = Path(download).read_bytes()
    assert download.endswith(".fgz") and "done: 3 uploaded image(s)" in status
    rows = {row[0]: row for row in sizes}
    whole = rows[".fgz, whole file (this model)"]
    assert _number(whole[1]) == len(data) and float(whole[2]) == pytest.approx(8 * len(data) / (3 * 16 * 16), abs=1e-3)
    assert _number(rows[".fgz: coded pixels (payload)"][1]) + _number(rows[".fgz: container (index, CRC32s, names)"][1]) \
        == len(data)
    assert _number(rows["PNG (Pillow, optimize), one file per image"][1]) == sum(_png_size(a) for a in arrays)
    assert heat.ndim == 3 and heat.shape[2] == 3 and "Colour scale: 0 (black)" in note

    images, labels = decompress(model, data)                           # the downloaded file, bit for bit
    assert labels is None and np.array_equal(images[:, 0].numpy(), np.stack(arrays))
    gallery, shown = handlers["decompress"](download)
    assert [name for _, name in gallery] == ["img0.png", "img1.png", "img2.png"] and "decoded 3 image(s)" in shown
    assert all(np.array_equal(image, a) for (image, _), a in zip(gallery, arrays))

    wrong = str(write_png(tmp_path / "wide.png", np.zeros((16, 20), np.uint8)))
    refused = list(handlers["compress_uploads"]([wrong], False, False))[-1][-1]
    assert "wide.png is 20x16 but the model takes 16x16 images" in refused and "--resize" in refused
    assert "done: 1 uploaded" in list(handlers["compress_uploads"]([wrong], True, False))[-1][-1]
    assert "1..16 images per request" in list(handlers["compress_tests"](99, None))[-1][-1]
    corrupt = bytearray(data)
    corrupt[-1] ^= 0x10
    (tmp_path / "corrupt.fgz").write_bytes(bytes(corrupt))
    gallery, shown = handlers["decompress"](str(tmp_path / "corrupt.fgz"))
    assert gallery is None and "corrupt (CRC32 mismatch)" in shown and "fg-error" in shown
    torch.manual_seed(1)
    other = CompressHandlers(FractalGen(model.config).eval(), Runner(), tmp_path)
    assert "compressed with another model" in other.run_decompress(download)[1]


@needs_gradio
def test_compress_heat_map_adds_up_to_the_exact_likelihood(tmp_path):
    import re

    from fractalgen.codec import decompress, read_header
    from fractalgen.demo_compress import CompressHandlers

    torch.manual_seed(0)
    config = FractalConfig((8, 4, 1), (32, 16, 16), (1, 1, 1), (2, 2, 2), ("ar", "ar", "ar"), channels=1,
                           class_num=0, num_conds=1)
    model = FractalGen(config).eval()
    handlers = CompressHandlers(model, Runner(frame_interval=0.0), tmp_path)
    sizes, heat, note, download, status = list(handlers.run_test_images(2, None))[-1]
    assert "2 image(s) generated by the model" in status      # no test set for this model
    data = Path(download).read_bytes()
    images, _ = decompress(model, data)
    nll_bits = float(model.nll(images)[0].double().sum()) * 8 * 8
    total = float(re.search(r"add up to ([\d,]+) bits", note).group(1).replace(",", ""))
    assert total == pytest.approx(nll_bits, abs=0.6)
    assert f"coded payload is {8 * sum(read_header(data).group_bytes):,} bits" in note


# ------------------------------------------------------------------------------------------------
# In a browser
# ------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fetch_png(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=10) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())))


def _upload(page, path: Path) -> None:
    with page.expect_file_chooser() as chooser:
        page.click("#edit-upload")
    chooser.value.set_files(str(path))


def _wait_text(page, selector: str, text: str, timeout: float = 30_000) -> None:
    page.wait_for_function("([sel, text]) => (document.querySelector(sel)?.innerText || '').includes(text)",
                           arg=[selector, text], timeout=timeout)


@contextlib.contextmanager
def served_demo_page(tmp_path: Path, monkeypatch, height: int):
    """Serve the demo of a tiny model (of FRACTALGEN_DEMO_MODEL when FRACTALGEN_SCREENSHOTS asks
    for screenshots) and open it in Chromium, offline: yields (model, url, page, real model path)."""
    from playwright.sync_api import sync_playwright

    from fractalgen.demo import build_app, serve

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    real = os.environ.get("FRACTALGEN_DEMO_MODEL") if os.environ.get("FRACTALGEN_SCREENSHOTS") else None
    if real:
        model, num_iter = load_model(real), ()
    else:
        tiny_model().save_pretrained(tmp_path / "model")
        model, num_iter = load_model(tmp_path / "model"), NUM_ITER
    edit_ref = os.environ.get("FRACTALGEN_DEMO_EDIT_MODEL") if real else None
    editor = load_model(edit_ref) if edit_ref else None
    app = build_app(model, num_iter=num_iter, edit_model=editor)  # uploads up to 10 MB
    port = _free_port()
    serve(app, port=port, block=False, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, env={
                **os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "XDG_CACHE_HOME": str(tmp_path / "xdg")})
            try:
                page = browser.new_page(viewport={"width": 1280, "height": height})
                page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(url) else r.abort())
                page.goto(url)
                page.wait_for_selector("#sample-go", timeout=60_000)
                yield model, url, page, real
            finally:
                browser.close()
    finally:
        app.close()


@needs_browser
def test_browser_end_to_end(tmp_path, monkeypatch):
    started = time.monotonic()
    shots = os.environ.get("FRACTALGEN_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
    with served_demo_page(tmp_path, monkeypatch, height=1150) as (model, url, page, real):
        s, c = model.config.image_size, model.config.channels
        rng = np.random.default_rng(0)
        source = rng.integers(0, 256, (s, s) if c == 1 else (s, s, c), dtype=np.uint8)
        domain = domain_images(model) if real else []
        if domain:  # a real picture for the screenshots
            source = display(domain[min(2, len(domain) - 1)][0], 1)
        count = 8 if real else 2
        source_png = write_png(tmp_path / "input.png", source)
        big_png = write_png(tmp_path / "big.png", source)
        with open(big_png, "ab") as file:  # a valid PNG with 10 MB of trailing bytes
            file.write(bytes(10_100_000))
        fake_png = tmp_path / "notes.png"
        fake_png.write_text("this is a text file, not an image\n" * 20)
        assert big_png.stat().st_size > 10_000_000

        # Sample tab: a few images, live canvas, then the grid as a PNG download.
        page.fill("#sample-count input[type=number]", str(count))
        page.press("#sample-count input[type=number]", "Enter")
        page.click("#sample-go")
        page.wait_for_selector("#sample-file a", timeout=60_000)
        _wait_text(page, "#sample-status", f"done: {count} image(s)")
        grid = _fetch_png(page.locator("#sample-file a").first.get_attribute("href"))
        ncol = math.ceil(math.sqrt(count))                    # make_grid: 2-pixel white padding
        assert grid.shape[:2] == (math.ceil(count / ncol) * (s + 2) + 2, ncol * (s + 2) + 2)
        assert page.locator("#sample-canvas img").count() == 1
        if shots:
            page.screenshot(path=str(Path(shots) / "demo_sample.png"))

        # Edit tab: refused uploads first, then inpaint a box plus a brush stroke.
        page.get_by_role("tab", name="Edit").click()
        _upload(page, fake_png)
        _wait_text(page, "#edit-status", "notes.png is not an image file")
        _upload(page, big_png)
        page.wait_for_function("document.body.innerText.includes('big.png') && "
                               "document.body.innerText.includes('maximum allowed size')", timeout=30_000)
        page.get_by_label("outpaint").check()                 # mode switches show their inputs
        page.wait_for_selector("#edit-pad-top", state="visible")
        page.get_by_label("inpaint").check()
        page.wait_for_selector("#edit-pad-top", state="hidden")
        _upload(page, source_png)
        _wait_text(page, "#edit-status", "loaded input.png")
        box = (s // 4, s // 4, s // 2, 3 * s // 4)              # left, top, right, bottom
        for name, value in zip(("left", "top", "right", "bottom"), box):
            page.fill(f"#edit-{name} input", str(value))
        page.click("#edit-editor button[aria-label=Brush]")
        canvas = page.locator("#edit-editor canvas").first.bounding_box()
        y = canvas["y"] + canvas["height"] * 0.5                 # the image sits in the middle
        page.mouse.move(canvas["x"] + canvas["width"] * 0.6, y)   # right half, beside the box
        page.mouse.down()
        page.mouse.move(canvas["x"] + canvas["width"] * 0.7, y, steps=8)
        page.mouse.up()
        time.sleep(0.5)
        page.click("#edit-go")
        page.wait_for_selector("#edit-file a", timeout=60_000)
        _wait_text(page, "#edit-status", "done: inpaint")
        result = _fetch_png(page.locator("#edit-file a").first.get_attribute("href"))
        shown_mask = _fetch_png(urljoin(url, page.locator("#edit-mask img").first.get_attribute("src")))
        factor = shown_mask.shape[0] // s
        mask = shown_mask[::factor, ::factor] > 127
        mask = mask if mask.ndim == 2 else mask[..., 0]
        left, top, right, bottom = box
        assert mask[top:bottom, left:right].all(), "the box is part of the mask"
        assert mask.sum() > (right - left) * (bottom - top), "the brush stroke is part of the mask"
        assert result.shape == source.shape
        keep = ~mask if c == 1 else ~mask[..., None].repeat(c, -1)
        assert np.array_equal(result[keep], source[keep]), "pixels outside the mask changed"
        assert not np.array_equal(result[~keep], source[~keep]), "nothing was regenerated"
        for pane in ("#edit-input", "#edit-mask", "#edit-result"):
            assert page.locator(f"{pane} img").count() == 1
        if shots:
            page.screenshot(path=str(Path(shots) / "demo_edit.png"), full_page=True)
    assert time.monotonic() - started < 90


def _size_cell(page, row: str, column: int) -> str | None:
    """A cell of the Compress tab's size table (a grid of role=row / role=gridcell), by the start of
    its row's first cell."""
    return page.evaluate("""([row, column]) => {
        const rows = [...document.querySelectorAll('#compress-sizes [role=row]')].map(
            r => [...r.querySelectorAll('[role=gridcell]')].map(c => c.innerText.trim()));
        const found = rows.find(cells => (cells[0] || '').startsWith(row));
        return found ? found[column] : null;
    }""", [row, column])


@needs_browser
def test_browser_compress_tab(tmp_path, monkeypatch):
    from fractalgen.codec import decompress

    started = time.monotonic()
    shots = os.environ.get("FRACTALGEN_SCREENSHOTS")
    with served_demo_page(tmp_path, monkeypatch, height=1300) as (model, url, page, real):
        s, c = model.config.image_size, model.config.channels
        rng = np.random.default_rng(0)
        uploads = [rng.integers(0, 256, (s, s) if c == 1 else (s, s, c), dtype=np.uint8) for _ in range(2)]
        upload_paths = [write_png(tmp_path / f"upload{i}.png", a) for i, a in enumerate(uploads)]
        count = 8 if real else 3
        page.get_by_role("tab", name="Compress").click()

        # Test images: the size table with the .fgz row (its bytes = the download's), the heat map.
        page.fill("#compress-count input[type=number]", str(count))
        page.press("#compress-count input[type=number]", "Enter")
        page.click("#compress-tests")
        _wait_text(page, "#compress-status", f"done: {count} ", timeout=120_000)
        page.wait_for_selector("#compress-file a", timeout=30_000)
        first_link = page.locator("#compress-file a").first.get_attribute("href")
        with urllib.request.urlopen(first_link) as r:
            tests_fgz = r.read()
        assert _number(_size_cell(page, ".fgz, whole file", 1)) == len(tests_fgz)
        assert _size_cell(page, "PNG (Pillow, optimize)", 1)[0].isdigit()
        assert page.locator("#compress-heatmap img").count() == 1
        _wait_text(page, "#compress-heat-note", "Colour scale")
        (tmp_path / "tests.fgz").write_bytes(tests_fgz)
        page.set_input_files("#decompress-file input[type=file]", str(tmp_path / "tests.fgz"))
        _wait_text(page, "#decompress-status", f"decoded {count} image(s) from tests.fgz", timeout=60_000)
        page.wait_for_function("(n) => [...document.querySelectorAll('#decompress-gallery img')]"
                               ".filter(img => img.complete && img.naturalWidth > 0).length == n", arg=count)
        if shots:
            page.screenshot(path=str(Path(shots) / "demo_compress.png"), full_page=True)

        # Uploaded PNGs: the downloaded .fgz decodes to their pixels.
        page.set_input_files("#compress-files input[type=file]", [str(p) for p in upload_paths])
        page.wait_for_function("document.querySelector('#compress-files').innerText.includes('upload1')",
                               timeout=30_000)
        page.click("#compress-go")
        _wait_text(page, "#compress-status", "done: 2 uploaded image(s)", timeout=60_000)
        page.wait_for_function("(old) => document.querySelector('#compress-file a')?.href !== old",
                               arg=first_link)
        with urllib.request.urlopen(page.locator("#compress-file a").first.get_attribute("href")) as r:
            fgz = r.read()
        assert fgz != tests_fgz and _number(_size_cell(page, ".fgz, whole file", 1)) == len(fgz)
        decoded, _ = decompress(model, fgz)
        assert all(np.array_equal(to_hwc(d), a) for d, a in zip(decoded, uploads))

        # Decompress: upload that .fgz, the gallery shows the same pixels; a corrupt file is refused.
        (tmp_path / "roundtrip.fgz").write_bytes(fgz)
        page.locator("#decompress-file button[aria-label='Clear']").first.click()
        page.set_input_files("#decompress-file input[type=file]", str(tmp_path / "roundtrip.fgz"))
        _wait_text(page, "#decompress-status", "decoded 2 image(s) from roundtrip.fgz", timeout=60_000)
        page.wait_for_function("document.querySelectorAll('#decompress-gallery img').length == 2")
        sources = [img.get_attribute("src") for img in page.locator("#decompress-gallery img").all()]
        shown = [_fetch_png(urljoin(url, src)) for src in sources]
        assert all(np.array_equal(a, b) for a, b in zip(shown, uploads)), "decoded pixels differ"
        corrupt = bytearray(fgz)
        corrupt[-1] ^= 0x10
        (tmp_path / "corrupt.fgz").write_bytes(bytes(corrupt))
        page.locator("#decompress-file button[aria-label='Clear']").first.click()
        page.set_input_files("#decompress-file input[type=file]", str(tmp_path / "corrupt.fgz"))
        _wait_text(page, "#decompress-status", "corrupt (CRC32 mismatch)")
    assert time.monotonic() - started < 90


def to_hwc(image: torch.Tensor) -> np.ndarray:
    """uint8 (C, H, W) as the array a PNG of it holds: (H, W) grey, (H, W, C) otherwise."""
    array = image.numpy().transpose(1, 2, 0)
    return array[:, :, 0] if array.shape[2] == 1 else array
