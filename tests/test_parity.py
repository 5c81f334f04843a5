"""Parity with the official code: every case folder of recorded fixtures is loaded through the
official-checkpoint path and must reproduce each recorded tensor to 1e-5 absolute.

The fixtures ship in tests/fixtures/parity (its README describes them); FRACTALGEN_PARITY_DIR
points the tests at another folder in the same format. Missing fixtures fail every test: none skips.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fractalgen import FractalGen, SamplingConfig, get_preset
from fractalgen.checkpoint import convert_official_state, load_official
from fractalgen.context import SampleContext, normalize, patchify, quantize

TOL = 1e-5
REPO = Path(__file__).resolve().parents[1]
SHIPPED_DIR = Path(__file__).resolve().parent / "fixtures" / "parity"
PARITY_DIR = Path(os.environ.get("FRACTALGEN_PARITY_DIR") or SHIPPED_DIR)
CASE_FILES = ("config.json", "checkpoint.pth", "data.safetensors")
NO_FIXTURES = pytest.param(None, id="no-fixtures")


def _cases() -> dict[Path, set[str]]:
    """Case folders under PARITY_DIR and the names of the tensors each records (read from the header)."""
    if not PARITY_DIR.is_dir():
        return {}
    found = {}
    for folder in sorted(PARITY_DIR.iterdir()):
        if all((folder / name).is_file() for name in CASE_FILES):
            with safe_open(str(folder / "data.safetensors"), "pt") as data:
                found[folder] = set(data.keys())
    return found


CASE_KEYS = _cases()
CASES = list(CASE_KEYS)


def cases_with(key: str | None = None) -> list:
    """Cases that record ``key`` (every case when None); a failing placeholder when there are no fixtures."""
    if not CASES:
        return [NO_FIXTURES]
    return [pytest.param(folder, id=folder.name) for folder, keys in CASE_KEYS.items() if key is None or key in keys]


def test_parity_fixtures_found():
    """The fixture folder holds cases; the shipped set covers AR, MAR and guiding-pixel stacks."""
    assert CASES, (f"no case folders ({' + '.join(CASE_FILES)}) in {PARITY_DIR}; restore tests/fixtures/parity "
                   "from the repository or point FRACTALGEN_PARITY_DIR at a folder of fixtures")
    if PARITY_DIR == SHIPPED_DIR:
        kinds = {key for keys in CASE_KEYS.values() for key in keys}
        assert {"nll_bits_per_dim", "nll_all_masked_bits_per_dim", "l1_gp_logits"} <= kinds


@pytest.fixture(scope="module")
def case(request):
    folder = request.param
    if folder is None:
        pytest.fail(f"no parity fixtures in {PARITY_DIR}; restore tests/fixtures/parity or set FRACTALGEN_PARITY_DIR")
    model = load_official(folder / "checkpoint.pth").eval()
    config = json.loads((folder / "config.json").read_text())
    return model, load_file(str(folder / "data.safetensors")), config


ALL = pytest.mark.parametrize("case", cases_with(), indirect=True)


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= TOL, f"{what}: max abs error {err:.3g} > {TOL}"


def _unflatten_patches(model: FractalGen, flat: torch.Tensor, level: int) -> torch.Tensor:
    """Normalised flattened patches (N, L, C*p*p) -> integer patches (N, L, C, p, p)."""
    cfg = model.config
    p = cfg.img_size_list[level + 1]
    x = flat.reshape(*flat.shape[:2], cfg.channels, p, p)
    ints = quantize(x, cfg.pixel_mean, cfg.pixel_std, dim=-3)
    assert torch.equal(normalize(ints, cfg.pixel_mean, cfg.pixel_std, dim=-3), x), "inputs are not 8-bit pixels"
    return ints


def _is_ar(model: FractalGen, level: int) -> bool:
    return model.config.generator_type_list[level] == "ar"


@ALL
def test_config_matches(case):
    model, _, config = case
    for key, value in config.items():
        got = getattr(model.config, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key


@ALL
def test_normalisation_and_patches(case):
    model, data, _ = case
    cfg = model.config
    images = data["images_uint8"]
    assert torch.equal(normalize(images, cfg.pixel_mean, cfg.pixel_std, dim=1), data["images_normalized"])
    patches = patchify(images, cfg.img_size_list[1])
    assert torch.equal(normalize(patches, cfg.pixel_mean, cfg.pixel_std, dim=-3).flatten(-3), data["l0_patches"])


def _check_level(model: FractalGen, data: dict, level: int, patches: torch.Tensor, conds: list, prefix: str):
    gen = model.levels[level]
    if _is_ar(model, level):
        outs = gen.conditions(patches, conds)
    else:
        outs = gen.conditions(patches, data[f"{prefix}_mask"].bool(), conds)
    names = sorted(k for k in data if k.startswith(f"{prefix}_out_"))
    assert names, f"no {prefix}_out_* tensors"
    for i, name in enumerate(names):
        close(outs[i], data[name], name)


@ALL
@torch.no_grad()
def test_level0(case):
    model, data, _ = case
    patches = patchify(data["images_uint8"], model.config.img_size_list[1])
    _check_level(model, data, 0, patches, [data["l0_cond"]] * 5, "l0")


@pytest.mark.parametrize("case", cases_with("l1_patches"), indirect=True)
@torch.no_grad()
def test_level1(case):
    model, data, _ = case
    patches = _unflatten_patches(model, data["l1_patches"], 1)
    conds = [data[k] for k in sorted(k for k in data if k.startswith("l1_cond_"))]
    if "l1_guiding_pixel" in data:
        conds = conds + [data["l1_guiding_pixel"]]
    _check_level(model, data, 1, patches, conds, "l1")


@ALL
@torch.no_grad()
def test_pixel_transformer(case):
    model, data, _ = case
    cfg = model.config
    targets = data["pix_target_uint8"].long()
    assert torch.equal(quantize(data["pix_target_normalized"], cfg.pixel_mean, cfg.pixel_std, dim=1), targets)
    close(model.pixel.logits(data["pix_cond"], targets), data["pix_logits"], "pix_logits")


@pytest.mark.parametrize("case", cases_with("l1_gp_logits"), indirect=True)
@torch.no_grad()
def test_guiding_pixel_transformer(case):
    model, data, _ = case
    logits = model.levels[1].guide.logits(data["l1_gp_cond"], data["l1_gp_target_uint8"].long())
    close(logits, data["l1_gp_logits"], "l1_gp_logits")


def _fixed_mask(kind: str):
    def mask_fn(level, n, seq_len, device):
        if kind == "all":
            return torch.ones(n, seq_len, dtype=torch.bool, device=device)
        return (torch.arange(seq_len, device=device) < seq_len // 2).expand(n, seq_len)
    return mask_fn


@ALL
@torch.no_grad()
@pytest.mark.parametrize("batched", [False, True], ids=["alone", "batched"])
def test_likelihood(case, batched):
    """Eval-mode bits/dim per image (each image alone, as recorded, and the batch at once)."""
    model, data, _ = case
    images = data["images_uint8"]
    kinds = ["exact"] if "nll_bits_per_dim" in data else ["all", "half"]
    for kind in kinds:
        mask_fn = None if kind == "exact" else _fixed_mask(kind)
        key = "nll_bits_per_dim" if kind == "exact" else f"nll_{kind}_masked_bits_per_dim"
        if batched:
            outs = [model(images, mask_fn=mask_fn)]
        else:
            outs = [model(images[i:i + 1], mask_fn=mask_fn) for i in range(len(images))]
        close(torch.cat([o.bits_per_dim for o in outs]), data[key], key)
        if f"nll_{kind}_masked_gp_bits" in data:
            close(torch.cat([o.pixel for o in outs]) / math.log(2), data[f"nll_{kind}_masked_pixelloss_bits"], "pixel part")
            close(torch.cat([o.guiding for o in outs]) / math.log(2), data[f"nll_{kind}_masked_gp_bits"], "gp part")
        if not batched:  # the scalar objective of a batch of one is the recorded value
            close(torch.stack([o.loss for o in outs]) / torch.log(torch.tensor(2.0)), data[key], key + " (loss)")


@pytest.mark.parametrize("case", cases_with("first_pixel_r_logits"), indirect=True)
@torch.no_grad()
@torch.no_grad()
def test_first_pixel_sampler_path(case):
    """The sampler's first step (KV-cache decode at every level) gives the recorded R logits."""
    model, data, _ = case
    for key, labels in (("first_pixel_r_logits", None), ("first_pixel_r_logits_cond", data["labels"])):
        n = 1 if labels is None else len(labels)
        cond = model.condition(labels, n)
        for level in model.levels:
            assert _is_ar(model, level.level)
            token = level.cond_emb(cond)
            decoder = SampleContext(SamplingConfig()).decoder(level, level.seq_len, like=token)
            cond = level.decode(decoder, token, 0)
        token = model.pixel.cond_emb(cond)
        decoder = SampleContext(SamplingConfig()).decoder(model.pixel, model.config.channels, like=token)
        close(model.pixel.decode(decoder, token, 0), data[key], key)


