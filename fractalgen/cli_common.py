"""What the commands share: the model options, loading the model they name, and the sampling
options. Every command module (``cli``, ``evaluate``, ``demo``) imports this one, which imports
none of them."""

from __future__ import annotations

import argparse
from typing import Callable

import torch

from .checkpoint import DEFAULT_MODEL, load_model
from .config import PRESETS
from .model import COMPILE_MODES, FractalGen
from .quantize import quantize_int8
from .runtime import DTYPES, resolve_device
from .sampling import SamplingConfig


def int_list(text: str) -> tuple[int, ...]:
    """``"64,16"`` -> ``(64, 16)``, as an argparse type."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def positive_int_list(text: str) -> tuple[int, ...]:
    """``int_list`` whose values are all >= 1."""
    values = int_list(text)
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
    return values


def at_least(kind: type, low: float, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a ``kind`` (int or float) >= ``low`` (> ``low`` when ``strict``), so
    that out-of-range values are refused with the option's name."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def model_args(parser: argparse.ArgumentParser, default: str = DEFAULT_MODEL, device: str = "auto",
               device_help: str = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps",
               dtype: bool = True) -> None:
    """--model (the shipped model ``default`` when not given), --preset, --device (default
    ``device``) and, with ``dtype``, --dtype. Every command that loads a model takes its options
    from here, so ``model_ref`` always knows the default."""
    parser.add_argument("--model", help="saved model folder, official .pth checkpoint, name of a shipped model "
                                        "(`fractalgen info` lists them) or preset name (default: the shipped "
                                        f"Fashion-MNIST model {default})")
    parser.set_defaults(default_model=default)
    parser.add_argument("--preset", choices=list(PRESETS), help="architecture of an official .pth without args")
    parser.add_argument("--device", default=device, help=device_help)
    if dtype:
        parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                            help="autocast precision (weights stay float32)")


def int8_arg(parser: argparse.ArgumentParser) -> None:
    """--int8, for the commands that only run the model forward (sampling, likelihood)."""
    parser.add_argument("--int8", action="store_true",
                        help="int8 weights in the transformer blocks (CPU only): faster on large batches, "
                             "slightly different numbers; float32 stays the reference")


def model_ref(args: argparse.Namespace) -> str:
    """The model a command loads: --model, or the default its ``model_args`` set."""
    if args.model:
        return args.model
    if "default_model" not in args:
        raise TypeError("the command's parser has a --model option that model_args did not add; "
                        "register its model options with cli_common.model_args")
    return args.default_model


def load_from_args(args: argparse.Namespace) -> tuple[FractalGen, torch.device]:
    """The model of ``model_args`` in eval mode on its device, int8 when the command has --int8
    and it is given, its sampling steps compiled when it has --compile and it is given."""
    device = resolve_device(args.device)
    model = load_model(model_ref(args), preset=args.preset, device=device)
    if getattr(args, "int8", False):
        model = quantize_int8(model)
    if getattr(args, "compile", None):
        model.compile_sampling(mode=args.compile)
    return model, device


def threads_arg(parser: argparse.ArgumentParser) -> None:
    """--threads, for the commands that sample (it sets ``FractalGen.sampling_threads``)."""
    parser.add_argument("--threads", type=at_least(int, 1),
                        help="intra-op CPU threads while sampling (default: chosen by the work: one for small "
                             "models such as the shipped ones, whose steps would wait for each other, all of "
                             "torch's for large matrix products)")


def sampling_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that samples."""
    parser.add_argument("--cfg", type=at_least(float, 0),
                        help="classifier-free guidance scale (default 1 = off; 3 for class edits)")
    parser.add_argument("--cfg-schedule", default="constant", choices=["constant", "linear"],
                        help="guidance over the level-0 steps: constant, or rising linearly from 1 to --cfg")
    parser.add_argument("--temperature", type=at_least(float, 0, strict=True), default=1.0,
                        help="true temperature (logits / T)")
    parser.add_argument("--official-temperature", action="store_true",
                        help="multiply logits by --temperature, as the official code does")
    parser.add_argument("--filter-threshold", type=at_least(float, 0), default=1e-4,
                        help="with guidance, never pick a pixel value whose conditional probability is below this")
    parser.add_argument("--num-iter", type=positive_int_list, default=(), help="MAR iterations per level, e.g. 64,16")
    parser.add_argument("--seed", type=int, default=0, help="random seed (the same seed gives the same images)")
    parser.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES,
                        help="compile the sampling steps with this torch.compile mode (on CUDA run inside the "
                             "sampler's CUDA graphs; 'reduce-overhead' makes torch's own instead); pays off for "
                             "long runs, the first call is slow while it compiles")


def sampling_config(args: argparse.Namespace, default_cfg: float = 1.0) -> SamplingConfig:
    """The ``SamplingConfig`` of the ``sampling_args`` options."""
    return SamplingConfig(cfg=default_cfg if args.cfg is None else args.cfg, cfg_schedule=args.cfg_schedule,
                          temperature=args.temperature, official_temperature=args.official_temperature,
                          filter_threshold=args.filter_threshold, num_iter=args.num_iter)
