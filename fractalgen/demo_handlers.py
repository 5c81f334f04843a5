"""The web demo's event handlers: what happens when a button is pressed, an image uploaded or
a mode chosen. ``demo.build_app`` lays out the page and wires these to its components.

Handlers that generate are generators: they yield the page's outputs after every level-0 step
(streamed by ``demo_core.Runner``) and once more with the result. Every failure becomes a short
message in the page; unexpected ones also go to the server log with their traceback.
"""

import logging
import uuid
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import gradio as gr
import numpy as np
import torch
from torch import Tensor

from . import edit
from .demo_core import (BOX_KEEP, BOX_REGENERATE, CLASS_EDIT_CFG, MODES, NO_CLASS, Cancelled, Runner, box_mask,
                        display, domain_images, fit, mask_from_editor, read_upload, status_html)
from .errors import FractalGenError, InputError
from .model import FractalGen
from .runtime import make_grid, save_image
from .sampling import SamplingConfig

log = logging.getLogger(__name__)


def progress_html(step: int, total: int) -> str:
    """The status line while level-0 step ``step`` of ``total`` runs."""
    return status_html(f"generating: level-0 step {step + 1} of {total}")


def page_key(request: gr.Request | None) -> str:
    """The page a request comes from (one generation per page is cancellable)."""
    return getattr(request, "session_hash", None) or "local"


class TabHandlers:
    """What every tab's handlers share: the model, the runner it runs on, ``downloads`` (where
    result files are written), ``num_iter`` (MAR iterations per level), ``max_images`` per request
    and ``max_bytes`` per upload."""

    def __init__(self, model: FractalGen, runner: Runner, downloads: Path, num_iter: Sequence[int] = (),
                 max_images: int = 16, max_bytes: int = 10_000_000):
        self.model = model
        self.cfg = model.config
        self.runner = runner
        self.downloads = downloads
        self.num_iter = tuple(num_iter)
        self.max_images = max_images
        self.max_bytes = max_bytes

    @staticmethod
    def report(error: BaseException) -> str:
        """The page's message for an error: the error itself when it is about the user's input,
        otherwise a short notice, with the details in the server log."""
        if isinstance(error, FractalGenError):
            message = str(error)
        else:
            log.error("the demo failed on a request", exc_info=error)
            message = "something went wrong on the server (the details are in its log); try again or reload the page"
        gr.Warning(message)
        return status_html(message, ok=False)


