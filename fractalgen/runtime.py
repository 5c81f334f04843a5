"""Devices, precision and image files: the small utilities every command needs."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # Pillow mode of each supported channel count


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; other names are passed to torch.device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InputError(f"unknown device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but CUDA is not available; use --device cpu")
    return device


def autocast(device: torch.device, dtype: str | torch.dtype = "float32"):
    """Mixed precision for ``dtype`` other than float32 (weights stay float32), else a no-op."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode for the block (no label drop, no dropout, the inference MAR
    masks) and restore the mode it had, also on errors."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op CPU threads in this thread, then restore the previous
    count (torch keeps it per thread)."""
    previous = torch.get_num_threads()
    if count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count != previous:
            torch.set_num_threads(previous)


def busy_cores() -> int:
    """Threads of other processes running or runnable right now (the fewest over three looks 2 ms
    apart, so that short bursts do not count); 0 where ``/proc`` is missing."""
    looks = []
    for look in range(3):
        if look:
            time.sleep(0.002)
        looks.append(_running_threads())
    return min(looks)


def _running_threads() -> int:
    """One look at ``/proc``: other processes' threads in state R."""
    me = str(os.getpid())
    count = 0
    with contextlib.suppress(OSError):
        for pid in os.listdir("/proc"):
            if pid.isdigit() and pid != me:
                with contextlib.suppress(OSError):  # the process may end while we look
                    count += sum(_running(f"/proc/{pid}/task/{tid}/stat") for tid in os.listdir(f"/proc/{pid}/task"))
    return count


def _running(stat_path: str) -> bool:
    """Whether the thread of a ``/proc`` stat file is in state R (its field after the command name)."""
    try:
        with open(stat_path) as file:
            text = file.read()
    except OSError:
        return False
    return text[text.rfind(")") + 2:].startswith("R")


def to_pil(image: torch.Tensor) -> Image.Image:
    """A uint8 (C, H, W) tensor as a Pillow image (L, RGB or RGBA)."""
    array = image.detach().cpu().numpy().transpose(1, 2, 0)
    if array.shape[2] not in MODES:
        raise InputError(f"cannot save an image with {array.shape[2]} channels as PNG (need 1, 3 or 4)")
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array, MODES[array.shape[2]])


def pil_to_tensor(pil: Image.Image, channels: int) -> torch.Tensor:
    """A Pillow image as uint8 (C, H, W) with ``channels`` channels."""
    array = np.asarray(pil.convert(MODES[channels])).reshape(pil.height, pil.width, -1)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile uint8 images (B, C, H, W) into one (C, H', W') image with ``nrow`` images per row."""
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i, image in enumerate(images.cpu()):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = image
    return grid


def save_image(image: torch.Tensor, path: str | Path, scale: int = 1) -> None:
    """Write a uint8 (C, H, W) tensor to ``path`` (format from the suffix), optionally enlarged."""
    pil = to_pil(image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)


def save_gif(frames: list[torch.Tensor], path: str | Path, nrow: int | None = None, scale: int = 1,
             duration_ms: int = 80) -> None:
    """Write frames (each uint8 (B, C, H, W)) as an animated GIF of image grids; the last frame
    is held for a second. Grey frames are exact; colour frames are reduced to a 256-colour palette."""
    images = [to_pil(make_grid(f, nrow=nrow)) for f in frames]
    if scale > 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    if images[0].mode != "L":
        images = [im.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
                  for im in images]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    durations = [duration_ms] * (len(images) - 1) + [1000]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0, optimize=False)


def load_image(path: str | Path, channels: int) -> torch.Tensor:
    """Read an image file as uint8 (C, H, W) with ``channels`` channels; clear error if unreadable."""
    try:
        with Image.open(path) as pil:
            return pil_to_tensor(pil, channels)
    except FileNotFoundError:
        raise InputError(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{path} is not a readable image ({e})") from None
