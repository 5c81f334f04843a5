"""Checkpoints: official ``.pth`` files, the project's own folders, and strict loading.

Official checkpoints (the released ``.pth`` files) are ``torch.save({'model': state_dict, 'epoch',
'args'})`` with levels nested as ``next_fractal.``. They are read with ``weights_only=True`` and
``argparse.Namespace`` allow-listed for that one load only, so loading never runs code from the
file. Their keys are renamed to this package's flat layout (``levels.{l}.*``, ``pixel.*``); the
three per-channel codebooks and logit biases of every pixel transformer are stacked into one
tensor each.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from .config import PRESETS, FractalConfig, get_preset
from .errors import CheckpointError
from .model import FractalGen
from .persistence import CONFIG_NAME, load_state_strict


# ------------------------------------------------------------------------------------------------
# Official checkpoints
# ------------------------------------------------------------------------------------------------

_RENAMES = [
    (r"\.pos_embed_learned$", ".pos_emb"),
    (r"\.patch_emb_ln\.", ".input_norm."),
    (r"\.attention\.wqkv\.", ".attn.qkv."),
    (r"\.attention\.wo\.", ".attn.proj."),
    (r"\.feed_forward\.", ".mlp."),
    (r"\.attention_norm\.", ".norm1."),
    (r"\.ffn_norm\.", ".norm2."),
    (r"\.pix_proj\.", ".gp_emb."),
    (r"\.guiding_pixel_loss\.", ".guide."),
    (r"\.cond_proj\.", ".cond_emb."),
    (r"\.ln\.", ".input_norm."),
]
_CHANNEL = re.compile(r"^(.*\.)([rgb])_(codebook\.weight|mlm\.bias)$")


def _rename(key: str) -> str:
    """Official key -> this package's key (before codebook stacking)."""
    if key == "fake_latent":
        return "null_cond"
    if key.startswith("class_emb."):
        return key
    depth = 0
    while key.startswith("next_fractal."):
        key, depth = key[len("next_fractal."):], depth + 1
    key = f"levels.{depth}.{key[len('generator.'):]}" if key.startswith("generator.") else f"pixel.{key}"
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def convert_official_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an official state dict and stack per-channel codebooks/biases (R, G, B order)."""
    out: dict[str, Tensor] = {}
    stacks: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        new = _rename(key)
        match = _CHANNEL.match(new)
        if match:
            prefix, channel, kind = match.groups()
            name = prefix + ("codebook" if kind.startswith("codebook") else "logit_bias")
            stacks.setdefault(name, {})[channel] = value.reshape(256, -1) if kind.startswith("codebook") else value.reshape(256)
        else:
            out[new] = value
    for name, channels in stacks.items():
        if set(channels) != {"r", "g", "b"}:
            raise CheckpointError(f"pixel transformer {name} has codebooks for channels {sorted(channels)}, need r, g, b")
        out[name] = torch.stack([channels[c] for c in "rgb"])
    return out


def read_official(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """Read an official ``.pth``: (state dict, args as a dict). Never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"cannot read {path}: not a PyTorch checkpoint (torch.save zip archive); "
                              "is it truncated or corrupt?")
    if not hasattr(torch.serialization, "safe_globals"):  # older torch could only allow Namespace process-wide
        raise CheckpointError(f"reading {path} needs torch >= 2.5 (torch.serialization.safe_globals), found "
                              f"{torch.__version__}; upgrade with pip install -U torch")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # for this load only
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and argparse.Namespace; refusing to "
                              f"unpickle it ({str(e).splitlines()[0]})") from None
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {e}") from None
    if isinstance(blob, dict) and "model" in blob:
        state, args = blob["model"], blob.get("args")
    elif isinstance(blob, dict) and all(isinstance(v, Tensor) for v in blob.values()):
        state, args = blob, None
    else:
        raise CheckpointError(f"{path} is not an official FractalGen checkpoint (no 'model' state dict)")
    return state, (vars(args) if isinstance(args, argparse.Namespace) else dict(args or {}))


def config_from_official_args(args: dict) -> FractalConfig:
    """The model config recorded in an official checkpoint's ``args``."""
    lists = ("img_size_list", "embed_dim_list", "num_blocks_list", "num_heads_list", "generator_type_list")
    common = {k: args[k] for k in ("class_num", "num_conds", "guiding_pixel", "r_weight", "label_drop_prob",
                                   "attn_dropout", "proj_dropout") if k in args}
    if all(k in args for k in lists):
        return FractalConfig(**{k: args[k] for k in lists}, channels=3, **common)
    if args.get("model") in PRESETS:
        return get_preset(args["model"], **common)
    raise CheckpointError(f"cannot tell the architecture from the checkpoint args (model={args.get('model')!r}); "
                          f"pass a preset, one of: {', '.join(PRESETS)}")


def load_official(path: str | os.PathLike, config: FractalConfig | str | None = None) -> FractalGen:
    """Build a model from an official ``.pth`` (architecture from ``config``, a preset name, or the
    checkpoint's own args) and load its weights with strict key/shape checks; in eval mode."""
    state, args = read_official(path)
    if isinstance(config, str):
        config = get_preset(config, **{k: args[k] for k in ("class_num",) if k in args})
    if config is None:
        config = config_from_official_args(args)
    model = FractalGen(config)
    load_state_strict(model, convert_official_state(state), source=str(path))
    return model.eval()


# ------------------------------------------------------------------------------------------------
# One entry point for every kind of model reference
# ------------------------------------------------------------------------------------------------

_ASSETS = Path(__file__).resolve().parent / "assets"
# Models trained with this package and installed with it, by the name ``load_model`` takes.
SHIPPED_MODELS = {"fmnist-ar": _ASSETS / "fmnist_ar", "fmnist-mar": _ASSETS / "fmnist_mar"}
DEFAULT_MODEL = "fmnist-ar"  # ``load_model()`` with no reference: exact likelihoods, compression
EDIT_MODEL = "fmnist-ar"  # ``fractalgen edit`` and the demo's Edit tab: the one that fills holes best, measured
SHIPPED_MODEL = SHIPPED_MODELS[DEFAULT_MODEL]


def shipped_model_folder(name: str) -> Path:
    """The folder of the shipped model ``name``, checked to be installed."""
    folder = SHIPPED_MODELS[name]
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"the shipped model {name!r} is missing from {folder}; reinstall fractalgen "
                              "or pass a model folder / checkpoint")
    return folder


def load_model(ref: str | os.PathLike | None = None, preset: str | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> FractalGen:
    """Load a saved model folder, an official ``.pth`` file, a model shipped with the package (by
    name: ``fmnist-ar``, the default with no reference, or ``fmnist-mar``), or a freshly initialised
    preset (by name). The model comes back in eval mode, as for inference; training code calls
    ``.train()`` itself."""
    path = Path(ref) if ref is not None else None
    if ref is None or (not path.exists() and str(ref) in SHIPPED_MODELS):
        path = shipped_model_folder(DEFAULT_MODEL if ref is None else str(ref))
    if path.is_dir():
        return FractalGen.from_pretrained(path, device=device, dtype=dtype)
    if path.is_file():
        return load_official(path, preset).to(device=device, dtype=dtype)
    if str(ref) in PRESETS:
        return FractalGen(get_preset(str(ref))).to(device=device, dtype=dtype).eval()
    raise CheckpointError(f"{ref} is neither a model folder (with {CONFIG_NAME}), a checkpoint file, a shipped "
                          f"model ({', '.join(SHIPPED_MODELS)}) nor a preset ({', '.join(PRESETS)})")


