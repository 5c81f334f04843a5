"""Local web demo: sample and edit images in the browser (``fractalgen demo``).

Needs the optional extra: ``pip install 'fractalgen[demo]'`` (Gradio). Two tabs:

* **Sample**: class, number of images, guidance, temperature and seed; the canvas updates live
  after every level-0 step, then shows the final grid with a PNG download.
* **Edit**: upload an image (or pick a test image), paint the region to regenerate with the brush
  or give a box, and inpaint / outpaint / uncrop / class-edit it (``fractalgen.edit``); input,
  mask and result are shown side by side, the result is a PNG download.

How it works: every generation runs ``model.sample(..., on_step=...)`` (directly or through
``fractalgen.edit``) in a worker thread. ``on_step`` copies the level-0 canvas into a queue, and
the Gradio event handler -- a generator -- drains that queue and yields the latest frame at most
``frame_interval`` seconds apart, so the browser redraws while pixels are generated. All
generating events share one Gradio concurrency group with limit 1 (one generation per server,
the rest wait in Gradio's queue); a lock around the model call also covers a worker still
finishing a step after its event was cancelled. The Cancel button cancels the Gradio event
(``cancels=``) and sets the session's cancel flag; the next ``on_step`` then raises
``Cancelled`` inside the worker, which stops the model cooperatively. Closing the handler's
generator (Gradio does this on cancel and on disconnect) sets the same flag.

Safety: the server binds 127.0.0.1 unless ``--host`` says otherwise (with a warning). Uploads
are limited in bytes (``--max-upload-mb``, enforced by Gradio and again by the handler) and in
decoded pixels, must decode as images, and must fit the model (other sizes are centre-cropped
and resized on request). Downloads and Gradio's own files go to temporary folders
(``GRADIO_TEMP_DIR`` is pointed at a fresh ``tempfile`` folder unless already set).
"""

import argparse
import atexit
import html
import inspect
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .errors import FractalGenError, InputError
from .runtime import MODES as PIL_MODES, pil_to_tensor

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 10.0
#: Decoded-pixel limit for uploads (a small file can decode to a huge image).
MAX_UPLOAD_PIXELS = 40_000_000
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MODES = ("inpaint", "outpaint", "uncrop", "class edit")
NO_CLASS = -1
CLASS_EDIT_CFG = 3.0
BOX_REGENERATE = "Box to regenerate, in model pixels (left, top, right, bottom; all 0 = only the painted region)"
BOX_KEEP = "Box to keep, in model pixels (left, top, right, bottom); everything around it is generated"
_GRADIO_HINT = "the web demo needs Gradio: pip install 'fractalgen[demo]'"


class Cancelled(Exception):
    """Raised from ``on_step`` to stop a generation the user cancelled."""


# ------------------------------------------------------------------------------------------------
# Image helpers (no Gradio needed)
# ------------------------------------------------------------------------------------------------

def read_upload(path: str | os.PathLike, image_size: int, channels: int,
                max_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1e6), resize: bool = True) -> Tensor:
    """Read an uploaded image file as uint8 (C, S, S) for a model of ``image_size`` and
    ``channels``; InputError for files that are too large, not images, or the wrong size when
    ``resize`` is off (with ``resize`` the ADM centre crop makes them fit)."""
    from .data import center_crop_arr

    path = Path(path)
    name = path.name
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(f"upload refused: {name} is {size / 1e6:.1f} MB, over the "
                         f"{max_bytes / 1e6:g} MB limit of this server (--max-upload-mb)")
    try:
        with Image.open(path) as pil:
            width, height = pil.size
            if width * height > MAX_UPLOAD_PIXELS:
                raise InputError(f"upload refused: {name} is {width}x{height} pixels, over the "
                                 f"{MAX_UPLOAD_PIXELS / 1e6:g} megapixel limit")
            pil.load()
            pil = pil.convert(PIL_MODES[channels])
    except InputError:
        raise
    except KeyError:
        raise InputError(f"this model has {channels} channels; the demo shows 1, 3 or 4") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise InputError(f"upload refused: {name} is not an image file that can be read "
                         "(PNG, JPEG, WebP, GIF, BMP, TIFF ...)") from None
    if pil.size != (image_size, image_size):
        if not resize:
            raise InputError(f"{name} is {pil.width}x{pil.height} but the model takes {image_size}x{image_size}; "
                             "tick 'centre-crop and resize uploads' or upload an image of that size")
        pil = center_crop_arr(pil, image_size)
    return pil_to_tensor(pil, channels)