class Handlers(TabHandlers):
    """The handlers of the Sample and Edit tabs for one model."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.examples = domain_images(self.model)

    # ------------------------------------------------------------------------------- helpers
    def _settings(self, cfg_scale: float, temperature: float) -> SamplingConfig:
        return SamplingConfig(cfg=float(cfg_scale), temperature=float(temperature), num_iter=self.num_iter)

    def _save_png(self, image: Tensor, stem: str) -> str:
        path = self.downloads / f"{stem}-{uuid.uuid4().hex[:8]}.png"
        save_image(image, path)
        return str(path)

    def _waiting(self) -> str:
        return status_html("waiting for the model..." if self.runner.busy() else "starting...")

    def _loaded(self, image: Tensor, message: str) -> tuple:
        """Outputs after a new input image: state, editor, status and cleared results."""
        shown = display(image)
        rgb = np.repeat(shown[:, :, None], 3, 2) if shown.ndim == 2 else shown[:, :, :3]
        return (image.numpy(), {"background": rgb, "layers": [], "composite": rgb}, status_html(message),
                None, None, None, None)

    # ------------------------------------------------------------------------------- sample tab
    def run_sample(self, class_id: int | None, count: float, cfg_scale: float, temperature: float, seed: float | None,
                   request: gr.Request) -> Iterator[tuple]:
        """Sample a grid: outputs (canvas, download, status)."""
        skip, cfg = gr.skip(), self.cfg
        try:
            count = int(count)
            if not 1 <= count <= self.max_images:
                raise InputError(f"number of images must be 1..{self.max_images}, got {count}")
            seed = int(seed or 0)
            if cfg.conditional:
                if class_id is None or int(class_id) == NO_CLASS:
                    labels = torch.randint(cfg.class_num, (count,), generator=torch.Generator().manual_seed(seed))
                else:
                    labels = torch.full((count,), int(class_id), dtype=torch.long)
            else:
                labels, cfg_scale = None, 1.0
            chosen = self._settings(cfg_scale, temperature)
            yield skip, None, self._waiting()
            call = partial(self.model.sample, labels=labels, num_images=None if labels is not None else count,
                           settings=chosen, seed=seed)
            for kind, payload in self.runner.stream(page_key(request), call):
                if kind == "frame":
                    step, total, images = payload
                    yield display(make_grid(images), 512), skip, progress_html(step, total)
                elif kind == "tick":
                    yield skip, skip, skip
                else:
                    grid = make_grid(payload)
                    yield (display(grid, 512), self._save_png(grid, "samples"),
                           status_html(f"done: {payload.shape[0]} image(s), seed {seed}"))
        except Cancelled:
            yield skip, skip, status_html("cancelled", ok=False)
        except Exception as error:  # noqa: BLE001 - every failure becomes a message in the page
            yield skip, skip, self.report(error)

    # ------------------------------------------------------------------------------- edit tab: input
    def on_upload(self, path: str | None, resize: bool) -> tuple:
        """Read an upload: outputs (state, editor, status, input, mask, result, download)."""
        if not path:
            return (gr.skip(),) * 7
        size = self.cfg.image_size
        try:
            image = read_upload(path, size, self.cfg.channels, self.max_bytes, bool(resize))
            self.model.check_images(image[None])
        except Exception as error:  # noqa: BLE001 - refused uploads become a message in the page
            return (gr.skip(), gr.skip(), self.report(error)) + (gr.skip(),) * 4
        return self._loaded(image, f"loaded {Path(path).name} ({size}x{size}); paint the region to regenerate "
                                   "or give a box")

    def on_example(self, evt: gr.SelectData) -> tuple:
        """Load the clicked test image (same outputs as ``on_upload``)."""
        image, caption = self.examples[evt.index]
        return self._loaded(image, f"loaded test image {caption}")

    def run_test_image(self, seed: float | None, request: gr.Request) -> Iterator[tuple]:
        """Generate an input image: outputs (state, editor, input, mask, download, result, status)."""
        skip, cfg = gr.skip(), self.cfg
        try:
            seed = int(seed or 0)
            labels = torch.randint(cfg.class_num, (1,), generator=torch.Generator().manual_seed(seed)) \
                if cfg.conditional else None
            call = partial(self.model.sample, labels=labels, num_images=None if labels is not None else 1,
                           settings=self._settings(1.0, 1.0), seed=seed)
            for kind, payload in self.runner.stream(page_key(request), call):
                if kind == "frame":
                    step, total, images = payload
                    yield (skip,) * 5 + (display(images[0]), progress_html(step, total))
                elif kind == "tick":
                    yield (skip,) * 7
                else:
                    message = f"generated a test image (seed {seed}); paint the region to regenerate or give a box"
                    state_value, editor, status, *_ = self._loaded(payload[0], message)
                    yield state_value, editor, None, None, None, None, status
        except Cancelled:
            yield (skip,) * 6 + (status_html("cancelled", ok=False),)
        except Exception as error:  # noqa: BLE001
            yield (skip,) * 6 + (self.report(error),)

    # ------------------------------------------------------------------------------- edit tab: edit
    def run_edit(self, state: Any, editor: Any, mode: str, left: float | None, top: float | None,
                 right: float | None, bottom: float | None, pad_top: float | None, pad_right: float | None,
                 pad_bottom: float | None, pad_left: float | None, class_id: int | None, cfg_scale: float,
                 temperature: float, seed: float | None, request: gr.Request) -> Iterator[tuple]:
        """Edit the loaded image: outputs (input, mask, result, download, status)."""
        skip, cfg = gr.skip(), self.cfg
        try:
            if state is None:
                raise InputError("upload an image or pick a test image first")
            image = torch.from_numpy(np.asarray(state, dtype=np.uint8).copy())
            self.model.check_images(image[None])
            label = None if class_id is None or int(class_id) == NO_CLASS or not cfg.conditional else int(class_id)
            seed = int(seed or 0)
            chosen = self._settings(cfg_scale if cfg.conditional else 1.0, temperature)
            mask, shown_input, edit_fn = self._edit_plan(image, editor, mode, (left, top, right, bottom),
                                                         (pad_top, pad_right, pad_bottom, pad_left), label)
            call = partial(edit_fn, settings=chosen, seed=seed)
            size, channels = cfg.image_size, cfg.channels
            mask_image = (mask.to(torch.uint8) * 255).expand(channels, size, size)
            yield display(shown_input), display(mask_image), None, None, self._waiting()
            for kind, payload in self.runner.stream(page_key(request), call):
                if kind == "frame":
                    step, total, images = payload
                    yield skip, skip, display(images[0]), skip, progress_html(step, total)
                elif kind == "tick":
                    yield (skip,) * 5
                else:
                    result = payload[0]
                    changed = int((result != shown_input).any(0).sum())
                    yield (skip, skip, display(result), self._save_png(result, "edited"),
                           status_html(f"done: {mode}, {int(mask.sum())} pixels regenerated ({changed} changed), "
                                       f"seed {seed}"))
        except Cancelled:
            yield skip, skip, skip, skip, status_html("cancelled", ok=False)
        except Exception as error:  # noqa: BLE001
            yield skip, skip, skip, skip, self.report(error)

    def _edit_plan(self, image: Tensor, editor: Any, mode: str, box: Sequence[float | None],
                   pads: Sequence[float | None], label: int | None) -> tuple[Tensor, Tensor, Callable]:
        """(mask of the regenerated pixels, the input as shown, the edit to run) for ``mode``;
        InputError when the mask, box or margins do not make an edit."""
        size = self.cfg.image_size
        labels = None if label is None else torch.tensor([label])
        if mode in ("inpaint", "class edit"):
            mask = mask_from_editor(editor, size)
            boxed = box_mask(box, size)
            if boxed is not None:
                mask |= boxed
            if not mask.any():
                raise InputError("paint the region to regenerate with the brush, or give a box")
            if mode == "inpaint":
                return mask, image, partial(edit.inpaint, self.model, image, mask, labels=labels)
            if label is None:
                raise InputError("class edit: choose the class of the result")
            return mask, image, partial(edit.class_edit, self.model, image, mask, label)
        if mode == "outpaint":
            margins = [int(v or 0) for v in pads]
            t, r, b, l = margins
            if min(margins) < 0 or not any(margins) or t + b >= size or l + r >= size:
                raise InputError(f"outpaint: give margins (top, right, bottom, left) >= 0, not all 0, with "
                                 f"top+bottom and left+right below {size}; the image is scaled into the rest")
            small = fit(image, size - t - b, size - l - r)
            shown = torch.zeros_like(image)
            shown[:, t: size - b, l: size - r] = small
            mask = torch.ones(size, size, dtype=torch.bool)
            mask[t: size - b, l: size - r] = False
            return mask, shown, partial(edit.outpaint, self.model, small, margins, labels=labels)
        if mode == "uncrop":
            keep = box_mask(box, size)
            if keep is None:
                raise InputError("uncrop: give the box to keep (left, top, right, bottom)")
            if keep.all():
                raise InputError("uncrop: the box covers the whole image, so nothing is generated")
            kept = tuple(int(v or 0) for v in box)
            return ~keep, image, partial(edit.uncrop, self.model, image, kept, labels=labels)
        raise InputError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")

    # ------------------------------------------------------------------------------- controls
    def on_mode(self, mode: str, cfg_scale: float) -> tuple:
        """Show the inputs of ``mode``: outputs (box group, box label, margins row, guidance)."""
        boxed = mode in ("inpaint", "class edit", "uncrop")
        text = BOX_KEEP if mode == "uncrop" else BOX_REGENERATE
        if mode == "class edit":  # class edits default to guidance 3, as `fractalgen edit class`
            guidance = gr.update(value=CLASS_EDIT_CFG) if cfg_scale == 1.0 else gr.skip()
        else:
            guidance = gr.update(value=1.0) if cfg_scale == CLASS_EDIT_CFG else gr.skip()
        return (gr.update(visible=boxed), gr.update(value=text), gr.update(visible=mode == "outpaint"),
                guidance if self.cfg.conditional else gr.skip())

    def cancel(self, request: gr.Request) -> str:
        """Stop this page's generation: outputs the status."""
        stopped = self.runner.cancel(page_key(request))
        return status_html("cancelled" if stopped else "nothing to cancel", ok=not stopped)
