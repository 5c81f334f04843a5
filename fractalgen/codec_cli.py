"""The ``fractalgen compress`` and ``fractalgen decompress`` commands (``codec`` does the coding).

Images are read losslessly: a file whose pixels the model cannot hold exactly (another size,
colour for a grey model, transparency for an RGB one, 16-bit samples) is refused with the flag
that converts it (``--resize``, ``--convert``), and then the converted image is what is stored.
Files are written atomically and a failed command leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .cli_common import at_least, int_list, load_from_args, model_args, positive_int_list
from .codec import DEFAULT_GROUP, compress, decompress, model_id, read_header
from .container import Header
from .data import IMAGE_EXTENSIONS, center_crop_arr
from .errors import InputError
from .model import FractalGen
from .runtime import MODES, to_pil

_EIGHT_BIT = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")  # modes whose pixels RGBA holds exactly


# ------------------------------------------------------------------------------------------------
# Reading images
# ------------------------------------------------------------------------------------------------

def image_files(inputs: list[str]) -> list[Path]:
    """Image files named on the command line, folders expanded to their image files (sorted, not recursive)."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not p.name.startswith("."))
            if not found:
                raise InputError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder {item}")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise InputError(f"{item} does not exist; give image files or folders of them")
    outputs = {}
    for path in files:
        other = outputs.setdefault(path.stem + ".png", path)
        if other != path:
            raise InputError(f"{other} and {path} would both decompress to {path.stem}.png; rename one of them")
    return files


def read_image(path: Path, size: int, channels: int, resize: bool, convert: bool, name: str | None = None
               ) -> torch.Tensor:
    """The pixels of ``path`` as uint8 (C, S, S) for the model, refused unless they fit exactly;
    messages call the file ``name`` (default: its path)."""
    shown = name or path
    try:
        with Image.open(path) as pil:
            pil.load()
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{shown} is not a readable image ({e})") from None
    if pil.mode not in _EIGHT_BIT and not convert:
        raise InputError(f"{shown} has {pil.mode} pixels, which 8-bit channels cannot hold exactly; convert it to "
                         "8-bit grey/RGB/RGBA first, or pass --convert")
    if pil.size != (size, size):
        if not resize:
            raise InputError(f"{shown} is {pil.width}x{pil.height} but the model takes {size}x{size} images; resize "
                             "it first, or pass --resize (centre-crop and scale: the resized image is stored)")
        pil = center_crop_arr(pil if pil.mode in ("L", "RGB", "RGBA") else pil.convert("RGBA"), size)
    rgba = np.asarray(pil.convert("RGBA"))
    lost = _lost_by_conversion(rgba, channels)
    if lost and not convert:
        raise InputError(f"{shown} has {lost} but the model takes {MODES[channels]} images; convert it first, "
                         f"or pass --convert (the converted image is stored)")
    array = np.asarray(pil.convert(MODES[channels])).reshape(size, size, channels)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def _lost_by_conversion(rgba: np.ndarray, channels: int) -> str:
    """What converting RGBA pixels to ``channels`` channels would lose ('' when nothing)."""
    if channels < 4 and (rgba[..., 3] != 255).any():
        return "transparency"
    if channels == 1 and ((rgba[..., 0] != rgba[..., 1]) | (rgba[..., 1] != rgba[..., 2])).any():
        return "colour"
    return ""


def _labels(values: tuple[int, ...], count: int) -> torch.Tensor | None:
    """--labels: one class for every image, or one per image."""
    if not values:
        return None
    if len(values) not in (1, count):
        raise InputError(f"--labels gives {len(values)} classes for {count} images; give one for all or one per image")
    return torch.tensor(values * count if len(values) == 1 else values)


# ------------------------------------------------------------------------------------------------
# Writing files
# ------------------------------------------------------------------------------------------------