def fit(image: Tensor, height: int, width: int) -> Tensor:
    """Scale and centre-crop uint8 (C, H, W) to (C, height, width) (ADM crop when square)."""
    from .data import center_crop_arr
    from .runtime import to_pil

    c, h, w = image.shape
    if (h, w) == (height, width):
        return image
    pil = to_pil(image)
    if height == width:
        pil = center_crop_arr(pil, height)
    else:
        scale = max(width / w, height / h)
        pil = pil.resize((max(width, round(w * scale)), max(height, round(h * scale))), Image.BICUBIC)
        left, top = (pil.width - width) // 2, (pil.height - height) // 2
        pil = pil.crop((left, top, left + width, top + height))
    return pil_to_tensor(pil, c)


def display(image: Tensor, target: int = 384) -> np.ndarray:
    """uint8 (C, H, W) -> (H', W'[, C]) array enlarged by an integer factor (nearest) to about
    ``target`` pixels, for showing small images crisply."""
    c, h, w = image.shape
    factor = max(1, target // max(h, w))
    array = image.detach().cpu().numpy().transpose(1, 2, 0)
    if factor > 1:
        array = array.repeat(factor, 0).repeat(factor, 1)
    return array[:, :, 0] if c == 1 else array


def mask_from_editor(value: Any, image_size: int, coverage: float = 0.25) -> Tensor:
    """The painted region of an ImageEditor value as a (S, S) bool mask: a pixel is regenerated
    when at least ``coverage`` of its area is painted (layer alpha > 0, at any canvas size)."""
    mask = torch.zeros(image_size, image_size, dtype=torch.bool)
    if not isinstance(value, dict):
        return mask
    alphas = []
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[2] == 4:
            alphas.append(layer[:, :, 3] > 0)
    if not alphas and value.get("composite") is not None and value.get("background") is not None:
        comp, bg = np.asarray(value["composite"]), np.asarray(value["background"])
        if comp.shape == bg.shape:
            diff = comp != bg
            alphas.append(diff.any(-1) if diff.ndim == 3 else diff)
    for painted in alphas:
        pil = Image.fromarray(painted.astype(np.uint8) * 255).resize((image_size, image_size), Image.BOX)
        mask |= torch.from_numpy(np.asarray(pil) >= coverage * 255)
    return mask


def box_mask(box: Sequence[float | None], image_size: int) -> Tensor | None:
    """(left, top, right, bottom) as a (S, S) bool mask, None for an empty box (all zeros);
    InputError for boxes outside the image."""
    values = [0 if v is None else v for v in box]
    if any(float(v) != int(v) for v in values):
        raise InputError(f"box values must be whole pixels, got {tuple(values)}")
    left, top, right, bottom = (int(v) for v in values)
    if (left, top, right, bottom) == (0, 0, 0, 0):
        return None
    s = image_size
    if not (0 <= left < right <= s and 0 <= top < bottom <= s):
        raise InputError(f"box (left {left}, top {top}, right {right}, bottom {bottom}) must satisfy "
                         f"0 <= left < right <= {s} and 0 <= top < bottom <= {s}")
    mask = torch.zeros(s, s, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


def domain_images(model, count: int = 6) -> list[tuple[Tensor, str]]:
    """A few images from the model's own training domain, when it is known and installed:
    Fashion-MNIST test images for 28x28 grey 10-class models, photo crops for the Photos32
    classes. Empty otherwise (the page then offers to generate one)."""
    from .config import FASHION_MNIST_CLASSES
    from .data import PHOTOS32_SOURCES, FashionMNIST, Photos32

    cfg = model.config
    names = tuple(cfg.class_names or ())
    try:
        if cfg.image_size == 28 and cfg.channels == 1 and names in ((), FASHION_MNIST_CLASSES):
            data = FashionMNIST("test")
        elif cfg.image_size == 32 and cfg.channels == 3 and names == tuple(PHOTOS32_SOURCES):
            data = Photos32("test")
        else:
            return []
    except (FractalGenError, OSError):
        return []
    labels = np.asarray(data.labels) if data.labels is not None else np.zeros(len(data), int)
    picks: list[int] = []
    for k in range(data.num_classes):  # one image per class first, then more in order
        hits = np.flatnonzero(labels == k)
        if hits.size:
            picks.append(int(hits[len(hits) // 2]))
    picks = (picks + [i for i in range(len(data)) if i not in picks])[:count]
    return [(data[i][0], f"{data.classes[int(labels[i])]} (test #{i})") for i in picks]


# ------------------------------------------------------------------------------------------------
# Streaming generations, one at a time, cancellable
# ------------------------------------------------------------------------------------------------

class Runner:
    """Runs model calls in a worker thread, one at a time per server, streaming their canvases.

    ``stream(key, call)`` starts ``call(on_step=...)`` and yields ``("frame", (step, total, images))``
    (the newest canvas, at most one per ``frame_interval`` seconds), ``("tick", None)`` every
    ``tick`` seconds when nothing new arrived (so its consumer can be closed promptly), and
    finally ``("done", result)``. ``cancel(key)`` stops the run of that key: its next
    ``on_step`` raises Cancelled in the worker, and ``stream`` raises Cancelled."""

    def __init__(self, device: torch.device | str = "cpu", dtype: str = "float32",
                 frame_interval: float = 0.1, tick: float = 0.5):
        self.device = torch.device(device)
        self.dtype = dtype
        self.frame_interval = frame_interval
        self.tick = tick
        self._model_lock = threading.Lock()
        self._guard = threading.Lock()
        self._jobs: dict[str, threading.Event] = {}

    def cancel(self, key: str) -> bool:
        """Ask the run of ``key`` to stop; False when none is running."""
        with self._guard:
            flag = self._jobs.get(key)
        if flag is None:
            return False
        flag.set()
        return True

    def busy(self) -> bool:
        return self._model_lock.locked()

    def stream(self, key: str, call: Callable[[Callable], Tensor]) -> Iterator[tuple[str, Any]]:
        from .runtime import autocast

        flag = threading.Event()
        with self._guard:
            previous = self._jobs.get(key)
            if previous is not None:  # a new run from the same page replaces its old one
                previous.set()
            self._jobs[key] = flag
        events: queue.Queue = queue.Queue()

        def on_step(step: int, total: int, images: Tensor) -> None:
            if flag.is_set():
                raise Cancelled()
            events.put(("frame", (step, total, images.detach().cpu().clone())))

        def work() -> None:
            try:
                with self._model_lock:
                    if flag.is_set():
                        raise Cancelled()
                    with autocast(self.device, self.dtype):
                        result = call(on_step=on_step)
                events.put(("done", result.detach().cpu()))
            except BaseException as error:  # handed to the consumer, which re-raises it
                events.put(("error", error))

        worker = threading.Thread(target=work, name=f"fractalgen-demo-{key[:8]}", daemon=True)
        worker.start()
        try:
            pending, last_yield = None, time.monotonic()
            while True:
                if flag.is_set():
                    raise Cancelled()
                try:
                    kind, payload = events.get(timeout=min(self.frame_interval, self.tick) / 2)
                except queue.Empty:
                    kind, payload = None, None
                if kind == "done":
                    yield "done", payload
                    return
                if kind == "error":
                    raise payload
                if kind == "frame":
                    pending = payload
                now = time.monotonic()
                if pending is not None and now - last_yield >= self.frame_interval:
                    yield "frame", pending
                    pending, last_yield = None, time.monotonic()
                elif now - last_yield >= self.tick:
                    yield "tick", None
                    last_yield = time.monotonic()
        finally:
            flag.set()  # finished, failed, cancelled or closed: a still-running worker stops at its next step
            with self._guard:
                if self._jobs.get(key) is flag:
                    del self._jobs[key]


# ------------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------------

_CSS = """
.fg-status { min-height: 1.6em; padding: 0.2em 0; }
.fg-error { color: #b00020; font-weight: 600; }
.fg-ok { color: #1b6e20; }
"""


def _status(text: str, ok: bool = True) -> str:
    kind = "fg-ok" if ok else "fg-error"
    return f'<div class="fg-status {kind}">{html.escape(text)}</div>'


def _import_gradio():
    try:
        import gradio as gr
    except ImportError:
        raise FractalGenError(_GRADIO_HINT) from None
    return gr


def _temp_root() -> Path:
    """A fresh temporary folder for this process (removed at exit); GRADIO_TEMP_DIR points into
    it unless the user set one."""
    root = Path(tempfile.mkdtemp(prefix="fractalgen-demo-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(root / "gradio"))
    return root


def build_app(model, device: torch.device | str | None = None, dtype: str = "float32",
              num_iter: Sequence[int] = (), max_images: int = 16,
              max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, title: str | None = None,
              frame_interval: float = 0.1):
    """The Gradio Blocks app for ``model`` (not launched; use ``serve``). ``num_iter`` sets the
    MAR iterations per level (default: SamplingConfig's); ``max_upload_mb`` limits uploads."""
    from . import edit
    from .runtime import make_grid, save_image
    from .sampling import SamplingConfig

    root = _temp_root()
    gr = _import_gradio()
    model.eval()
    cfg = model.config
    size, channels = cfg.image_size, cfg.channels
    device = torch.device(device) if device is not None else model.device
    runner = Runner(device, dtype, frame_interval=frame_interval)
    max_bytes = int(max_upload_mb * 1e6)
    downloads = root / "downloads"
    downloads.mkdir()
    num_iter = tuple(num_iter)
    names = list(cfg.class_names) if cfg.class_names else [f"class {k}" for k in range(cfg.class_num)]
    class_choices = [(f"{k}: {name}", k) for k, name in enumerate(names)] if cfg.conditional else []
    examples = domain_images(model)
    title = title or "fractalgen demo"

    def key_of(request) -> str:
        return getattr(request, "session_hash", None) or "local"

    def settings(cfg_scale: float, temperature: float) -> SamplingConfig:
        return SamplingConfig(cfg=float(cfg_scale), temperature=float(temperature), num_iter=num_iter)

    def save_png(image: Tensor, stem: str) -> str:
        path = downloads / f"{stem}-{uuid.uuid4().hex[:8]}.png"
        save_image(image, path)
        return str(path)

    def report(error: BaseException) -> str:
        """The message shown in the page for an error (internal errors also go to the log)."""
        if isinstance(error, FractalGenError):
            message = str(error)
        else:
            traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
            message = f"internal error: {type(error).__name__}: {error}"
        gr.Warning(message)
        return _status(message, ok=False)

    def progress(step: int, total: int) -> str:
        return _status(f"generating: level-0 step {step + 1} of {total}")

    # ---------------------------------------------------------------------------- sample tab
    def run_sample(class_id, count, cfg_scale, temperature, seed, request: gr.Request):
        skip = gr.skip()
        try:
            count = int(count)
            if not 1 <= count <= max_images:
                raise InputError(f"number of images must be 1..{max_images}, got {count}")
            seed = int(seed or 0)
            if cfg.conditional:
                if class_id is None or int(class_id) == NO_CLASS:
                    g = torch.Generator().manual_seed(seed)
                    labels = torch.randint(cfg.class_num, (count,), generator=g)
                else:
                    labels = torch.full((count,), int(class_id), dtype=torch.long)
            else:
                labels, cfg_scale = None, 1.0
            chosen = settings(cfg_scale, temperature)
            yield skip, None, _status("waiting for the model..." if runner.busy() else "starting...")
            call = partial(model.sample, labels=labels, num_images=None if labels is not None else count,
                           settings=chosen, seed=seed)
            for kind, payload in runner.stream(key_of(request), call):
                if kind == "frame":
                    step, total, images = payload
                    yield display(make_grid(images), 512), skip, progress(step, total)
                elif kind == "tick":
                    yield skip, skip, skip
                else:
                    grid = make_grid(payload)
                    yield (display(grid, 512), save_png(grid, "samples"),
                           _status(f"done: {payload.shape[0]} image(s), seed {seed}"))
        except Cancelled:
            yield skip, skip, _status("cancelled", ok=False)
        except Exception as error:  # noqa: BLE001 - every failure becomes a message in the page
            yield skip, skip, report(error)

    # ---------------------------------------------------------------------------- edit tab
    def loaded(image: Tensor, message: str):
        """Outputs after a new input image: state, editor, status and cleared results."""
        shown = display(image)
        rgb = np.repeat(shown[:, :, None], 3, 2) if shown.ndim == 2 else shown[:, :, :3]
        return (image.numpy(), {"background": rgb, "layers": [], "composite": rgb}, _status(message),
                None, None, None, None)

    def on_upload(path, resize):
        if not path:
            return (gr.skip(),) * 7
        try:
            image = read_upload(path, size, channels, max_bytes, bool(resize))
            model.check_images(image[None])
        except Exception as error:  # noqa: BLE001 - refused uploads become a message in the page
            return (gr.skip(), gr.skip(), report(error)) + (gr.skip(),) * 4
        return loaded(image, f"loaded {Path(path).name} ({size}x{size}); paint the region to regenerate "
                             "or give a box")

    def on_example(evt: gr.SelectData):
        image, caption = examples[evt.index]
        return loaded(image, f"loaded test image {caption}")

    def run_test_image(seed, request: gr.Request):
        skip = gr.skip()
        try:
            seed = int(seed or 0)
            labels = torch.randint(cfg.class_num, (1,), generator=torch.Generator().manual_seed(seed)) \
                if cfg.conditional else None
            call = partial(model.sample, labels=labels, num_images=None if labels is not None else 1,
                           settings=settings(1.0, 1.0), seed=seed)
            for kind, payload in runner.stream(key_of(request), call):
                if kind == "frame":
                    step, total, images = payload
                    yield (skip,) * 5 + (display(images[0]), progress(step, total))
                elif kind == "tick":
                    yield (skip,) * 7
                else:
                    state_value, editor, status, *_ = loaded(payload[0], f"generated a test image (seed {seed}); "
                                                                         "paint the region to regenerate or give a box")
                    yield state_value, editor, None, None, None, None, status
        except Cancelled:
            yield (skip,) * 6 + (_status("cancelled", ok=False),)
        except Exception as error:  # noqa: BLE001
            yield (skip,) * 6 + (report(error),)

    def run_edit(state, editor, mode, left, top, right, bottom, pad_top, pad_right, pad_bottom, pad_left,
                 class_id, cfg_scale, temperature, seed, request: gr.Request):
        skip = gr.skip()
        try:
            if state is None:
                raise InputError("upload an image or pick a test image first")
            image = torch.from_numpy(np.asarray(state, dtype=np.uint8).copy())
            model.check_images(image[None])
            label = None if class_id is None or int(class_id) == NO_CLASS or not cfg.conditional else int(class_id)
            seed = int(seed or 0)
            if not cfg.conditional:
                cfg_scale = 1.0
            chosen = settings(cfg_scale, temperature)
            common = dict(settings=chosen, seed=seed)
            if mode in ("inpaint", "class edit"):
                mask = mask_from_editor(editor, size)
                box = box_mask((left, top, right, bottom), size)
                if box is not None:
                    mask |= box
                if not mask.any():
                    raise InputError("paint the region to regenerate with the brush, or give a box")
                shown_input = image
                if mode == "class edit":
                    if label is None:
                        raise InputError("class edit: choose the class of the result")
                    call = partial(edit.class_edit, model, image, mask, label, **common)
                else:
                    labels = None if label is None else torch.tensor([label])
                    call = partial(edit.inpaint, model, image, mask, labels=labels, **common)
            elif mode == "outpaint":
                pads = [int(v or 0) for v in (pad_top, pad_right, pad_bottom, pad_left)]
                t, r, b, l = pads
                if min(pads) < 0 or not any(pads) or t + b >= size or l + r >= size:
                    raise InputError(f"outpaint: give margins (top, right, bottom, left) >= 0, not all 0, with "
                                     f"top+bottom and left+right below {size}; the image is scaled into the rest")
                small = fit(image, size - t - b, size - l - r)
                shown_input = torch.zeros_like(image)
                shown_input[:, t: size - b, l: size - r] = small
                mask = torch.ones(size, size, dtype=torch.bool)
                mask[t: size - b, l: size - r] = False
                labels = None if label is None else torch.tensor([label])
                call = partial(edit.outpaint, model, small, pads, labels=labels, **common)
            elif mode == "uncrop":
                keep = box_mask((left, top, right, bottom), size)
                if keep is None:
                    raise InputError("uncrop: give the box to keep (left, top, right, bottom)")
                if keep.all():
                    raise InputError("uncrop: the box covers the whole image, so nothing is generated")
                l, t, r, b = (int(v or 0) for v in (left, top, right, bottom))
                mask, shown_input = ~keep, image
                labels = None if label is None else torch.tensor([label])
                call = partial(edit.uncrop, model, image, (l, t, r, b), labels=labels, **common)
            else:
                raise InputError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
            mask_image = (mask.to(torch.uint8) * 255).expand(channels, size, size)
            yield (display(shown_input), display(mask_image), None, None,
                   _status("waiting for the model..." if runner.busy() else "starting..."))
            for kind, payload in runner.stream(key_of(request), call):
                if kind == "frame":
                    step, total, images = payload
                    yield skip, skip, display(images[0]), skip, progress(step, total)
                elif kind == "tick":
                    yield (skip,) * 5
                else:
                    result = payload[0]
                    changed = int((result != shown_input).any(0).sum())
                    yield (skip, skip, display(result), save_png(result, "edited"),
                           _status(f"done: {mode}, {int(mask.sum())} pixels regenerated ({changed} changed), "
                                   f"seed {seed}"))
        except Cancelled:
            yield skip, skip, skip, skip, _status("cancelled", ok=False)
        except Exception as error:  # noqa: BLE001
            yield skip, skip, skip, skip, report(error)

    def on_mode(mode, cfg_scale):
        boxed = mode in ("inpaint", "class edit", "uncrop")
        text = BOX_KEEP if mode == "uncrop" else BOX_REGENERATE
        if mode == "class edit":  # class edits default to guidance 3, as `fractalgen edit class`
            guidance = gr.update(value=CLASS_EDIT_CFG) if cfg_scale == 1.0 else gr.skip()
        else:
            guidance = gr.update(value=1.0) if cfg_scale == CLASS_EDIT_CFG else gr.skip()
        return (gr.update(visible=boxed), gr.update(value=text), gr.update(visible=mode == "outpaint"),
                guidance if cfg.conditional else gr.skip())

    def cancel(request: gr.Request):
        stopped = runner.cancel(key_of(request))
        return _status("cancelled" if stopped else "nothing to cancel", ok=not stopped)

    def sampling_controls(prefix: str):
        """Guidance, temperature and seed inputs (the same on both tabs)."""
        return (gr.Slider(0.0, 20.0, value=1.0, step=0.1, label="Guidance (cfg; 1 = off)",
                          visible=cfg.conditional, elem_id=f"{prefix}-cfg"),
                gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature", elem_id=f"{prefix}-temperature"),
                gr.Number(0, precision=0, minimum=0, label="Seed", elem_id=f"{prefix}-seed"))

    # ---------------------------------------------------------------------------- layout
    common_limits = dict(concurrency_id="generate", concurrency_limit=1)
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## {html.escape(title)}\n{size}x{size}, {channels} channel(s), "
                    f"{cfg.class_num or 'no'} classes. One generation at a time; the canvas updates after "
                    "every level-0 step.")
        with gr.Tab("Sample", id="sample"):
            with gr.Row():
                with gr.Column(scale=1):
                    s_class = gr.Dropdown([("random classes", NO_CLASS)] + class_choices, value=NO_CLASS,
                                          label="Class", visible=cfg.conditional, elem_id="sample-class")
                    s_count = gr.Slider(1, max_images, value=min(4, max_images), step=1, label="Number of images",
                                        elem_id="sample-count")
                    s_cfg, s_temp, s_seed = sampling_controls("sample")
                    with gr.Row():
                        s_go = gr.Button("Generate", variant="primary", elem_id="sample-go")
                        s_stop = gr.Button("Cancel", variant="stop", elem_id="sample-cancel")
                    s_status = gr.HTML(_status(""), elem_id="sample-status")
                with gr.Column(scale=2):
                    s_canvas = gr.Image(label="Canvas", format="png", interactive=False, height=520,
                                        buttons=["download", "fullscreen"], elem_id="sample-canvas")
                    s_file = gr.File(label="Download PNG (native resolution)", interactive=False, height=90,
                                     elem_id="sample-file")
        with gr.Tab("Edit", id="edit"):
            state = gr.State(None)
            with gr.Row():
                with gr.Column(scale=1):
                    e_upload = gr.UploadButton(f"Upload an image (max {max_upload_mb:g} MB)", file_count="single",
                                               file_types=["image"], type="filepath", elem_id="edit-upload")
                    e_resize = gr.Checkbox(True, label=f"Centre-crop and resize uploads to {size}x{size}",
                                           elem_id="edit-resize")
                    if examples:
                        e_gallery = gr.Gallery([(display(img, 96), caption) for img, caption in examples],
                                               label="Test images (click one)", columns=6, rows=1, height=150,
                                               allow_preview=False, format="png", elem_id="edit-examples")
                    e_make = gr.Button("Generate a test image with the model", elem_id="edit-make")
                    e_editor = gr.ImageEditor(label="Paint the region to regenerate", sources=(), transforms=(),
                                              layers=False, image_mode="RGBA", type="numpy", format="png",
                                              brush=gr.Brush(colors=[("#ff0066", 0.6)], color_mode="fixed"),
                                              elem_id="edit-editor")
                with gr.Column(scale=1):
                    e_mode = gr.Radio([m for m in MODES if m != "class edit" or cfg.conditional], value="inpaint",
                                      label="Mode", elem_id="edit-mode")
                    with gr.Group(visible=True) as e_box_group:
                        e_box_label = gr.Markdown(BOX_REGENERATE)
                        with gr.Row():
                            e_left = gr.Number(0, precision=0, label="left", min_width=60, elem_id="edit-left")
                            e_top = gr.Number(0, precision=0, label="top", min_width=60, elem_id="edit-top")
                            e_right = gr.Number(0, precision=0, label="right", min_width=60, elem_id="edit-right")
                            e_bottom = gr.Number(0, precision=0, label="bottom", min_width=60, elem_id="edit-bottom")
                    with gr.Row(visible=False) as e_pad:
                        e_pt = gr.Number(0, precision=0, label="pad top", min_width=60, elem_id="edit-pad-top")
                        e_pr = gr.Number(0, precision=0, label="pad right", min_width=60, elem_id="edit-pad-right")
                        e_pb = gr.Number(0, precision=0, label="pad bottom", min_width=60, elem_id="edit-pad-bottom")
                        e_pl = gr.Number(0, precision=0, label="pad left", min_width=60, elem_id="edit-pad-left")
                    e_class = gr.Dropdown([("none (unconditional)", NO_CLASS)] + class_choices, value=NO_CLASS,
                                          label="Class (needed for class edit)", visible=cfg.conditional,
                                          elem_id="edit-class")
                    with gr.Accordion("Sampling settings", open=False):
                        e_cfg, e_temp, e_seed = sampling_controls("edit")
                    with gr.Row():
                        e_go = gr.Button("Edit", variant="primary", elem_id="edit-go")
                        e_stop = gr.Button("Cancel", variant="stop", elem_id="edit-cancel")
                    e_status = gr.HTML(_status(f"upload an image ({size}x{size} or any size to centre-crop)"
                                               + (" or pick a test image" if examples else "")),
                                       elem_id="edit-status")
            with gr.Row():
                e_input = gr.Image(label="Input", format="png", interactive=False, height=320,
                                   buttons=["download", "fullscreen"], elem_id="edit-input")
                e_mask = gr.Image(label="Mask (white = regenerated)", format="png", interactive=False, height=320,
                                  buttons=["download", "fullscreen"], elem_id="edit-mask")
                e_result = gr.Image(label="Result", format="png", interactive=False, height=320,
                                    buttons=["download", "fullscreen"], elem_id="edit-result")
            e_file = gr.File(label="Download result PNG (native resolution)", interactive=False, height=90,
                             elem_id="edit-file")

        # events
        sample_event = s_go.click(run_sample, [s_class, s_count, s_cfg, s_temp, s_seed],
                                  [s_canvas, s_file, s_status], **common_limits)
        s_stop.click(cancel, None, s_status, cancels=[sample_event], concurrency_limit=None,
                     concurrency_id="cancel")
        loaded_outputs = [state, e_editor, e_status, e_input, e_mask, e_result, e_file]
        e_upload.upload(on_upload, [e_upload, e_resize], loaded_outputs, concurrency_limit=4,
                        concurrency_id="upload")
        if examples:
            e_gallery.select(on_example, None, loaded_outputs, concurrency_limit=4, concurrency_id="upload")
        make_event = e_make.click(run_test_image, [e_seed],
                                  [state, e_editor, e_input, e_mask, e_file, e_result, e_status],
                                  **common_limits)
        edit_event = e_go.click(run_edit, [state, e_editor, e_mode, e_left, e_top, e_right, e_bottom,
                                           e_pt, e_pr, e_pb, e_pl, e_class, e_cfg, e_temp, e_seed],
                                [e_input, e_mask, e_result, e_file, e_status], **common_limits)
        e_stop.click(cancel, None, e_status, cancels=[edit_event, make_event], concurrency_limit=None,
                     concurrency_id="cancel")
        e_mode.change(on_mode, [e_mode, e_cfg], [e_box_group, e_box_label, e_pad, e_cfg], concurrency_limit=None,
                      concurrency_id="ui")
    app.queue(max_size=32)
    app.fractalgen_max_upload_bytes = max_bytes
    app.fractalgen_runner = runner
    app.fractalgen_temp = root
    app.fractalgen_handlers = dict(sample=run_sample, edit=run_edit, upload=on_upload, test_image=run_test_image,
                                   cancel=cancel)
    return app


def serve(app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, block: bool = True, quiet: bool = False):
    """Launch ``app`` (from ``build_app``) on ``host:port`` with its upload limit. With ``block``
    serve until Ctrl+C; otherwise return at once (the server runs in a thread; ``app.close()``
    stops it)."""
    gr = _import_gradio()
    if host not in LOCAL_HOSTS:
        print(f"warning: serving on {host}:{port} makes the demo reachable from other machines; it has no "
              "login and runs generations for anyone who can connect", file=sys.stderr)
    options = dict(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, share=False,
                   max_file_size=getattr(app, "fractalgen_max_upload_bytes", None), show_error=True, css=_CSS,
                   theme=gr.themes.Default(), footer_links=["gradio"], run_history=False, ssr_mode=False)
    accepted = inspect.signature(app.launch).parameters
    options = {k: v for k, v in options.items() if k in accepted}  # run_history is newer than Gradio 6.0
    try:
        result = app.launch(**options)
    except OSError as error:
        raise FractalGenError(f"cannot serve on {host}:{port} ({error}); choose another --port") from None
    if not quiet:
        print(f"fractalgen demo on http://{'127.0.0.1' if host in LOCAL_HOSTS else host}:{port} "
              "(Ctrl+C to stop)", flush=True)
    if block:
        app.block_thread()
    return result


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``fractalgen demo`` on the CLI's subparsers."""
    from .cli_common import int_list, model_args

    p = subparsers.add_parser("demo", help="local web app: sample and edit images in the browser "
                                           "(needs pip install 'fractalgen[demo]')")
    model_args(p)
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to bind (default 127.0.0.1: this machine only; others print a warning)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to serve on (default {DEFAULT_PORT})")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, help="largest upload accepted")
    p.add_argument("--max-images", type=int, default=16, help="most images per sample request")
    p.add_argument("--num-iter", type=int_list, default=(), help="MAR iterations per level, e.g. 64,16")
    p.set_defaults(func=cmd_demo)
    return p


def cmd_demo(args) -> None:
    from .cli_common import load_from_args

    if args.max_upload_mb <= 0 or args.max_images < 1:
        raise FractalGenError("--max-upload-mb must be > 0 and --max-images >= 1")
    _import_gradio()  # fail before loading a large model
    if threading.current_thread() is threading.main_thread():  # `kill` exits cleanly: temp folders removed
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    model, device = load_from_args(args)
    app = build_app(model, device=device, dtype=args.dtype, num_iter=args.num_iter, max_images=args.max_images,
                    max_upload_mb=args.max_upload_mb,
                    title=f"fractalgen demo: {Path(args.model).name if args.model else 'shipped Fashion-MNIST model'}")
    serve(app, args.host, args.port, block=True)
