"""Make the README pictures with the shipped models: samples and a heat map with the default (AR)
model, the four editing tools with the editing one.

    python docs/make_figures.py            # writes docs/*.png and docs/*.gif (needs dataset-fashion-mnist)
"""

from __future__ import annotations

from pathlib import Path

import torch

from fractalgen import SamplingConfig, load_model
from fractalgen.checkpoint import EDIT_MODEL
from fractalgen.data import FashionMNIST
from fractalgen.edit import Recorder, class_edit, inpaint, outpaint, uncrop
from fractalgen.evaluate import bits_heatmap, heatmap_figure
from fractalgen.runtime import make_grid, save_gif, save_image

OUT = Path(__file__).resolve().parent
SCALE = 4


def rows(*columns: torch.Tensor) -> torch.Tensor:
    """Interleave image batches column-wise: one row per example (input | mask | result ...)."""
    return torch.stack(columns, 1).flatten(0, 1)


def main() -> None:
    torch.manual_seed(0)
    model, editor = load_model().eval(), load_model(EDIT_MODEL).eval()
    s = model.config.image_size
    test = FashionMNIST("test")
    picks = [0, 1, 2, 3, 5, 8]
    images = torch.stack([test[i][0] for i in picks])
    labels = torch.tensor([test[i][1] for i in picks])

    samples = model.sample(labels=torch.arange(10).repeat_interleave(8), seed=0)
    save_image(make_grid(samples, nrow=8), OUT / "samples.png", scale=SCALE)
    recorder = Recorder(max_frames=25)
    one_each = model.sample(labels=torch.arange(10), seed=1, on_step=recorder)
    save_gif(recorder.finish(one_each), OUT / "sampling.gif", nrow=10, scale=SCALE)

    def figure(name: str, result: torch.Tensor, mask: torch.Tensor, shown: torch.Tensor) -> None:
        mask_image = (mask.expand_as(result).to(torch.uint8) * 255)
        save_image(make_grid(rows(shown, mask_image, result), nrow=3), OUT / f"{name}.png", scale=SCALE)

    hole = torch.zeros(len(picks), 1, s, s, dtype=torch.bool)
    hole[:, :, s // 4: 3 * s // 4, s // 4: 3 * s // 4] = True  # the centre square
    figure("inpaint", inpaint(editor, images, hole[:, 0], labels=labels, seed=0), hole, images)

    small = images[:, :, 4:24, 4:24]
    grown = outpaint(editor, small, (4, 4, 4, 4), labels=labels, seed=0)
    frame = torch.ones(len(picks), 1, s, s, dtype=torch.bool)
    frame[:, :, 4:24, 4:24] = False
    figure("outpaint", grown, frame, torch.nn.functional.pad(small, (4, 4, 4, 4)))

    box = (0, 0, 28, 12)  # keep the top 12 rows, generate the rest
    kept = torch.ones(len(picks), 1, s, s, dtype=torch.bool)
    kept[:, :, :12] = False
    figure("uncrop", uncrop(editor, images, box, labels=labels, seed=0), kept, images)

    target = (labels + 5) % 10  # ask for another class in the lower two thirds
    region = torch.zeros(len(picks), 1, s, s, dtype=torch.bool)
    region[:, :, 9:] = True
    edited = class_edit(editor, images, region[:, 0], target, settings=SamplingConfig(cfg=3.0), seed=0)
    figure("class_edit", edited, region, images)

    bits = bits_heatmap(model, images)
    save_image(heatmap_figure(images, bits), OUT / "heatmap.png")
    print("wrote", ", ".join(sorted(p.name for p in OUT.glob("*.png"))))


if __name__ == "__main__":
    main()
