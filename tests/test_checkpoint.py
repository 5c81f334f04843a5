"""Reading official checkpoints never runs code from the file and allows argparse.Namespace for that
load only; every way of loading a model hands it back in eval mode."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import pytest
import torch

from fractalgen import CheckpointError, FractalConfig, FractalGen, load_model, load_official
from fractalgen.checkpoint import read_official

OFFICIAL = Path(__file__).resolve().parent / "fixtures" / "parity" / "ar3" / "checkpoint.pth"


class WritesAFile:
    """Unpickling this object would create ``path``: what a malicious checkpoint does."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "args": WritesAFile(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_official(tmp_path / "evil.pth")
    assert not marker.exists()


def test_namespace_is_allowed_for_the_one_load_only(tmp_path):
    state, args = read_official(OFFICIAL)
    assert args["img_size_list"] == [16, 4, 1] and state
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    torch.save({"args": argparse.Namespace(a=1)}, tmp_path / "namespace.pth")
    with pytest.raises(pickle.UnpicklingError):  # a later plain weights_only load still refuses it
        torch.load(tmp_path / "namespace.pth", weights_only=True)


def test_torch_without_scoped_allow_list_is_refused_not_widened(monkeypatch):
    """Without torch.serialization.safe_globals Namespace could only be allowed process-wide: refuse instead."""
    monkeypatch.delattr(torch.serialization, "safe_globals")
    with pytest.raises(CheckpointError, match=r"needs torch >= 2\.5 .*pip install -U torch"):
        read_official(OFFICIAL)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


def test_every_way_of_loading_gives_a_model_in_eval_mode(tmp_path):
    """A saved folder (from_pretrained, load_model), a shipped model, a preset and an official
    .pth all come back in eval mode, every submodule included, even when saved from train mode."""
    cfg = FractalConfig((8, 4, 1), (32, 16, 16), (1, 1, 1), (2, 2, 2), ("ar", "ar", "ar"), channels=1, class_num=3,
                        num_conds=1)
    FractalGen(cfg).train().save_pretrained(tmp_path / "m")
    loaded = {"from_pretrained": FractalGen.from_pretrained(tmp_path / "m"), "folder": load_model(tmp_path / "m"),
              "shipped default": load_model(), "shipped by name": load_model("fmnist-mar"),
              "preset": load_model("fractalar_fmnist28"), "official .pth": load_model(OFFICIAL),
              "load_official": load_official(OFFICIAL)}
    training = {name: [n for n, module in model.named_modules() if module.training] for name, model in loaded.items()}
    assert training == {name: [] for name in loaded}
