"""Parity with the official code: every case folder under FRACTALGEN_PARITY_DIR is loaded through
the official-checkpoint path and must reproduce each recorded tensor to 1e-5 absolute.

Without the variable the fixtures next to the repository (../shared/parity) are used when present
and skipped otherwise; when the variable names a folder, a missing folder or any mismatch fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fractalgen import FractalGen, SamplingConfig, get_preset
from fractalgen.checkpoint import convert_official_state, load_official
from fractalgen.levels import SampleContext, normalize, patchify, quantize

TOL = 1e-5
REPO = Path(__file__).resolve().parents[1]
NAMED = os.environ.get("FRACTALGEN_PARITY_DIR")
PARITY_DIR = Path(NAMED) if NAMED else REPO.parent / "shared" / "parity"


def _cases() -> list[Path]:
    if not PARITY_DIR.is_dir():
        return []
    return sorted(d for d in PARITY_DIR.iterdir()
                  if all((d / f).is_file() for f in ("config.json", "checkpoint.pth", "data.safetensors")))


CASES = _cases()


def test_parity_fixtures_found():
    """A named fixture folder must exist and hold at least one case."""
    if NAMED is None and not PARITY_DIR.is_dir():
        pytest.skip(f"no parity fixtures at {PARITY_DIR} (set FRACTALGEN_PARITY_DIR)")
    assert CASES, f"no case folders (config.json + checkpoint.pth + data.safetensors) in {PARITY_DIR}"


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case(request):
    folder = request.param
    model = load_official(folder / "checkpoint.pth").eval()
    config = json.loads((folder / "config.json").read_text())
    return model, load_file(str(folder / "data.safetensors")), config


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


def test_config_matches(case):
    model, _, config = case
    for key, value in config.items():
        got = getattr(model.config, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key


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


@torch.no_grad()
def test_level0(case):
    model, data, _ = case
    patches = patchify(data["images_uint8"], model.config.img_size_list[1])
    _check_level(model, data, 0, patches, [data["l0_cond"]] * 5, "l0")


@torch.no_grad()
def test_level1(case):
    model, data, _ = case
    if "l1_patches" not in data:
        pytest.skip("case has no level-1 generator tensors")
    patches = _unflatten_patches(model, data["l1_patches"], 1)
    conds = [data[k] for k in sorted(k for k in data if k.startswith("l1_cond_"))]
    if "l1_guiding_pixel" in data:
        conds = conds + [data["l1_guiding_pixel"]]
    _check_level(model, data, 1, patches, conds, "l1")


@torch.no_grad()
def test_pixel_transformer(case):
    model, data, _ = case
    cfg = model.config
    targets = data["pix_target_uint8"].long()
    assert torch.equal(quantize(data["pix_target_normalized"], cfg.pixel_mean, cfg.pixel_std, dim=1), targets)
    close(model.pixel.logits(data["pix_cond"], targets), data["pix_logits"], "pix_logits")


@torch.no_grad()
def test_guiding_pixel_transformer(case):
    model, data, _ = case
    if "l1_gp_logits" not in data:
        pytest.skip("case has no guiding pixel")
    logits = model.levels[1].guide.logits(data["l1_gp_cond"], data["l1_gp_target_uint8"].long())
    close(logits, data["l1_gp_logits"], "l1_gp_logits")


def _fixed_mask(kind: str):
    def mask_fn(level, n, seq_len, device):
        if kind == "all":
            return torch.ones(n, seq_len, dtype=torch.bool, device=device)
        return (torch.arange(seq_len, device=device) < seq_len // 2).expand(n, seq_len)
    return mask_fn


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
            import math
            close(torch.cat([o.pixel for o in outs]) / math.log(2), data[f"nll_{kind}_masked_pixelloss_bits"], "pixel part")
            close(torch.cat([o.guiding for o in outs]) / math.log(2), data[f"nll_{kind}_masked_gp_bits"], "gp part")
        if not batched:  # the scalar objective of a batch of one is the recorded value
            close(torch.stack([o.loss for o in outs]) / torch.log(torch.tensor(2.0)), data[key], key + " (loss)")


@torch.no_grad()
@torch.no_grad()
def test_first_pixel_sampler_path(case):
    """The sampler's first step (KV-cache decode at every level) gives the recorded R logits."""
    model, data, _ = case
    if "first_pixel_r_logits" not in data:
        pytest.skip("AR cases only")
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
MANIFESTS = sorted(KEY_DIR.glob("*.json")) if KEY_DIR.is_dir() else []


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[m.stem for m in MANIFESTS])
def test_official_preset_keys(manifest):
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
