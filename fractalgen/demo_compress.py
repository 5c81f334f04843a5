"""The Compress tab's handlers: images to a ``.fgz`` file (``codec``), shown beside PNG, WebP and
JPEG-XL of the same images (``image_codecs``) with a heat map of the bits per pixel; a ``.fgz``
file back to its images. ``demo.build_app`` lays out the tab and wires these to it.

Uploads are read as ``fractalgen compress`` reads them (``codec_cli.read_image``): pixels the
model cannot hold exactly are refused unless the tab's --resize / --convert boxes are ticked.
Images are coded with the null condition (no labels), as ``fractalgen compress`` without
``--labels``. Coding holds the model (``Runner.exclusive``), so it never runs beside a generation.
"""

from __future__ import annotations

import uuid
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import gradio as gr
import numpy as np
import torch
from torch import Tensor

from .codec import compress, decompress, read_header
from .codec_cli import output_names, read_image
from .demo_core import Cancelled, Runner, check_upload, domain_images, status_html
from .demo_handlers import TabHandlers, page_key, progress_html
from .errors import InputError
from .evaluate import bits_heatmap, heatmap_figure, is_exact
from .image_codecs import PNG, lossless_sizes
from .model import FractalGen
from .sampling import SamplingConfig

SIZE_HEADERS = ["file", "bytes", "bits/dim", "size / .fgz"]
FGZ_ROW = ".fgz, whole file (this model)"


def as_arrays(images: Tensor) -> list[np.ndarray]:
    """uint8 (B, C, H, W) as one array per image: (H, W) grey, (H, W, C) otherwise."""
    arrays = images.detach().cpu().numpy().transpose(0, 2, 3, 1)
    return [a[:, :, 0] if a.shape[2] == 1 else a for a in arrays]


def size_rows(data: bytes, dims: int, others: dict[str, int | str]) -> list[list[str]]:
    """The size table: the ``.fgz`` file (whole, then its coded pixels and its container), then
    the ``others`` codecs (bytes, or why not available); bits/dim over ``dims`` sub-pixels."""
    whole = len(data)
    payload = sum(read_header(data).group_bytes)

    def row(name: str, size: int | str, ratio: bool = True) -> list[str]:
        if isinstance(size, str):  # the codec is not available
            return [name, size, "", ""]
        return [name, f"{size:,}", f"{8 * size / dims:.3f}", f"{size / whole:.2f}x" if ratio else ""]

    rows = [row(FGZ_ROW, whole), row(".fgz: coded pixels (payload)", payload, False),
            row(".fgz: container (index, CRC32s, names)", whole - payload, False)]
    return rows + [row(f"{name}, one file per image", size) for name, size in others.items()]


def heat_note(model: FractalGen, bits: Tensor, vmax: float, payload_bytes: int) -> str:
    """What the heat map of ``bits`` shows: its colour scale and, for exact likelihoods, its total."""
    scale = f"Colour scale: 0 (black) to {vmax:.2f} bits per pixel (pale yellow)"
    if not is_exact(model):
        return (f"{scale}; grey = not scored. **Estimate** (MAR model): each pixel's bits given a random part of "
                "the image, averaged over passes; these do not add up to the coded size, which depends on the "
                "coding order.")
    channels = model.config.channels
    total = float(bits.double().sum())
    return (f"{scale}. Each pixel's -log2 p given the pixels before it (summed over its {channels} channel(s)): "
            f"the maps add up to {total:,.0f} bits ({total / (bits.numel() * channels):.3f} bits/dim), the model's "
            f"exact likelihood; the coded payload is {8 * payload_bytes:,} bits.")


