"""Conditional pixel prediction: inpaint, outpaint, uncrop and class-conditional edits.

One mechanism serves all four: the pixels to keep are fixed (``FractalGen.sample(known=...)``)
and only the others are generated, conditioned on them. MAR levels start with every fully known
patch visible and never resample it; partly known patches recurse with their known sub-patches
fixed; the pixel transformer is fed known channels instead of sampling them. Known pixels come
back bit-identical.

AR levels teacher-force known patches and sample the rest in raster order, so an AR level
cannot see known pixels that come *later* in raster order: it fills a hole from above/left only
and the seam below/right of a hole can show. Prefer MAR models for holes and outpainting on the
left/top; AR models are exact for completing the lower/right part of an image.

>>> import torch
>>> from fractalgen import FractalGen, get_preset, SamplingConfig
>>> from fractalgen.edit import inpaint
>>> model = FractalGen(get_preset("fractalmar_fmnist28")).eval()
>>> image = torch.zeros(1, 28, 28, dtype=torch.uint8)
>>> mask = torch.zeros(28, 28, dtype=torch.bool); mask[14:] = True       # regenerate the lower half
>>> out = inpaint(model, image, mask, labels=torch.tensor([3]), settings=SamplingConfig(num_iter=(2, 2)), seed=0)
>>> bool((out[0, :, :14] == image[:, :14]).all())
True
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .errors import InputError
from .model import FractalGen
from .sampling import SamplingConfig

StepCallback = Callable[[int, int, Tensor], None]


def _batch(model: FractalGen, image: Tensor) -> Tensor:
    """(C, H, W) or (B, C, H, W) uint8 -> (B, C, H, W) on the model's device, validated."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    model.check_images(image)
    return image.to(model.device, torch.uint8)


def _unknown_mask(model: FractalGen, image: Tensor, mask: Tensor) -> Tensor:
    """Normalise a regenerate-mask to (B, C, H, W) bool; reject shapes that do not match."""
    b, c, h, w = image.shape
    mask = torch.as_tensor(mask, device=image.device)
    if mask.dtype != torch.bool:
        mask = mask != 0
    if mask.dim() == 2:
        mask = mask[None, None]
    elif mask.dim() == 3:  # one mask per image
        mask = mask[:, None]
    if mask.dim() != 4 or mask.shape[-2:] != (h, w) or mask.shape[0] not in (1, b) or mask.shape[1] not in (1, c):
        raise InputError(f"mask of shape {tuple(mask.shape)} does not match the image {tuple(image.shape)}; "
                         f"give (H, W) = ({h}, {w}), (B, H, W) or (B, {c}, H, W)")
    mask = mask.expand(b, c, h, w)
    if not mask.any():
        raise InputError("the mask marks no pixel to regenerate (white = regenerate); nothing to do")
    if mask.all():
        raise InputError("the mask covers the whole image, so nothing is kept; use sampling instead")
    return mask


def inpaint(model: FractalGen, image: Tensor, mask: Tensor, labels: Tensor | None = None,
            settings: SamplingConfig | None = None, seed: int | None = None,
            on_step: StepCallback | None = None) -> Tensor:
    """Regenerate the pixels where ``mask`` is True, conditioned on the rest (uint8 out)."""
    image = _batch(model, image)
    unknown = _unknown_mask(model, image, mask)
    n = image.shape[0]
    return model.sample(labels=labels, num_images=None if labels is not None else n, settings=settings,
                        seed=seed, on_step=on_step, known=image, known_mask=~unknown)


def outpaint(model: FractalGen, image: Tensor, pad: Sequence[int], **kwargs) -> Tensor:
    """Extend the canvas by ``pad`` = (top, right, bottom, left) pixels and generate the margins.
    The padded size must equal the model's image size."""
    return inpaint(model, *outpaint_canvas(model, image, pad), **kwargs)


