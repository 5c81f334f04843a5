"""Lossless compression of the Fashion-MNIST test set: the shipped model's .fgz files against
PNG, WebP, JPEG-XL, JPEG-LS, JPEG 2000 and zstd / xz of the whole array.

    pip install imagecodecs          # or: pip install -e ".[bench]"
    python benchmarks/compress.py [--limit N] [--labels] [--group-size 512] [--workers 2] [--json out.json]

Every image is checked to come back bit-exact (from the .fgz and from every baseline). The
model's row splits the file into the coded pixels (payload) and the container (index, CRCs,
names), and sets both against the model's exact negative log-likelihood (``model.nll``, same
condition). Speeds are wall-clock images/s and images per CPU-second (all threads), the second
being what a contended machine does not distort.
"""

from __future__ import annotations

import argparse
import json
import lzma
import time

import numpy as np
import torch

from fractalgen import load_model
from fractalgen.codec import DEFAULT_GROUP, compress, decompress, read_header
from fractalgen.data import FashionMNIST
from fractalgen.image_codecs import image_codecs, lossless_sizes


def baselines(images: np.ndarray) -> dict[str, float]:
    """bits/dim of every baseline on grey images (N, H, W), each checked to decode exactly."""
    import imagecodecs as ic

    dims = images.size
    sizes = lossless_sizes(images, image_codecs(extended=True))
    results = {name: 8 * size / dims for name, size in sizes.items()}
    raw = images.tobytes()
    for name, data, decode in [("zstd -19 of the whole array", ic.zstd_encode(raw, level=19), ic.zstd_decode),
                               ("xz -9e of the whole array", lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME),
                                lzma.decompress)]:
        assert decode(data) == raw
        results[name] = 8 * len(data) / dims
    return results


def exact_nll(model, images: torch.Tensor, labels: torch.Tensor | None, batch: int = 250) -> float:
    """The model's mean negative log-likelihood in bits/dim (exact for AR stacks)."""
    total = 0.0
    for i in range(0, len(images), batch):
        bpd, _ = model.nll(images[i:i + batch], None if labels is None else labels[i:i + batch])
        total += float(bpd.double().sum())
    return total / len(images)


def timed(fn):
    """(result, wall seconds, CPU seconds of the process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def model_row(model, images: torch.Tensor, labels: torch.Tensor | None, args) -> dict:
    """Compress and decompress every image with the model; sizes, speeds and the exactness check."""
    names = [f"fashion_mnist_test_{i:05d}.png" for i in range(len(images))]
    data, enc_wall, enc_cpu = timed(lambda: compress(model, images, labels, names, args.group_size,
                                                     workers=args.workers, progress=True))
    (decoded, _), dec_wall, dec_cpu = timed(lambda: decompress(model, data, workers=args.workers, progress=True))
    if not torch.equal(decoded, images):
        raise SystemExit("the .fgz file did not decode every image exactly")
    header = read_header(data)
    dims, payload = images.numel(), sum(header.group_bytes)
    n = len(images)
    return dict(payload_bpd=8 * payload / dims, container_bpd=8 * (len(data) - payload) / dims,
                file_bpd=8 * len(data) / dims, file_bytes=len(data), container_bytes=len(data) - payload,
                encode_img_s=n / enc_wall, decode_img_s=n / dec_wall, encode_img_cpu_s=n / enc_cpu,
                decode_img_cpu_s=n / dec_cpu, exact=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, help="the first N test images only (default: all 10,000)")
    parser.add_argument("--labels", action="store_true", help="store the labels and code p(x | label) "
                                                             "(default: the null condition, p(x))")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP, help="images coded together")
    parser.add_argument("--workers", type=int, help="threads coding groups side by side (default: one per core)")
    parser.add_argument("--skip-baselines", action="store_true", help="measure the model only")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    data = FashionMNIST("test")
    n = min(args.limit or len(data), len(data))
    images = torch.stack([data[i][0] for i in range(n)])
    labels = torch.tensor([data[i][1] for i in range(n)]) if args.labels else None
    model = load_model().eval()
    results = {"images": n, "labels": args.labels, "threads": torch.get_num_threads()}
    results["nll_bpd"], nll_wall, _ = timed(lambda: exact_nll(model, images, labels))
    print(f"model nll {results['nll_bpd']:.4f} bits/dim ({nll_wall:.0f} s)")
    results["fgz"] = row = model_row(model, images, labels, args)
    results["baselines"] = {} if args.skip_baselines else baselines(images[:, 0].numpy())

    nll = results["nll_bpd"]
    condition = "p(x | label), labels stored" if args.labels else "p(x), null condition"
    print(f"\n{n} Fashion-MNIST test images, 28x28 grey, {condition}; model nll {nll:.3f} bits/dim\n")
    print("| codec | bits/dim | vs model nll | model .fgz is smaller by |")
    print("|---|---|---|---|")
    print(f"| fractalgen .fgz, coded pixels (payload) | {row['payload_bpd']:.3f} | x{row['payload_bpd'] / nll:.4f} | |")
    print(f"| fractalgen .fgz, container (index, CRCs, names) | {row['container_bpd']:.3f} | "
          f"({row['container_bytes'] / n:.1f} bytes/image) | |")
    print(f"| **fractalgen .fgz, whole file** | **{row['file_bpd']:.3f}** | x{row['file_bpd'] / nll:.4f} | |")
    for name, bpd in results["baselines"].items():
        print(f"| {name} | {bpd:.2f} | x{bpd / nll:.2f} | {bpd / row['file_bpd']:.2f}x |")
    print(f"\nroundtrip bit-exact: {row['exact']}; encode {row['encode_img_s']:.1f} img/s "
          f"({row['encode_img_cpu_s']:.1f} per CPU-second), decode {row['decode_img_s']:.1f} img/s "
          f"({row['decode_img_cpu_s']:.1f} per CPU-second); file {row['file_bytes']:,} bytes")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