# ------------------------------------------------------------------------------------------------
# Official presets: key manifest and parameter counts
# ------------------------------------------------------------------------------------------------

KEY_DIR = PARITY_DIR / "official_keys"
MANIFESTS = [pytest.param(m, id=m.stem) for m in sorted(KEY_DIR.glob("*.json"))] if KEY_DIR.is_dir() else []


@pytest.mark.parametrize("manifest", MANIFESTS or [NO_FIXTURES])
def test_official_preset_keys(manifest):
    assert manifest is not None, f"no official key manifests (*.json) in {KEY_DIR}"
    spec = json.loads(manifest.read_text())
    with torch.device("meta"):
        model = FractalGen(get_preset(spec["preset"]))
        official = {k: torch.empty(shape) for k, shape in spec["state_dict"].items()}
    converted = {k: tuple(v.shape) for k, v in convert_official_state(official).items()}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert converted == ours
    count = sum(p.numel() for p in model.parameters())
    assert count == spec["num_params"]
    assert sum(model.level_parameters()) == count


# ------------------------------------------------------------------------------------------------
# The fixture folder itself: missing fixtures fail, another folder is honoured
# ------------------------------------------------------------------------------------------------

def _run_parity_tests(folder: Path, select: str) -> str:
    """Run this file's tests selected by ``select`` in a fresh process on ``folder``; pytest's report."""
    env = {**os.environ, "FRACTALGEN_PARITY_DIR": str(folder), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", __file__,
                           "-k", select], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    return proc.stdout


def test_missing_fixtures_fail_and_another_folder_is_used(tmp_path):
    """Without fixtures every parity test fails (none skips); FRACTALGEN_PARITY_DIR runs the tests on
    its own cases: an unchanged copy of ar3 passes, a copy with one recorded value moved fails."""
    summary = _run_parity_tests(tmp_path / "missing", "not missing_fixtures_fail").splitlines()[-1]
    assert re.search(r"\d+ (failed|error)", summary) and not re.search("skipped|passed", summary), summary
    for name in ("good", "bad"):
        shutil.copytree(SHIPPED_DIR / "ar3", tmp_path / "other" / name)
    data = load_file(str(tmp_path / "other" / "bad" / "data.safetensors"))
    data["nll_bits_per_dim"] = data["nll_bits_per_dim"] + 1e-3
    save_file(data, str(tmp_path / "other" / "bad" / "data.safetensors"))
    report = _run_parity_tests(tmp_path / "other", "test_likelihood")
    assert report.splitlines()[-1].startswith("2 failed, 2 passed"), report
    failed = re.findall(r"FAILED \S+::test_likelihood\[(\S+)\]", report)
    assert all("bad" in name.split("-") for name in failed), report
    assert "nll_bits_per_dim: max abs error 0.001" in report, report
