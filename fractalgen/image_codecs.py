"""Standard lossless image codecs to set ``.fgz`` sizes against: PNG and WebP from Pillow,
JPEG-XL (and, for benchmarks, JPEG-LS and JPEG 2000) from the optional ``imagecodecs`` package.

Each image is coded as a file of its own and checked to decode to the same pixels. The demo's
Compress tab and ``benchmarks/compress.py`` both take their baselines from here.
"""

from __future__ import annotations

import io
from typing import Callable, Iterable

import numpy as np
from PIL import Image, features

Encode = Callable[[np.ndarray], bytes]
Decode = Callable[[bytes], np.ndarray]
#: A codec: (encode, decode) of one uint8 image (H, W) or (H, W, C), or why it is not available.
Codec = tuple[Encode, Decode] | str

NO_IMAGECODECS = "n/a (pip install imagecodecs)"
PNG = "PNG (Pillow, optimize)"


def _pillow(format: str, **options) -> tuple[Encode, Decode]:
    """Encode and decode with Pillow in ``format`` with its save ``options``."""

    def encode(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format, **options)
        return buffer.getvalue()

    def decode(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image)

    return encode, decode


def _imagecodecs():
    """The imagecodecs module, or None when it is not installed."""
    try:
        import imagecodecs
    except ImportError:
        return None
    return imagecodecs


def image_codecs(extended: bool = False) -> dict[str, Codec]:
    """Name -> codec, in the order to show them. PNG, lossless WebP and lossless JPEG-XL always
    have a row (a str says why one is missing); ``extended`` adds JPEG-LS and JPEG 2000 when
    imagecodecs is installed."""
    codecs: dict[str, Codec] = {PNG: _pillow("PNG", optimize=True)}
    # WebP has no grey mode: Pillow codes grey as RGB; exact=True keeps the colour of transparent pixels
    codecs["WebP lossless (Pillow, method 6)"] = (_pillow("WEBP", lossless=True, quality=100, method=6, exact=True)
                                                  if features.check("webp") else "n/a (Pillow built without WebP)")
    ic = _imagecodecs()
    if ic is None or not ic.JPEGXL.available:
        codecs["JPEG-XL lossless (imagecodecs, effort 9)"] = NO_IMAGECODECS
        return codecs
    codecs["JPEG-XL lossless (imagecodecs, effort 9)"] = (lambda a: ic.jpegxl_encode(a, lossless=True, effort=9),
                                                          ic.jpegxl_decode)
    if extended:
        codecs["JPEG-LS (imagecodecs)"] = (ic.jpegls_encode, ic.jpegls_decode)
        codecs["JPEG 2000 lossless (imagecodecs, JP2 file)"] = (lambda a: ic.jpeg2k_encode(a, reversible=True),
                                                                ic.jpeg2k_decode)
        codecs["JPEG 2000 lossless (imagecodecs, J2K codestream)"] = (
            lambda a: ic.jpeg2k_encode(a, reversible=True, codecformat="J2K"), ic.jpeg2k_decode)
    return codecs


def decodes_exactly(decoded: np.ndarray, array: np.ndarray) -> bool:
    """True when ``decoded`` holds the pixels of ``array``; a grey image may come back as RGB."""
    decoded = np.asarray(decoded)
    if array.ndim == 2 and decoded.ndim == 3 and decoded.shape[:2] == array.shape:
        return all(np.array_equal(decoded[..., c], array) for c in range(min(3, decoded.shape[2])))
    return np.array_equal(decoded.reshape(array.shape) if decoded.size == array.size else decoded, array)


def lossless_sizes(images: Iterable[np.ndarray], codecs: dict[str, Codec] | None = None) -> dict[str, int | str]:
    """Total bytes of ``images`` (uint8 (H, W) or (H, W, C) each) under every codec, one file
    per image (a str where a codec is not available). Raises RuntimeError when a codec does not
    give an image back exactly."""
    codecs = image_codecs() if codecs is None else codecs
    images = list(images)
    sizes: dict[str, int | str] = {}
    for name, codec in codecs.items():
        if isinstance(codec, str):
            sizes[name] = codec
            continue
        encode, decode = codec
        total = 0
        for array in images:
            data = encode(np.ascontiguousarray(array))
            if not decodes_exactly(decode(data), array):
                raise RuntimeError(f"{name} did not decode an image exactly")
            total += len(data)
        sizes[name] = total
    return sizes