class CompressHandlers(TabHandlers):
    """The Compress tab's handlers for one model (``.fgz`` files go to ``downloads``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.has_test_set = bool(domain_images(self.model, 1))

    @staticmethod
    def _failed(message: str) -> tuple:
        return (gr.skip(),) * 4 + (message,)

    # ------------------------------------------------------------------------------- compress
    def run_uploads(self, paths: Sequence[str] | None, resize: bool, convert: bool) -> Iterator[tuple]:
        """Compress uploaded image files: outputs (sizes, heat map, note, download, status)."""
        try:
            paths = list(paths or [])
            if not paths:
                raise InputError("upload one or more images first, or compress test images")
            self._check_count(len(paths))
            size, channels = self.cfg.image_size, self.cfg.channels
            names = [Path(path).name for path in paths]
            images = []
            for path, name in zip(paths, names):
                check_upload(path, self.max_bytes)
                images.append(read_image(Path(path), size, channels, bool(resize), bool(convert), name=name))
            yield from self._compress(torch.stack(images), names, "uploaded image(s)")
        except Exception as error:  # noqa: BLE001 - every failure becomes a message in the page
            yield self._failed(self.report(error))

    def run_test_images(self, count: float, request: gr.Request) -> Iterator[tuple]:
        """Compress ``count`` test images (generated by the model when it has no test set): same
        outputs as ``run_uploads``."""
        try:
            count = int(count)
            self._check_count(count)
            examples = domain_images(self.model, count)
            if examples:
                images = torch.stack([image for image, _ in examples])
                names = [caption.replace("/", "-") + ".png" for _, caption in examples]
                what = "test image(s)"
            else:
                images = yield from self._generate(count, request)  # streams its progress, returns the images
                names = [f"sample-{k}.png" for k in range(count)]
                what = "image(s) generated by the model (seed 0)"
            yield from self._compress(images, names, what)
        except Cancelled:
            yield self._failed(status_html("cancelled", ok=False))
        except Exception as error:  # noqa: BLE001
            yield self._failed(self.report(error))

    def _check_count(self, count: int) -> None:
        if not 1 <= count <= self.max_images:
            raise InputError(f"compress 1..{self.max_images} images per request (--max-images), got {count}")

    def _generate(self, count: int, request: gr.Request | None) -> Iterator[tuple]:
        """Sample ``count`` images with seed 0, yielding progress; returns them (generator return)."""
        labels = torch.randint(self.cfg.class_num, (count,), generator=torch.Generator().manual_seed(0)) \
            if self.cfg.conditional else None
        call = partial(self.model.sample, labels=labels, num_images=None if labels is not None else count,
                       settings=SamplingConfig(num_iter=self.num_iter), seed=0)
        result = None
        for kind, payload in self.runner.stream(page_key(request), call):
            if kind == "frame":
                step, total, _ = payload
                yield (gr.skip(),) * 4 + (progress_html(step, total),)
            elif kind == "tick":
                yield (gr.skip(),) * 5
            else:
                result = payload
        return result

    def _compress(self, images: Tensor, names: list[str], what: str) -> Iterator[tuple]:
        """Code ``images``, write the ``.fgz`` and yield the tab's outputs."""
        count = images.shape[0]
        yield (gr.skip(),) * 4 + (status_html(f"compressing {count} {what}..."),)
        with self.runner.exclusive():
            data = compress(self.model, images, names=names)
            bits = bits_heatmap(self.model, images).cpu()
        path = self.downloads / f"images-{uuid.uuid4().hex[:8]}.fgz"
        path.write_bytes(data)
        others = lossless_sizes(as_arrays(images))
        rows = size_rows(data, images.numel(), others)
        finite = bits[torch.isfinite(bits)]
        vmax = float(finite.max()) if finite.numel() and float(finite.max()) > 0 else 1.0
        figure = heatmap_figure(images, bits, vmax=vmax).permute(1, 2, 0).numpy()
        note = heat_note(self.model, bits, vmax, sum(read_header(data).group_bytes))
        saving = ""
        if isinstance(others[PNG], int):
            ratio = others[PNG] / len(data)
            saving = f", {ratio:.2f}x smaller than PNG" if ratio >= 1 else f", {1 / ratio:.2f}x larger than PNG"
        condition = "; coded with the null condition (no labels)" if self.cfg.conditional else ""
        status = status_html(f"done: {count} {what} in {len(data):,} bytes, {8 * len(data) / images.numel():.3f} "
                             f"bits/dim{saving}{condition}")
        yield rows, figure, note, str(path), status

    # ------------------------------------------------------------------------------- decompress
    def run_decompress(self, path: str | None) -> tuple:
        """Decode an uploaded ``.fgz`` file: outputs (decoded gallery, status)."""
        if not path:
            return gr.skip(), gr.skip()
        try:
            file = Path(path)
            if file.stat().st_size > self.max_bytes:
                raise InputError(f"upload refused: {file.name} is {file.stat().st_size / 1e6:.1f} MB, over the "
                                 f"{self.max_bytes / 1e6:g} MB limit of this server (--max-upload-mb)")
            data = file.read_bytes()
            header = read_header(data)
            if header.count > self.max_images:
                raise InputError(f"{file.name} holds {header.count} images; this server decodes at most "
                                 f"{self.max_images} per file (--max-images); use `fractalgen decompress`")
            with self.runner.exclusive():
                images, _ = decompress(self.model, data)
        except Exception as error:  # noqa: BLE001 - corrupt files and other models become a message
            return None, self.report(error)
        gallery = list(zip(as_arrays(images), output_names(header)))
        return gallery, status_html(f"decoded {len(gallery)} image(s) from {file.name}; every image matched "
                                    "its CRC32 (bit-exact)")

