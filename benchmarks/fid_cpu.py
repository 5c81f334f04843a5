"""FID / precision / recall of the shipped model on CPU at a small sample size, with the
real-vs-real and real-vs-corrupted numbers that calibrate it (small-N FIDs are biased upwards).

    python benchmarks/fid_cpu.py --count 500
"""

from __future__ import annotations

import argparse
import json

import torch

from fractalgen import load_model
from fractalgen.data import build_dataset, collate
from fractalgen.fid import fid_from_features, inception_features, precision_recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or shipped name (default: the default shipped model)")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = load_model(args.model).eval()
    cfg = model.config
    n = args.count
    test = build_dataset(args.data, "test", cfg.image_size, cfg.channels)
    train = build_dataset(args.data, "train", cfg.image_size, cfg.channels)
    reference, _ = collate([test[i] for i in range(n)])
    other_real, _ = collate([train[i] for i in range(n)])
    noise = torch.randn(reference.shape, generator=torch.Generator().manual_seed(args.seed)) * 40
    corrupted = (reference.float() + noise).clamp(0, 255).to(torch.uint8)
    labels = torch.arange(n) % cfg.class_num if cfg.conditional else None
    samples = model.sample(labels=labels, num_images=None if labels is not None else n, seed=args.seed)
    ref = inception_features(reference)
    results = {"count": n}
    for name, images in (("real_vs_real", other_real), ("real_vs_noisy", corrupted), ("real_vs_samples", samples)):
        feats = inception_features(images)
        precision, recall = precision_recall(ref, feats, k=3)
        results[name] = {"fid": fid_from_features(ref, feats, allow_small=True), "precision": precision, "recall": recall}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
