"""Editing: every tool keeps known pixels bit-identical, on AR and MAR stacks; animation; bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from fractalgen import InputError, SamplingConfig, load_model
from fractalgen.cli import main
from fractalgen.data import FASHION_MNIST_ROOT, FashionMNIST
from fractalgen.edit import Recorder, class_edit, inpaint, outpaint, uncrop
from fractalgen.runtime import make_grid, save_gif, save_image
from test_model import VARIANTS, tiny

STACKS = ["ar-rgb", "mar-rgb", "mar-ar-grey", "mar4-gp-rgba"]
FAST = SamplingConfig(num_iter=(3, 2, 2))


def image_for(model, n=2, seed=0):
    c, s = model.config.channels, model.config.image_size
    return torch.randint(0, 256, (n, c, s, s), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def labels_for(model, n=2):
    return torch.arange(n) % model.config.class_num


def hole(size: int) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[3:11, 5:9] = True      # a hole crossing patch borders (partly known patches)
    mask[0, 0] = True           # and a single pixel
    return mask


@pytest.mark.parametrize("stack", STACKS)
def test_inpaint_keeps_known_pixels_and_fills_the_hole(stack):
    model = tiny(**VARIANTS[stack]).eval()
    image = image_for(model)
    mask = hole(model.config.image_size)
    out = inpaint(model, image, mask, labels=labels_for(model), settings=FAST, seed=0)
    keep = ~mask.expand_as(image)
    assert torch.equal(out[keep], image[keep])
    assert (out[~keep] != image[~keep]).float().mean() > 0.9  # regenerated, not copied


@pytest.mark.parametrize("stack", STACKS)
def test_per_channel_mask(stack):
    model = tiny(**VARIANTS[stack]).eval()
    image = image_for(model, 1)
    mask = torch.zeros_like(image, dtype=torch.bool)
    mask[:, -1, 2:6, 2:6] = True  # regenerate the last channel only
    out = inpaint(model, image, mask, labels=labels_for(model, 1), settings=FAST, seed=1)
    assert torch.equal(out[~mask], image[~mask])
    assert (out[mask] != image[mask]).any()


@pytest.mark.parametrize("stack", ["ar-rgb", "mar-rgb"])
def test_outpaint_uncrop_and_class_edit_keep_known_pixels(stack):
    model = tiny(**VARIANTS[stack]).eval()
    s = model.config.image_size
    crop = image_for(model, 2)[:, :, : s - 5, : s - 3]
    out = outpaint(model, crop, (2, 1, 3, 2), labels=labels_for(model), settings=FAST, seed=0)
    assert out.shape[-2:] == (s, s)
    assert torch.equal(out[:, :, 2: s - 3, 2: s - 1], crop)

    full = image_for(model, 2, seed=5)
    out = uncrop(model, full, (4, 2, 12, 9), labels=labels_for(model), settings=FAST, seed=0)
    assert torch.equal(out[:, :, 2:9, 4:12], full[:, :, 2:9, 4:12])
    placed = uncrop(model, full[:, :, 2:9, 4:12], (4, 2, 12, 9), labels=labels_for(model), settings=FAST, seed=0)
    assert torch.equal(placed, out)  # a crop placed at the box is the same request

    mask = hole(s)
    edited = class_edit(model, full, mask, 3, settings=SamplingConfig(cfg=3.0, num_iter=(3, 2)), seed=0)
    keep = ~mask.expand_as(full)
    assert torch.equal(edited[keep], full[keep])


@pytest.mark.parametrize("stack", ["ar-rgb", "mar-rgb"])
def test_edits_of_a_model_in_training_mode_are_its_eval_mode_edits(stack):
    """Every tool edits with no training-time randomness (dropped labels, dropout, training MAR
    masks): a model in training mode that would drop every label gives its eval-mode results, for
    the same seed, and stays in training mode."""
    model = tiny(**VARIANTS[stack], label_drop_prob=1.0, attn_dropout=0.5, proj_dropout=0.5)
    image, labels, mask = image_for(model), labels_for(model), hole(model.config.image_size)
    s = model.config.image_size
    tools = {"inpaint": lambda: inpaint(model, image, mask, labels=labels, settings=FAST, seed=0),
             "outpaint": lambda: outpaint(model, image[:, :, 2:, 1:], (1, 0, 1, 1), labels=labels, settings=FAST, seed=0),
             "uncrop": lambda: uncrop(model, image, (4, 2, s - 2, 9), labels=labels, settings=FAST, seed=0),
             "class edit": lambda: class_edit(model, image, mask, 3, settings=SamplingConfig(cfg=3.0, num_iter=(3, 2)),
                                              seed=0)}
    model.eval()
    expected = {name: tool() for name, tool in tools.items()}
    model.train()
    for name, tool in tools.items():
        assert torch.equal(tool(), expected[name]), name
        assert model.training and all(module.training for module in model.modules()), name


def test_animation_ends_with_the_returned_image(tmp_path):
    model = tiny(**VARIANTS["mar-ar-grey"]).eval()
    recorder = Recorder(max_frames=5)
    image = image_for(model)
    out = inpaint(model, image, hole(16), labels=labels_for(model), settings=SamplingConfig(num_iter=(8, 2)),
                  seed=0, on_step=recorder)
    frames = recorder.finish(out)
    assert 1 < len(frames) <= 6
    save_gif(frames, tmp_path / "a.gif", nrow=2)
    gif = Image.open(tmp_path / "a.gif")
    assert gif.n_frames == len(frames)
    gif.seek(gif.n_frames - 1)
    last = torch.from_numpy(__import__("numpy").array(gif.convert("L"))).unsqueeze(0)
    assert torch.equal(last, make_grid(out, nrow=2))


def test_bad_edit_inputs():
    model = tiny().eval()
    image = image_for(model, 1)
    with pytest.raises(InputError, match="does not match the image"):
        inpaint(model, image, torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(InputError, match="no pixel to regenerate"):
        inpaint(model, image, torch.zeros(16, 16, dtype=torch.bool))
    with pytest.raises(InputError, match="covers the whole image"):
        inpaint(model, image, torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(InputError, match="do not fit this model"):
        inpaint(model, torch.zeros(1, 3, 20, 20, dtype=torch.uint8), torch.ones(20, 20, dtype=torch.bool))
    with pytest.raises(InputError, match="class id 99"):
        class_edit(model, image, hole(16), 99)
    with pytest.raises(InputError, match="top\\+bottom = 4"):
        outpaint(model, image[:, :, :12, :12], (1, 1, 1, 1))
    with pytest.raises(InputError, match="box"):
        uncrop(model, image, (5, 5, 2, 2))


def test_edit_cli_writes_result_figure_and_gif(tmp_path, capsys):
    model = tiny(**VARIANTS["mar-ar-grey"]).eval()
    model.save_pretrained(tmp_path / "m")
    image = image_for(model, 1)[0]
    save_image(image, tmp_path / "in.png")
    mask = torch.zeros(1, 16, 16, dtype=torch.uint8)
    mask[:, 4:12, 4:12] = 255
    save_image(mask, tmp_path / "mask.png")
    args = ["edit", "inpaint", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "in.png"),
            "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "out.png"), "--figure",
            str(tmp_path / "fig.png"), "--animate", str(tmp_path / "a.gif"), "--num-iter", "4,2"]
    assert main(args) == 0
    out = torch.from_numpy(__import__("numpy").array(Image.open(tmp_path / "out.png")))
    keep = mask[0] == 0
    assert torch.equal(out[keep], image[0][keep])
    assert Image.open(tmp_path / "fig.png").size[0] > 3 * 16
    assert Image.open(tmp_path / "a.gif").n_frames > 1
    (tmp_path / "text.png").write_text("not an image")
    assert main(["edit", "inpaint", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "text.png"),
                 "--box", "1,1,4,4"]) == 2
    assert "not a readable image" in capsys.readouterr().err
    save_image(torch.zeros(1, 10, 10, dtype=torch.uint8), tmp_path / "small_mask.png")
    assert main(args[:6] + ["--mask", str(tmp_path / "small_mask.png")]) == 2
    assert "10x10 but the image is 16x16" in capsys.readouterr().err


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="needs Fashion-MNIST: apt-get install -y dataset-fashion-mnist")
def test_inpainting_uses_the_known_pixels():
    """The shipped model fills the lower half of test images (cut through a row of patches) much closer to
    the truth than samples of the same classes that never saw the upper half: a sampler that ignores the
    context it is given would score like the samples."""
    model = load_model().eval()
    data = FashionMNIST("test")
    images = torch.stack([data[i][0] for i in range(8)])
    labels = torch.tensor([data[i][1] for i in range(8)])
    mask = torch.zeros(28, 28, dtype=torch.bool)
    mask[14:] = True  # rows 14.. : patches of rows 12-15 are half known
    region = mask.expand_as(images)
    filled = inpaint(model, images, mask, labels=labels, seed=0)
    free = model.sample(labels=labels, seed=0)

    def error(x: torch.Tensor) -> float:
        return (x.float() - images.float()).abs()[region].mean().item()

    assert torch.equal(filled[~region], images[~region])
    assert error(filled) < 0.7 * error(free), (error(filled), error(free))
