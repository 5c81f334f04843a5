#!/usr/bin/env python
"""Which attention path is fastest on CPU without autograd, for the shapes the levels use (run on demand).

    python benchmarks/attention.py --threads 2 --sweeps      # every case and the sweeps
    python benchmarks/attention.py --threads 2 --cases mar16 --out attention.jsonl

Three ways of computing softmax(q k^T / sqrt(d) [+ mask]) v and merging the heads, on float32
inputs laid out as the levels make them (views of the packed projections, or of a key/value
cache), alternating every round in one process; the minimum over rounds of the mean time of a
call: ``explicit`` (``layers.explicit_attention``: scores, softmax, values as three products),
``fused`` (``F.scaled_dot_product_attention``: the CPU flash kernel), ``math`` (the same call
under ``sdpa_kernel(SDPBackend.MATH)``) and, for one query over a few keys, ``few``
(``layers.few_keys_attention``: elementwise products). ``picked`` is the path ``layers.attend``
takes (``layers.inference_path``); its thresholds (``layers.SHORT`` and the constants beside it)
come from this table. Run it on an otherwise idle machine.

Cases (B = images x 2 for guidance, H heads, q queries, k keys, d head dim): sampling passes of
the MAR levels (a full block, and the last block at the queried patches and their neighbours),
one-token decoding steps of the pixel transformer, guiding pixel and AR levels, and the
likelihood's teacher-forced passes (AR levels and pixel transformer causal, MAR levels
bidirectional); ``--sweeps`` adds sequence lengths, causal lengths, query counts and head dims.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fractalgen.layers import explicit_attention, few_keys_attention, inference_path  # noqa: E402

#: name -> (B, H, q, k, d, kind): kind "block" (a bidirectional pass), "queries" (the last block
#: of a MAR pass at some positions), "causal" (a teacher-forced pass), "step" (one decoding step
#: over the keys so far), "static" (a decoding step over the whole cache, later slots masked)
CASES = {
    "mar16 level 0 block": (256, 4, 21, 21, 16, "block"),
    "mar16 level 0 last block, 5 queries": (256, 4, 5, 21, 16, "queries"),
    "mar16 level 1 last block, 5 queries": (256, 2, 5, 21, 16, "queries"),
    "mar16 pixel first step": (256, 2, 1, 1, 8, "step"),
    "mar16 pixel step": (256, 2, 1, 3, 8, "step"),
    "mar16 pixel step, static": (256, 2, 1, 8, 8, "static"),
    "tiny_mar level 0 block": (16, 4, 261, 261, 16, "block"),
    "tiny_mar level 0 last block, 20 queries": (16, 4, 20, 261, 16, "queries"),
    "tiny_mar level 0 last block, 60 queries": (16, 4, 60, 261, 16, "queries"),
    "tiny_mar level 1 block, 64 patches": (64, 2, 21, 21, 16, "block"),
    "tiny_mar level 1 last block, 64 patches": (64, 2, 5, 21, 16, "queries"),
    "tiny_ar pixel step": (16, 2, 1, 3, 8, "step"),
    "tiny_ar level 0 step 100": (16, 4, 1, 101, 16, "step"),
    "tiny_ar level 1 step 8": (16, 2, 1, 9, 16, "step"),
    "in64 level 0 block": (16, 16, 261, 261, 64, "block"),
    "in64 level 0 last block, 160 queries": (16, 16, 160, 261, 64, "queries"),
    "in64 level 1 block, 32 patches": (64, 8, 21, 21, 64, "block"),
    "in64 level 1 last block, 10 queries": (64, 8, 10, 21, 64, "queries"),
    "in64 pixel step": (16, 4, 1, 3, 32, "step"),
    "in64 ar level 0 step 200": (16, 16, 1, 201, 64, "step"),
    "guiding pixel step (128 wide, 4 heads)": (64, 4, 1, 3, 32, "step"),
    "huge256 level 2 last block, guiding pixel": (256, 4, 5, 22, 80, "queries"),
    "likelihood ar level 0 (64 images)": (64, 4, 256, 256, 16, "causal"),
    "likelihood ar level 1": (1024, 2, 16, 16, 16, "causal"),
    "likelihood pixel": (4096, 2, 3, 3, 8, "causal"),
    "likelihood mar level 0 (16 images)": (16, 4, 261, 261, 16, "block"),
    "likelihood mar level 1": (1024, 2, 21, 21, 16, "block"),
    "likelihood in64 ar level 0 (4 images)": (4, 16, 256, 256, 64, "causal"),
}
#: sweeps for the crossover: bidirectional blocks of k tokens, causal passes, few queries over k keys
SWEEPS = {f"sweep block {k}": (4096 // k, 4, k, k, 16, "block") for k in (8, 16, 32, 48, 64, 96, 128)}
SWEEPS.update({f"sweep causal {k}": (8192 // k, 2, k, k, 16, "causal") for k in (3, 4, 6, 8, 12, 16, 32)})
SWEEPS.update({f"sweep {q} queries over {k}": (256, 4, q, k, 16, "queries") for q, k in
               [(2, 64), (5, 64), (10, 128), (20, 128), (20, 261), (5, 261)]})
SWEEPS.update({f"sweep step over {k} keys, {r} rows": (r // 2, 2, 1, k, 8, "step") for r in (32, 64, 128, 256, 512)
               for k in (1, 2, 3, 4, 6)})
SWEEPS.update({f"sweep head dim {d}, {q} queries": (256, 4, q, 21, d, "block" if q == 21 else "queries")
               for d in (16, 24, 32, 48, 64) for q in (21, 5)})


def inputs(b: int, h: int, nq: int, nk: int, d: int, kind: str) -> tuple:
    """q, k, v (B, H, n, d) laid out as the levels make them, and the mask: views of one packed
    projection (B, T, 3, H, d) for passes, queries apart from the keys and values (B, T, 2, H, d)
    for the last block of a MAR pass, keys and values from a cache (B, 2, H, L, d) for decoding."""
    g = torch.Generator().manual_seed(0)
    if kind in ("block", "causal"):
        return (*torch.randn(b, nk, 3, h, d, generator=g).permute(2, 0, 3, 1, 4), None)
    if kind == "queries":
        q = torch.randn(b, nq, h, d, generator=g).transpose(1, 2)
        return (q, *torch.randn(b, nk, 2, h, d, generator=g).permute(2, 0, 3, 1, 4), None)
    q = torch.randn(b, 3, h, d, generator=g)[:, 0].unsqueeze(2)
    cache = torch.randn(b, 2, h, nk + 5, d, generator=g)
    mask = (torch.arange(nk) < nk // 2).unsqueeze(0) if kind == "static" else None
    return q, cache[:, 0, :, :nk], cache[:, 1, :, :nk], mask


def paths(kind: str, queries: int, keys: int) -> dict:
    """The computations that apply, each (q, k, v, mask) -> output (B, q, H * d) as the blocks use it."""
    causal = kind == "causal"

    def fused(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, mask, 0.0, causal)

    def math(q, k, v, mask):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, mask, 0.0, causal)

    def explicit(q, k, v, mask):
        return explicit_attention(q, k, v, mask, 0.0, causal)

    def few(q, k, v, mask):
        return few_keys_attention(q, k, v)

    found = {"explicit": explicit, "fused": fused, "math": math}
    if kind == "step" and queries == 1 and keys <= 8:
        found["few"] = few
    return {name: lambda q, k, v, mask, fn=fn: fn(q, k, v, mask).transpose(1, 2).flatten(2) for name, fn in found.items()}


def time_case(case: tuple, rounds: int) -> dict[str, float]:
    """Microseconds per call of each path (min over rounds of the mean of a batch of calls)."""
    b, h, q, k, d, kind = case
    args = inputs(b, h, q, k, d, kind)
    calls = max(2, int(3e6 / (b * h * q * k * d / 16 + 3e4)))  # ~0.1 s per batch of calls
    best = {}
    for _ in range(rounds):
        for name, fn in paths(kind, q, k).items():
            fn(*args)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(*args)
            best[name] = min(best.get(name, float("inf")), (time.perf_counter() - t0) / calls * 1e6)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cases", nargs="*", default=[], help="only cases whose name contains one of these words")
    p.add_argument("--sweeps", action="store_true", help="also the sweeps that place the thresholds")
    p.add_argument("--out", type=Path, help="append one JSON line per case")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; microseconds per call, min of {args.rounds} rounds")
    print(f"{'case':42s} {'B':>5s} {'H':>3s} {'q':>4s} {'k':>4s} {'d':>3s} {'explicit':>10s} {'fused':>10s} "
          f"{'math':>10s} {'few':>10s}  fastest   picked")
    with torch.inference_mode():
        for name, case in {**CASES, **(SWEEPS if args.sweeps else {})}.items():
            if args.cases and not any(word in name for word in args.cases):
                continue
            us = time_case(case, args.rounds)
            b, h, q, k, d, kind = case
            picked = inference_path(b * h, q, k, d, kind == "static", kind == "causal")
            fastest = min(us, key=us.get)
            few = f"{us['few']:10.1f}" if "few" in us else " " * 10
            print(f"{name:42s} {b:5d} {h:3d} {q:4d} {k:4d} {d:3d} {us['explicit']:10.1f} {us['fused']:10.1f} "
                  f"{us['math']:10.1f} {few}  {fastest:8s}  {picked}" + ("" if picked == fastest else
                                                                          f" ({us[picked] / us[fastest]:.2f}x)"),
                  flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({"case": name, "shape": case, "threads": args.threads, "us": us,
                                        "picked": picked, "median_us": statistics.median(us.values())}) + "\n")


if __name__ == "__main__":
    main()