def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_pngs(folder: Path, names: list[str], images: torch.Tensor) -> None:
    """Write every image as a PNG into ``folder``: all into a hidden folder there first, then
    renamed into place, so that a failure leaves no partial output."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".decompress-"))
    try:
        for name, image in zip(names, images):
            to_pil(image).save(staging / name)
        for name in names:
            os.replace(staging / name, folder / name)
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def output_names(header: Header) -> list[str]:
    """The PNG name of each image: its original name with the suffix .png, or its index."""
    if header.names is None:
        return [f"image_{i:06d}.png" for i in range(header.count)]
    return [Path(name).stem + ".png" for name in header.names]


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------

def _summary(header: Header, size: int) -> str:
    """Payload and container sizes in bytes and bits/dim."""
    payload = sum(header.group_bytes)
    dims = header.count * header.dims
    return (f"{header.count} images, coded pixels {payload:,} bytes ({8 * payload / dims:.3f} bits/dim), "
            f"container {size - payload:,} bytes ({(size - payload) / header.count:.1f} per image), "
            f"file {8 * size / dims:.3f} bits/dim")


def cmd_compress(args: argparse.Namespace) -> None:
    if args.info:
        if args.inputs or args.out:
            raise InputError("--info reads one .fgz file; give no images and no --out")
        _info(args)
        return
    if not args.inputs or not args.out:
        raise InputError("give image files or folders and --out FILE.fgz (or --info FILE.fgz)")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise InputError(f"{out} exists; choose another name or pass --force to replace it")
    if not out.parent.is_dir():
        raise InputError(f"the folder of {out} does not exist; create it first")
    files = image_files(args.inputs)
    model, _ = load_from_args(args)
    cfg = model.config
    images = torch.stack([read_image(f, cfg.image_size, cfg.channels, args.resize, args.convert) for f in files])
    data = compress(model, images, _labels(args.labels, len(files)), [f.name for f in files], args.group_size,
                    args.num_iter, args.seed, args.workers, progress=True)
    write_atomic(out, data)
    print(f"wrote {out}: {_summary(read_header(data), len(data))}")


def _info(args: argparse.Namespace) -> None:
    """--info: what a .fgz file holds and whether the model given (default: the shipped one) coded it."""
    data = _read(Path(args.info))
    header = read_header(data)
    model: FractalGen = load_from_args(args)[0]
    which = "the model given" if args.model else "the shipped model"
    match = f"{which}" if model_id(model) == header.model_id else f"not {which}"
    schedule = f", MAR iterations {','.join(map(str, header.num_iter))}, seed {header.seed}" if header.num_iter else ""
    print(f"{args.info}: {_summary(header, len(data))}")
    print(f"images {header.channels}x{header.image_size}x{header.image_size}, "
          f"{'labels stored' if header.labels is not None else 'null condition (no labels)'}, "
          f"groups of {header.group_size}{schedule}")
    print(f"model {header.model_id.hex()} ({match}), coded on {header.device} with {header.software}")
    if header.names:
        shown = ", ".join(header.names[:5]) + (f", ... ({header.count} in all)" if header.count > 5 else "")
        print(f"names: {shown}")


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise InputError(f"{path} does not exist; give a .fgz file written by fractalgen compress")
    return path.read_bytes()


def cmd_decompress(args: argparse.Namespace) -> None:
    data = _read(Path(args.file))
    header = read_header(data)
    names = output_names(header)
    select = list(range(header.count))
    if args.image:
        index = {name: i for i, name in enumerate(header.names or names)} | {n: i for i, n in enumerate(names)}
        missing = [n for n in args.image if n not in index]
        if missing:
            raise InputError(f"{missing[0]} is not in {args.file}; `fractalgen compress --info {args.file}` lists it")
        select = [index[n] for n in args.image]
    out = Path(args.out)
    clashes = [names[i] for i in select if (out / names[i]).exists()]
    if clashes and not args.force:
        raise InputError(f"{out / clashes[0]} exists ({len(clashes)} files would be replaced); "
                         "choose another folder or pass --force")
    model, _ = load_from_args(args)
    images, _ = decompress(model, data, select, args.workers, progress=True)
    write_pngs(out, [names[i] for i in select], images)
    print(f"wrote {len(select)} PNG files into {out}")


def _model_options(p: argparse.ArgumentParser) -> None:
    """The model options (no --dtype: the codec always computes in float32), --workers and --force."""
    model_args(p, device="cpu", dtype=False,
               device_help="device that computes the probabilities (default cpu); a file decodes only on the kind "
                           "of device that wrote it, and only with the model that wrote it")
    p.add_argument("--workers", type=at_least(int, 1),
                   help="groups coded side by side on threads (default: one per core, at most 8); "
                        "the file does not depend on it")
    p.add_argument("--force", action="store_true", help="replace existing output files")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``compress`` and ``decompress`` on the top-level subparsers of ``fractalgen``."""
    p = subparsers.add_parser("compress", help="compress images losslessly with the model (.fgz)")
    p.add_argument("inputs", nargs="*", metavar="IMAGE", help="image files or folders of them (not recursive)")
    p.add_argument("--out", help="the .fgz file to write")
    p.add_argument("--info", metavar="FILE", help="print what a .fgz file holds instead (images, model, bits/dim)")
    p.add_argument("--labels", type=int_list, default=(),
                   help="class of every image (one value) or of each image (comma-separated); default: the null "
                        "condition (the model's unconditional likelihood)")
    p.add_argument("--resize", action="store_true", help="centre-crop and scale images of another size "
                                                         "(the resized image is what is stored)")
    p.add_argument("--convert", action="store_true", help="convert images with channels the model lacks (colour, "
                                                          "transparency, 16-bit) (the converted image is stored)")
    p.add_argument("--group-size", type=at_least(int, 1), default=DEFAULT_GROUP,
                   help="images coded together; decoding one image decodes its group")
    p.add_argument("--num-iter", type=positive_int_list, default=(),
                   help="MAR iterations per level (default: one per patch, the fewest bits)")
    p.add_argument("--seed", type=at_least(int, 0), default=0, help="seed of the MAR generation order")
    _model_options(p)
    p.set_defaults(func=cmd_compress)

    p = subparsers.add_parser("decompress", help="decompress a .fgz file into one PNG per image")
    p.add_argument("file", help="the .fgz file")
    p.add_argument("--out", required=True, help="folder to write the PNG files into (named after the originals)")
    p.add_argument("--image", action="append", metavar="NAME",
                   help="decompress only this image (original or PNG name; repeatable); decodes only its group")
    _model_options(p)
    p.set_defaults(func=cmd_decompress)
