#!/usr/bin/env python
"""Reduced precision on CPU against float32, on the shipped Fashion-MNIST model (run on demand).

    python benchmarks/precision.py                                  # every variant, 3 repeats
    python benchmarks/precision.py --threads 2 --nll-images 10000 --out precision.jsonl

Variants: float32 (the default and reference), bfloat16 autocast (``--dtype bfloat16``) and int8
weights in the transformer blocks (``--int8``). For each, in this one process, after one untimed
call each and alternating between variants every repeat: the seconds to sample 80 images (8 per
class, cfg 1: the main job) and, once, the exact bits/dim of the first ``--nll-images``
Fashion-MNIST test images with the null condition. Reports the median seconds, the speed ratio
float32 / variant and the bits/dim change. Neither reduced variant is ever a default: this says
what each buys and costs here.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fractalgen import load_model  # noqa: E402
from fractalgen.data import FashionMNIST  # noqa: E402
from fractalgen.quantize import quantize_int8  # noqa: E402
from fractalgen.runtime import autocast  # noqa: E402


def bits_per_dim(model, dtype: str, images: torch.Tensor, batch: int = 100) -> float:
    """Mean exact bits/dim of ``images`` (null condition)."""
    total = 0.0
    with autocast(torch.device("cpu"), dtype):
        for i in range(0, len(images), batch):
            bpd, _ = model.nll(images[i:i + batch])
            total += float(bpd.double().sum())
    return total / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed sampling calls per variant")
    parser.add_argument("--nll-images", type=int, default=10_000, help="test images scored per variant (0: none)")
    parser.add_argument("--variants", nargs="+", default=["float32", "bfloat16", "int8"],
                        choices=["float32", "bfloat16", "int8"], help="variants to measure")
    parser.add_argument("--out", help="append one JSON line per variant to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    fp32 = load_model().eval()
    int8 = quantize_int8(fp32) if "int8" in args.variants else None
    models = {"float32": (fp32, "float32"), "bfloat16": (fp32, "bfloat16"), "int8": (int8, "float32")}
    labels = torch.arange(10).repeat_interleave(8)
    seconds = {v: [] for v in args.variants}
    for v in args.variants:  # untimed: first calls pay for allocations and kernel selection
        model, dtype = models[v]
        with autocast(torch.device("cpu"), dtype):
            model.sample(labels=labels, seed=0, threads=args.threads)
    for r in range(args.repeats):
        for v in args.variants:
            model, dtype = models[v]
            with autocast(torch.device("cpu"), dtype):
                start = time.perf_counter()
                model.sample(labels=labels, seed=r, threads=args.threads)
                seconds[v].append(time.perf_counter() - start)
            print(f"repeat {r + 1}/{args.repeats} {v}: {seconds[v][-1]:.2f} s", flush=True)

    data = FashionMNIST("test") if args.nll_images else None
    images = torch.stack([data[i][0] for i in range(min(args.nll_images, len(data)))]) if data else None
    rows = []
    for v in args.variants:
        start = time.perf_counter()
        bpd = bits_per_dim(*models[v], images) if images is not None else None
        rows.append(dict(variant=v, sample_80_s=statistics.median(seconds[v]), seconds=seconds[v], bits_per_dim=bpd,
                         nll_images=0 if images is None else len(images), nll_s=time.perf_counter() - start))
        print(f"{v}: {rows[-1]['nll_s']:.0f} s for bits/dim", flush=True)
    base = rows[0] if rows[0]["variant"] == "float32" else None
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"\nshipped model, 80 images cfg 1, median of {args.repeats}; {machine}")
    print(f"{'variant':10} {'sample s':>9} {'speed vs fp32':>14} {'bits/dim':>9} {'change':>8}")
    for row in rows:
        ratio = base["sample_80_s"] / row["sample_80_s"] if base else float("nan")
        bpd = row["bits_per_dim"]
        change = bpd - base["bits_per_dim"] if base and bpd is not None else float("nan")
        row.update(speed_vs_float32=ratio, bpd_change=change, machine=machine, threads=args.threads)
        scored = f"{bpd:9.4f} {change:+8.4f}" if bpd is not None else f"{'-':>9} {'-':>8}"
        print(f"{row['variant']:10} {row['sample_80_s']:9.2f} {ratio:13.2f}x {scored}")
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
