"""Does inpainting use the known pixels? Mean absolute error on the regenerated region of test
images: inpainting (the rest of the image known) vs. unconditional samples of the same class.

    python benchmarks/inpaint_mae.py --model path/or/nothing --data fashion-mnist --count 100
"""

from __future__ import annotations

import argparse
import json

import torch

from fractalgen import SamplingConfig, load_model
from fractalgen.data import build_dataset
from fractalgen.edit import inpaint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the shipped model)")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--region", default="lower", choices=["lower", "upper", "centre"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = load_model(args.model).eval()
    cfg = model.config
    data = build_dataset(args.data, "test", cfg.image_size, cfg.channels)
    items = [data[i] for i in range(args.count)]
    images = torch.stack([x for x, _ in items])
    labels = torch.tensor([y for _, y in items]) if cfg.conditional else None
    s = cfg.image_size
    mask = torch.zeros(s, s, dtype=torch.bool)
    if args.region == "lower":
        mask[s // 2:] = True
    elif args.region == "upper":
        mask[: s // 2] = True
    else:
        mask[s // 4: 3 * s // 4, s // 4: 3 * s // 4] = True
    settings = SamplingConfig()
    filled = inpaint(model, images, mask, labels=labels, settings=settings, seed=args.seed)
    free = model.sample(labels=labels, num_images=None if labels is not None else len(images),
                        settings=settings, seed=args.seed + 1)
    region = mask.expand_as(images)

    def mae(x: torch.Tensor) -> float:
        return (x.float() - images.float()).abs()[region].mean().item()

    result = {"images": len(images), "region": args.region, "mae_inpaint": mae(filled), "mae_unconditional_sample": mae(free),
              "known_pixels_identical": bool(torch.equal(filled[~region], images[~region]))}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
