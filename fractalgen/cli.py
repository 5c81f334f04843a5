"""Command line: ``fractalgen {info,convert,sample,edit,train,eval,demo,compress,decompress} ...``
(also ``python -m fractalgen``).

This module is the top of the package: it registers every command, imports the modules that
implement them, and is imported by none of them (their shared options are in ``cli_common``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from . import codec_cli, demo, edit, evaluate
from .checkpoint import DEFAULT_MODEL, EDIT_MODEL, SHIPPED_MODELS, load_model, load_official, shipped_model_folder
from .cli_common import (at_least, int8_arg, int_list, load_from_args, model_args, sampling_args,
                         sampling_config, threads_arg)
from .config import PRESETS, FractalConfig, get_preset
from .errors import CheckpointError, FractalGenError
from .flops import format_table
from .model import FractalGen
from .persistence import CONFIG_NAME
from .runtime import autocast, load_image, make_grid, save_gif, save_image
from .train import TrainConfig, train


# ------------------------------------------------------------------------------------------------
# info / convert
# ------------------------------------------------------------------------------------------------

def cmd_info(args) -> None:
    if args.target is None:
        return list_shipped_models()
    if args.target in PRESETS:
        with torch.device("meta"):
            model = FractalGen(get_preset(args.target))
    else:
        model = load_model(args.target)
    cfg = model.config
    counts = model.level_parameters()
    print(f"{args.target}: {sum(counts) / 1e6:.2f}M parameters, {cfg.channels} channel(s), "
          f"{cfg.image_size}x{cfg.image_size}, {cfg.class_num or 'no'} classes")
    print(f"{'level':>5} {'kind':>6} {'image':>6} {'patch':>5} {'tokens':>6} {'width':>5} {'depth':>5} {'heads':>5} {'params':>12}")
    for level, count in enumerate(counts):
        last = level == cfg.num_levels - 1
        kind = "pixel" if last else cfg.generator_type_list[level]
        size = cfg.img_size_list[level]
        patch = "-" if last else cfg.img_size_list[level + 1]
        tokens = cfg.channels if last else cfg.seq_len(level)
        print(f"{level:>5} {kind:>6} {size:>6} {patch:>5} {tokens:>6} {cfg.embed_dim_list[level]:>5} "
              f"{cfg.num_blocks_list[level]:>5} {cfg.num_heads_list[level]:>5} {count:>12,}")
    print()
    print(format_table(cfg, args.flops))


def list_shipped_models() -> None:
    """One line per model installed with the package: the name ``load_model`` / ``--model`` take."""
    print(f"{'name':<10} {'levels':<14} {'image':>5} {'classes':>7} {'params':>10}  folder (model card inside)")
    for name in SHIPPED_MODELS:
        try:
            folder = shipped_model_folder(name)
        except CheckpointError:
            print(f"{name:<10} not installed ({SHIPPED_MODELS[name]} is missing)")
            continue
        cfg = FractalConfig.load(folder / CONFIG_NAME)
        with torch.device("meta"):
            params = sum(FractalGen(cfg).level_parameters())
        levels = "/".join(cfg.generator_type_list[:-1]) + "/pixel"
        roles = [role for role, chosen in (("default", DEFAULT_MODEL), ("edit default", EDIT_MODEL)) if name == chosen]
        used_by = f"  ({', '.join(roles)})" if roles else ""
        print(f"{name:<10} {levels:<14} {cfg.image_size:>5} {cfg.class_num or '-':>7} {params / 1e6:>9.2f}M  "
              f"{folder}{used_by}")


def cmd_convert(args) -> None:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FractalGenError(f"{out} is not empty; choose another folder or pass --force")
    model = load_official(args.checkpoint, args.preset)
    model.save_pretrained(out)
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")


# ------------------------------------------------------------------------------------------------
# sample
# ------------------------------------------------------------------------------------------------

def cmd_sample(args) -> None:
    model, device = load_from_args(args)
    model.sampling_threads = args.threads
    cfg = model.config
    if cfg.conditional:
        classes = list(args.classes) if args.classes else list(range(cfg.class_num))
        labels = torch.tensor(classes).repeat_interleave(args.per_class)
        count, nrow = None, args.per_class
    else:
        if args.classes:
            raise FractalGenError("--classes given but this model is unconditional")
        labels, count, nrow = None, args.num, None
    progress, recorder = _progress(args)
    with autocast(device, args.dtype):
        images = model.sample(labels=labels, num_images=count, settings=sampling_config(args),
                              seed=args.seed, on_step=progress)
    _finish(args, images, progress, recorder, nrow)
    save_image(make_grid(images, nrow=nrow), args.out, scale=args.scale)
    print(f"wrote {args.out} ({images.shape[0]} images)")


def _progress(args):
    """A level-0 progress bar, feeding a frame recorder when --animate is given."""
    recorder = edit.Recorder() if args.animate else None

    def on_step(step: int, total: int, images) -> None:
        if on_step.bar is None:  # created at the first step, so input errors print alone
            on_step.bar = tqdm(total=total, desc="level-0 steps", unit="step", dynamic_ncols=True)
        on_step.bar.update(1)
        if recorder is not None:
            recorder(step, total, images)

    on_step.bar = None
    return on_step, recorder


def _finish(args, images, progress, recorder, nrow) -> None:
    """Close the progress bar and write the animation, if one was recorded."""
    if progress.bar is not None:
        progress.bar.close()
    if recorder is not None:
        save_gif(recorder.finish(images), args.animate, nrow=nrow, scale=args.scale)
        print(f"wrote {args.animate}")


def cmd_edit(args) -> None:
    model, device = load_from_args(args)
    model.sampling_threads = args.threads
    cfg = model.config
    image = load_image(args.image, cfg.channels)
    settings = sampling_config(args, default_cfg=3.0 if args.mode == "class" else 1.0)
    progress, recorder = _progress(args)
    if args.mode == "outpaint":
        if not args.pad:
            raise FractalGenError("outpaint needs --pad top,right,bottom,left")
        image, mask = edit.outpaint_canvas(model, image, args.pad)
    elif args.mode == "uncrop":
        if not args.box:
            raise FractalGenError("uncrop needs --box left,top,right,bottom (the region to keep)")
        image, mask = edit.uncrop_canvas(model, image, args.box)
    else:
        mask = _edit_mask(args, image)
    image = image.reshape(-1, *image.shape[-3:])[0]
    if args.mode == "class" and args.label is None:
        raise FractalGenError("class edits need --label K")
    labels = None if args.label is None else torch.tensor([args.label])
    edit_fn = edit.class_edit if args.mode == "class" else edit.inpaint
    with autocast(device, args.dtype):
        result = edit_fn(model, image, mask, labels, settings=settings, seed=args.seed, on_step=progress)
    _finish(args, result, progress, recorder, None)
    save_image(result[0], args.out)
    print(f"wrote {args.out}")
    if args.figure:
        mask_image = (mask.expand(cfg.channels, *mask.shape).to(torch.uint8) * 255).cpu()
        figure = make_grid(torch.stack([image.cpu(), mask_image, result[0].cpu()]), nrow=3)
        save_image(figure, args.figure, scale=args.scale)
        print(f"wrote {args.figure}")


def _edit_mask(args, image):
    """The regenerate-mask from --mask (white = regenerate) or --box."""
    h, w = image.shape[-2:]
    if args.mask:
        mask = load_image(args.mask, 1)[0] > 127
        if mask.shape != (h, w):
            raise FractalGenError(f"mask {args.mask} is {mask.shape[0]}x{mask.shape[1]} but the image is {h}x{w}")
        return mask
    if args.box and len(args.box) == 4:
        left, top, right, bottom = args.box
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[top:bottom, left:right] = True
        return mask
    raise FractalGenError(f"{args.mode} needs --mask PNG or --box left,top,right,bottom")


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------

def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per dataclass field, typed from its default, with the help text (and any
    other argparse options) of the field's metadata."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        options = dict(f.metadata)
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", default=f.default, **options)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, **options)


def cmd_train(args) -> None:
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    final = train(cfg)
    if final is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {final}")


# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fractalgen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="the shipped models, or one model's architecture and parameters per level")
    p.add_argument("target", nargs="?", help="preset name, shipped model name or model path (none: list the "
                                             "models shipped with the package)")
    p.add_argument("--flops", default="official", choices=["official", "implementation", "paper"],
                   help="FLOP counting convention of the compute table (see fractalgen.flops)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="official .pth -> config.json + model.safetensors folder")
    p.add_argument("checkpoint", help="official .pth checkpoint file")
    p.add_argument("out", help="folder to write config.json and model.safetensors into")
    p.add_argument("--preset", choices=list(PRESETS), help="architecture, when the checkpoint args do not say")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("sample", help="sample a PNG grid (one row per class)")
    model_args(p)
    int8_arg(p)
    sampling_args(p)
    threads_arg(p)
    p.add_argument("--classes", type=int_list, default=(), help="class ids (default: all)")
    p.add_argument("--per-class", type=at_least(int, 1), default=8, help="images per class (one row each)")
    p.add_argument("--num", type=at_least(int, 1), default=16, help="images for an unconditional model")
    p.add_argument("--out", default="samples.png", help="PNG file of the image grid")
    p.add_argument("--scale", type=at_least(int, 1), default=2, help="enlarge the PNG by this factor")
    p.add_argument("--animate", help="also write an animated GIF of the generation")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("edit", help="inpaint, outpaint, uncrop or class-edit an image")
    p.add_argument("mode", choices=["inpaint", "outpaint", "uncrop", "class"],
                   help="regenerate a region (inpaint), grow the image (outpaint), keep a box and generate the "
                        "rest (uncrop), or regenerate a region as another class (class)")
    p.add_argument("--image", required=True, help="input image file")
    p.add_argument("--mask", help="mask PNG, white = regenerate (inpaint, class)")
    p.add_argument("--box", type=int_list, help="left,top,right,bottom: region to regenerate (inpaint, class) "
                                                  "or to keep (uncrop)")
    p.add_argument("--pad", type=int_list, help="top,right,bottom,left margins to add (outpaint)")
    p.add_argument("--label", type=int, help="class of the result (required for class)")
    model_args(p, default=EDIT_MODEL)
    int8_arg(p)
    sampling_args(p)
    threads_arg(p)
    p.add_argument("--out", default="edited.png", help="PNG file of the result")
    p.add_argument("--figure", help="also write input | mask | result side by side")
    p.add_argument("--animate", help="also write an animated GIF of the generation")
    p.add_argument("--scale", type=at_least(int, 1), default=4, help="enlarge the figure and GIF by this factor")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("train", help="train a model (torchrun --nproc_per_node=N -m fractalgen train ...)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_dataclass_args(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    evaluate.add_cli(sub)
    demo.add_cli(sub)
    codec_cli.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FractalGenError as e:
        print(f"fractalgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fractalgen: interrupted", file=sys.stderr)
        return 130
    return 0
