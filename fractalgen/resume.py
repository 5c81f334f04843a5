"""Training runs on disk, resumable exactly.

A checkpoint ``<out>/checkpoints/step_XXXXXXX`` holds the weights (``config.json`` +
``model.safetensors``, loadable by ``FractalGen.from_pretrained``), the EMA weights as a model
folder ``ema/``, and ``state.pt``: step, optimizer, scheduler, EMA tensors and the random state of
every process (torch, CUDA, numpy, Python and the flip generator), so each process of a resumed
run draws the masks, label drops and flips it would have drawn. The data order needs no state: it
is a function of (seed, epoch) and the position in it follows from the step. A checkpoint is
written to a temporary folder and renamed into place, and ``latest`` is replaced atomically, so a
killed run loses nothing it saved.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import FractalConfig
from .errors import CheckpointError, FractalGenError
from .model import FractalGen
from .persistence import CONFIG_NAME, atomic_write


def check_out_folder(out: Path, resume: str, model_config: FractalConfig) -> Path | None:
    """Check that ``out`` is writable and fits ``resume``: "no" (start a run: none may be there),
    "yes" (continue the run there) or "auto" (continue it if there is one, else start one).
    Returns the checkpoint to resume from, or None to start."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise FractalGenError(f"output folder {out} is not writable ({e.strerror}); choose another --out") from None
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        if resume == "yes":
            raise CheckpointError(f"--resume given but {out} has no checkpoint to resume from (--resume auto "
                                  "starts a run when there is none)")
        return None
    if resume == "no":
        raise FractalGenError(f"{out} already holds a run (checkpoint {ckpt.name}); pass --resume to continue it "
                              "or choose another --out (nothing was overwritten)")
    saved = FractalConfig.load(ckpt / CONFIG_NAME)
    if saved != model_config:
        diff = [f.name for f in dataclasses.fields(saved) if getattr(saved, f.name) != getattr(model_config, f.name)]
        raise CheckpointError(f"checkpoint {ckpt} was trained with a different model config (differs in {diff}); "
                              f"resume with the same --model or choose another --out")
    return ckpt


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint ``latest`` points at, or None."""
    pointer = out / "latest"
    if not pointer.is_file():
        return None
    path = out / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


def save_checkpoint(out: Path, step: int, model: FractalGen, ema_model: FractalGen | None, state: dict,
                    keep: int = 2) -> Path:
    """Write ``checkpoints/step_XXXXXXX`` (model, ``ema/``, ``state.pt``) atomically, point
    ``latest`` at it and remove all but the ``keep`` newest."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if ema_model is not None:
        ema_model.save_pretrained(tmp / "ema")
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(out / "latest", lambda p: p.write_text(final.name + "\n"))
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: Path) -> dict:
    """The ``state.pt`` of a checkpoint (tensors and plain values only)."""
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read training state {path / 'state.pt'}: {e}") from None


def rng_state(flip_gen: torch.Generator) -> dict:
    """This process's random state, in types that ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                        has_gauss, gauss),
             "python": random.getstate(), "flip": flip_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rank_states(state: dict) -> list[dict]:
    """The random state of every process that wrote ``state`` (checkpoints written before states
    were kept per process hold one, rank 0's)."""
    if "rng" in state:
        return state["rng"]
    legacy = {"torch": state["rng_cpu"], "flip": state["rng_flip"]}
    return [legacy | ({"cuda": state["rng_cuda"]} if "rng_cuda" in state else {})]


def restore_rng(state: dict, flip_gen: torch.Generator) -> None:
    """Set this process's random state from ``rng_state``'s output."""
    torch.set_rng_state(state["torch"])
    flip_gen.set_state(state["flip"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "python" in state:
        random.setstate(state["python"])
