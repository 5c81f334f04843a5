"""Saving and loading models as folders: ``config.json`` + ``model.safetensors``.

This module sits below the model: ``FractalGen`` inherits ``PretrainedMixin``, and the checkpoint
module (official ``.pth`` files) builds on both. It imports neither, so loading never climbs back up.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import Tensor, nn

from .config import FractalConfig
from .errors import CheckpointError, ConfigError, InputError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

Model = TypeVar("Model", bound="PretrainedMixin")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same folder and rename it into place, so a reader never
    sees a half-written file and a killed writer leaves the old one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes files private; saved models are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state_strict(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model`` after checking every key and shape; the error names the
    first mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise CheckpointError(f"checkpoint {source} does not match the model config ({'; '.join(parts)}); "
                              "check that the preset/config is the one it was trained with")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for an ``nn.Module`` built as ``cls(config)``
    from a ``FractalConfig`` stored in ``self.config``."""

    config: FractalConfig

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (atomically per file)."""
        from safetensors.torch import save_file

        state = self.state_dict()
        if any(not isinstance(v, Tensor) for v in state.values()):  # int8 layers hold packed weights
            raise InputError("an int8-quantised model cannot be saved; save the float32 model it was made from")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(state, str(path), metadata={"format": "pt"}))
        atomic_write(directory / CONFIG_NAME,
                     lambda path: path.write_text(json.dumps(self.config.to_dict(), indent=2) + "\n"))

    @classmethod
    def from_pretrained(cls: type[Model], directory: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> Model:
        """Load a model saved by ``save_pretrained`` (config.json + model.safetensors), in eval mode
        (training code calls ``.train()`` itself)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise CheckpointError(f"{directory} is not a saved fractalgen model: {name} is missing")
        try:
            config = FractalConfig.load(directory / CONFIG_NAME)
        except ConfigError as e:
            raise CheckpointError(f"{directory / CONFIG_NAME}: {e}") from None
        model = cls(config)
        try:
            state = load_file(str(directory / WEIGHTS_NAME))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"cannot read {directory / WEIGHTS_NAME}: {e}") from None
        load_state_strict(model, state, source=str(directory))
        return model.to(device=device, dtype=dtype).eval()
