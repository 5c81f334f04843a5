"""Reduced-precision CPU inference: int8 weights in the transformer blocks' linear layers.

Dynamic quantisation stores each weight as int8 with one scale per output channel and quantises
a layer's input on the fly, per call; the products run in integer arithmetic (fbgemm). It is an
opt-in for sampling and likelihood on CPU - the numbers change slightly, so the float32 model
stays the default and the reference. Embeddings, condition projections, the pixel logits and the
first block of each stack stay float32: they are small or set every later value directly.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .errors import InputError
from .layers import LlamaBlock, ViTBlock


def _int8_linear(layer: nn.Linear) -> nn.Module:
    """An int8 dynamically quantised copy of ``layer`` (symmetric, per output channel)."""
    try:
        from torch.ao.nn.quantized import dynamic as nnqd
    except ImportError as e:  # eager-mode quantisation is deprecated and may leave torch
        raise InputError(f"this torch ({torch.__version__}) has no dynamic quantisation ({e}); drop --int8") from None
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    plain.load_state_dict(layer.state_dict())
    plain.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    with warnings.catch_warnings():  # torch.ao's eager quantisation warns that it is deprecated
        warnings.simplefilter("ignore")
        return nnqd.Linear.from_float(plain)


def _quantised_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks to quantise: all but the first of every stack of more than one. A stack's
    first block reads the embeddings and feeds every later block, so its rounding costs the most
    (on the shipped Fashion-MNIST model int8 there moves bits/dim four times as much)."""
    blocks = []
    for stack in model.modules():
        if isinstance(stack, nn.ModuleList) and all(isinstance(b, (LlamaBlock, ViTBlock)) for b in stack):
            blocks += list(stack)[1:] if len(stack) > 1 else list(stack)
    return blocks


def quantize_int8(model: nn.Module, min_weights: int = 1 << 16) -> nn.Module:
    """A copy of ``model`` (in eval mode) whose transformer blocks' linear layers with at least
    ``min_weights`` weights hold int8 weights (quantising the input of a smaller layer costs more
    than its product saves), except in the first block of each stack. CPU only; for sampling and
    likelihood, not for training or saving."""
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise InputError(f"int8 quantisation runs on CPU only, the model is on {', '.join(sorted(devices))}; "
                         "use --device cpu or drop --int8")
    model = copy.deepcopy(model).eval()
    for block in _quantised_blocks(model):
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and child.weight.numel() >= min_weights:
                    setattr(parent, name, _int8_linear(child))
    return model