def outpaint_canvas(model: FractalGen, image: Tensor, pad: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The padded canvas of ``outpaint`` and its regenerate-mask."""
    if len(pad) != 4:
        raise InputError(f"pad needs 4 margins (top, right, bottom, left), got {tuple(pad)}")
    top, right, bottom, left = (int(v) for v in pad)
    if image.dim() == 3:
        image = image.unsqueeze(0)
    b, c, h, w = image.shape
    s = model.config.image_size
    if min(top, right, bottom, left) < 0 or h + top + bottom != s or w + left + right != s:
        raise InputError(f"outpainting a {h}x{w} image by (top {top}, right {right}, bottom {bottom}, left {left}) "
                         f"gives {h + top + bottom}x{w + left + right}, but the model takes {s}x{s}; "
                         f"choose margins with top+bottom = {s - h} and left+right = {s - w}")
    canvas = torch.zeros(b, c, s, s, dtype=torch.uint8)
    canvas[:, :, top: top + h, left: left + w] = image
    mask = torch.ones(s, s, dtype=torch.bool)
    mask[top: top + h, left: left + w] = False
    return canvas, mask


def uncrop(model: FractalGen, image: Tensor, box: Sequence[int], **kwargs) -> Tensor:
    """Keep the region ``box`` = (left, top, right, bottom) and generate everything around it.
    ``image`` is either a full-size image (its box region is kept) or the crop itself (placed at box)."""
    return inpaint(model, *uncrop_canvas(model, image, box), **kwargs)


def uncrop_canvas(model: FractalGen, image: Tensor, box: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The full-size canvas of ``uncrop`` and its regenerate-mask."""
    if len(box) != 4:
        raise InputError(f"box needs 4 numbers (left, top, right, bottom), got {tuple(box)}")
    left, top, right, bottom = (int(v) for v in box)
    s = model.config.image_size
    if not (0 <= left < right <= s and 0 <= top < bottom <= s):
        raise InputError(f"box {tuple(box)} must satisfy 0 <= left < right <= {s} and 0 <= top < bottom <= {s}")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    h, w = image.shape[-2:]
    if (h, w) == (bottom - top, right - left) and (h, w) != (s, s):
        canvas = torch.zeros(*image.shape[:2], s, s, dtype=torch.uint8)
        canvas[:, :, top:bottom, left:right] = image
        image = canvas
    elif (h, w) != (s, s):
        raise InputError(f"uncrop takes a {s}x{s} image or a crop the size of the box "
                         f"({bottom - top}x{right - left}), got {h}x{w}")
    mask = torch.ones(s, s, dtype=torch.bool)
    mask[top:bottom, left:right] = False
    return image, mask


def class_edit(model: FractalGen, image: Tensor, mask: Tensor, label: int | Tensor,
               settings: SamplingConfig | None = None, **kwargs) -> Tensor:
    """Regenerate the masked region under class ``label`` with classifier-free guidance
    (default cfg 3 when ``settings`` is not given)."""
    if not model.config.conditional:
        raise InputError("class edits need a class-conditional model; this one is unconditional")
    image = image.unsqueeze(0) if image.dim() == 3 else image
    labels = torch.as_tensor(label).reshape(-1).expand(image.shape[0])
    return inpaint(model, image, mask, labels=labels, settings=settings or SamplingConfig(cfg=3.0), **kwargs)


# ------------------------------------------------------------------------------------------------
# Watching it generate
# ------------------------------------------------------------------------------------------------

class Recorder:
    """Collects the canvas after level-0 steps (``on_step``) for an animation, at most
    ``max_frames`` evenly spread frames plus the final image."""

    def __init__(self, max_frames: int = 48):
        self.max_frames = max_frames
        self.frames: list[Tensor] = []

    def __call__(self, step: int, total: int, images: Tensor) -> None:
        every = max(1, -(-total // self.max_frames))
        if step % every == 0 or step == total - 1:
            self.frames.append(images.detach().cpu().clone())

    def finish(self, final: Tensor) -> list[Tensor]:
        """The frames, ending with exactly the returned images."""
        if not self.frames or not torch.equal(self.frames[-1], final.cpu()):
            self.frames.append(final.detach().cpu().clone())
        return self.frames
