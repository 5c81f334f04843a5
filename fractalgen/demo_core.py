"""What the web demo does without Gradio: reading uploads, masks from the brush and the box,
images of the model's own domain, and the ``Runner`` that streams generations one at a time.

``Runner.stream(key, call)`` runs ``call(on_step=...)`` -- ``model.sample`` or a ``fractalgen.edit``
tool -- in a worker thread. ``on_step`` copies the level-0 canvas into a queue, and the consumer
(a Gradio handler, a generator) receives the newest frame at most ``frame_interval`` seconds
apart, so the browser redraws while pixels are generated. A lock around the model call keeps
generations one at a time, also when a cancelled one is still finishing its step. Cancelling
sets the run's flag; the next ``on_step`` then raises ``Cancelled`` inside the worker, which
stops the model cooperatively.
"""

from __future__ import annotations

import contextlib
import html
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .config import FASHION_MNIST_CLASSES
from .data import PHOTOS32_SOURCES, FashionMNIST, Photos32, center_crop_arr
from .errors import FractalGenError, InputError
from .runtime import MODES as PIL_MODES, autocast, pil_to_tensor, to_pil

DEFAULT_MAX_UPLOAD_MB = 10.0
#: Decoded-pixel limit for uploads (a small file can decode to a huge image).
MAX_UPLOAD_PIXELS = 40_000_000
MODES = ("inpaint", "outpaint", "uncrop", "class edit")
NO_CLASS = -1
CLASS_EDIT_CFG = 3.0
BOX_REGENERATE = "Box to regenerate, in model pixels (left, top, right, bottom; all 0 = only the painted region)"
BOX_KEEP = "Box to keep, in model pixels (left, top, right, bottom); everything around it is generated"

#: Styles of the status lines of ``status_html``.
STATUS_CSS = """
.fg-status { min-height: 1.6em; padding: 0.2em 0; }
.fg-error { color: #b00020; font-weight: 600; }
.fg-ok { color: #1b6e20; }
"""
#: Small images shown enlarged by the browser keep sharp pixels.
PIXELATED_CSS = """
.fg-pixelated img { image-rendering: pixelated; }
"""


def status_html(text: str, ok: bool = True) -> str:
    """A status line for the page (red when not ``ok``; styled by ``STATUS_CSS``)."""
    kind = "fg-ok" if ok else "fg-error"
    return f'<div class="fg-status {kind}">{html.escape(text)}</div>'


class Cancelled(Exception):
    """Raised from ``on_step`` to stop a generation the user cancelled."""


# ------------------------------------------------------------------------------------------------
# Image helpers (no Gradio needed)
# ------------------------------------------------------------------------------------------------

def _not_an_image(name: str) -> InputError:
    return InputError(f"upload refused: {name} is not an image file that can be read "
                      "(PNG, JPEG, WebP, GIF, BMP, TIFF ...)")


def check_upload(path: str | os.PathLike, max_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1e6)) -> None:
    """Raise InputError unless ``path`` is an image file within ``max_bytes`` and the decoded-pixel
    limit (only its header is read)."""
    path = Path(path)
    name = path.name
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(f"upload refused: {name} is {size / 1e6:.1f} MB, over the "
                         f"{max_bytes / 1e6:g} MB limit of this server (--max-upload-mb)")
    try:
        with Image.open(path) as pil:
            width, height = pil.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise _not_an_image(name) from None
    if width * height > MAX_UPLOAD_PIXELS:
        raise InputError(f"upload refused: {name} is {width}x{height} pixels, over the "
                         f"{MAX_UPLOAD_PIXELS / 1e6:g} megapixel limit")


def read_upload(path: str | os.PathLike, image_size: int, channels: int,
                max_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1e6), resize: bool = True) -> Tensor:
    """Read an uploaded image file as uint8 (C, S, S) for a model of ``image_size`` and
    ``channels``; InputError for files that are too large, not images, or the wrong size when
    ``resize`` is off (with ``resize`` the ADM centre crop makes them fit)."""
    path = Path(path)
    name = path.name
    check_upload(path, max_bytes)
    try:
        with Image.open(path) as pil:
            pil.load()
            pil = pil.convert(PIL_MODES[channels])
    except KeyError:
        raise InputError(f"this model has {channels} channels; the demo shows 1, 3 or 4") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise _not_an_image(name) from None
    if pil.size != (image_size, image_size):
        if not resize:
            raise InputError(f"{name} is {pil.width}x{pil.height} but the model takes {image_size}x{image_size}; "
                             "tick 'centre-crop and resize uploads' or upload an image of that size")
        pil = center_crop_arr(pil, image_size)
    return pil_to_tensor(pil, channels)


def fit(image: Tensor, height: int, width: int) -> Tensor:
    """Scale and centre-crop uint8 (C, H, W) to (C, height, width) (ADM crop when square)."""
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

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the model for a call that does not stream (compression); generations wait meanwhile."""
        with self._model_lock:
            yield

    def stream(self, key: str, call: Callable[[Callable], Tensor]) -> Iterator[tuple[str, Any]]:
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
