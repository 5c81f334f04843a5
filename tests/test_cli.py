"""Command line: info, convert and sample."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from fractalgen import (CheckpointError, FractalConfig, FractalGen, FractalGenError, cli_common, get_preset, load_model,
                        load_official)
from fractalgen.checkpoint import DEFAULT_MODEL, EDIT_MODEL, SHIPPED_MODELS
from fractalgen.cli import build_parser, main
from test_model import VARIANTS, tiny
from test_parity import CASES


def test_info_prints_parameters_per_level(capsys):
    assert main(["info", "fractalmar_base_in256"]) == 0
    out = capsys.readouterr().out
    with torch.device("meta"):
        counts = FractalGen(get_preset("fractalmar_base_in256")).level_parameters()
    assert "186.30M parameters" in out
    for count in counts:
        assert f"{count:,}" in out
    assert "GFLOPs/img" in out


def test_info_unknown_preset_is_one_line(capsys):
    assert main(["info", "no_such_model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fractalgen: error:") and "\n" not in err


@pytest.mark.skipif(not CASES, reason="no parity fixtures")
def test_convert_official_checkpoint_roundtrip(tmp_path, capsys):
    case = CASES[0]
    assert main(["convert", str(case / "checkpoint.pth"), str(tmp_path / "out")]) == 0
    official = load_official(case / "checkpoint.pth")
    converted = FractalGen.from_pretrained(tmp_path / "out")
    assert converted.config == official.config
    for (k1, v1), (k2, v2) in zip(official.state_dict().items(), converted.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert main(["convert", str(case / "checkpoint.pth"), str(tmp_path / "out")]) == 2  # never overwrites
    assert "not empty" in capsys.readouterr().err


def test_sample_cli_writes_one_row_per_class(tmp_path):
    model = tiny(**VARIANTS["mar-ar-grey"], class_num=3)
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(tmp_path / "m"), "--per-class", "2", "--num-iter", "2,2",
                 "--out", str(out), "--scale", "1", "--animate", str(tmp_path / "a.gif")]) == 0
    grid = np.asarray(Image.open(out))
    pad, size = 2, 16
    assert grid.shape == (3 * (size + pad) + pad, 2 * (size + pad) + pad)
    assert Image.open(tmp_path / "a.gif").n_frames > 1
    again = tmp_path / "again.png"
    assert main(["sample", "--model", str(tmp_path / "m"), "--per-class", "2", "--num-iter", "2,2",
                 "--out", str(again), "--scale", "1"]) == 0
    assert np.array_equal(grid, np.asarray(Image.open(again)))  # same seed, same grid


@pytest.mark.parametrize("flag, mode", [(["--compile"], "default"), (["--compile", "reduce-overhead"], "reduce-overhead")])
def test_sample_and_edit_cli_compile_the_sampling_steps(tmp_path, monkeypatch, flag, mode):
    """--compile [MODE] hands the mode to FractalGen.compile_sampling (stubbed: compiling is tested
    in test_model) before sampling."""
    calls = []

    def record(model, **options):
        calls.append(options)
        return model

    monkeypatch.setattr(FractalGen, "compile_sampling", record)
    tiny(**VARIANTS["mar-ar-grey"], class_num=3).save_pretrained(tmp_path / "m")
    common = ["--model", str(tmp_path / "m"), "--num-iter", "1,1", *flag]
    assert main(["sample", *common, "--classes", "1", "--per-class", "1", "--out", str(tmp_path / "s.png")]) == 0
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "in.png")
    assert main(["edit", "inpaint", *common, "--image", str(tmp_path / "in.png"), "--box", "0,8,16,16",
                 "--out", str(tmp_path / "e.png")]) == 0
    assert calls == [{"mode": mode}] * 2


def test_sample_and_edit_cli_sample_on_the_threads_given(tmp_path, monkeypatch):
    """--threads N holds while sampling; without it the work decides (one thread for a tiny model)."""
    seen = []
    real = FractalGen._sample_level

    def record(self, index, *args):
        if index == 0:
            seen.append(torch.get_num_threads())
        return real(self, index, *args)

    monkeypatch.setattr(FractalGen, "_sample_level", record)
    tiny(**VARIANTS["mar-ar-grey"], class_num=3).save_pretrained(tmp_path / "m")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "in.png")
    sample = ["sample", "--model", str(tmp_path / "m"), "--num-iter", "1,1", "--classes", "1", "--per-class", "1",
              "--out", str(tmp_path / "s.png")]
    edit = ["edit", "inpaint", "--model", str(tmp_path / "m"), "--num-iter", "1,1", "--image", str(tmp_path / "in.png"),
            "--box", "0,8,16,16", "--out", str(tmp_path / "e.png")]
    for argv in (sample, edit):
        assert main([*argv, "--threads", "2"]) == 0 and main(argv) == 0
    assert seen == [2, 1, 2, 1]


@pytest.mark.parametrize("argv, message", [
    (["sample", "--temperature", "0"], "argument --temperature: must be > 0, got 0"),
    (["sample", "--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["sample", "--num-iter", "64,0"], "argument --num-iter: every value must be >= 1, got '64,0'"),
    (["edit", "inpaint", "--image", "x.png", "--cfg", "-1"], "argument --cfg: must be >= 0, got -1"),
    (["sample", "--per-class", "0"], "argument --per-class: must be >= 1, got 0"),
    (["demo", "--max-images", "two"], "argument --max-images: expected an integer, got 'two'"),
])
def test_out_of_range_options_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_train_options_are_named(tmp_path, capsys):
    for flag, value, message in (("--save-every", "0", "--save-every must be >= 1, got 0"),
                                 ("--ema-decay", "1", "--ema-decay must be in [0, 1), got 1.0")):
        assert main(["train", "--out", str(tmp_path), flag, value]) == 2
        assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing is written before the options are checked"


def test_shipped_models_are_listed_and_load_by_name(capsys):
    """`fractalgen info` lists every shipped model; each loads by its name, the default one with no
    reference too (it is the class-conditional AR model of Fashion-MNIST)."""
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name, folder in SHIPPED_MODELS.items():
        assert name in out and str(folder) in out
        assert load_model(name).config == FractalConfig.load(folder / "config.json")
    default, named = load_model(), load_model(DEFAULT_MODEL)
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), named.state_dict().values()))
    cfg = default.config
    assert (cfg.image_size, cfg.channels, cfg.class_num, cfg.generator_type_list[0]) == (28, 1, 10, "ar")


@pytest.mark.parametrize("argv, expected", [
    (["sample"], DEFAULT_MODEL), (["eval", "nll", "--data", "fashion-mnist"], DEFAULT_MODEL),
    (["edit", "inpaint", "--image", "x.png"], EDIT_MODEL),
    (["edit", "inpaint", "--image", "x.png", "--model", "mine"], "mine")])
def test_each_command_defaults_to_its_shipped_model(monkeypatch, argv, expected):
    """Edits default to the shipped model that fills holes best (a shipped one), everything else to the
    default one; --model overrides both."""
    assert EDIT_MODEL in SHIPPED_MODELS
    seen = []

    def spy(ref, **kwargs):
        seen.append(ref)
        raise FractalGenError("stop here")

    monkeypatch.setattr(cli_common, "load_model", spy)
    assert main(argv) == 2 and seen == [expected]


def commands(parser: argparse.ArgumentParser, path: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its command line, e.g. ``"eval nll"``."""
    found = {path: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= commands(sub, f"{path} {name}".strip())
    return found


def test_every_command_that_loads_a_model_has_its_default():
    """An optional --model means "this model, else the command's default": every command with one
    takes it from model_args, which sets that default, so model_ref resolves a model for all of
    them (a command that added --model by hand would fail here, not in a user's hands)."""
    defaults = {name: p.get_default("default_model") for name, p in commands(build_parser()).items()
                if any("--model" in a.option_strings and a.default is None for a in p._actions)}
    assert defaults == {"sample": DEFAULT_MODEL, "edit": EDIT_MODEL, "eval nll": DEFAULT_MODEL,
                        "eval fid": DEFAULT_MODEL, "demo": DEFAULT_MODEL, "compress": DEFAULT_MODEL,
                        "decompress": DEFAULT_MODEL}
    args = build_parser().parse_args(["decompress", "a.fgz", "--out", "x"])
    assert cli_common.model_ref(args) == DEFAULT_MODEL
    assert cli_common.model_ref(build_parser().parse_args(["decompress", "a.fgz", "--out", "x", "--model", "m"])) == "m"
    with pytest.raises(TypeError, match="register its model options with cli_common.model_args"):
        cli_common.model_ref(argparse.Namespace(model=None))


def test_unknown_or_missing_shipped_model_is_named(monkeypatch, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="shipped model \\(fmnist-ar"):
        load_model("fmnist-gan")
    monkeypatch.setitem(SHIPPED_MODELS, DEFAULT_MODEL, tmp_path / "gone")
    with pytest.raises(CheckpointError, match="'fmnist-ar' is missing .* reinstall fractalgen"):
        load_model()
    assert main(["info"]) == 0
    assert "fmnist-ar  not installed" in capsys.readouterr().out
