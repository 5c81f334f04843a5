#!/usr/bin/env python
"""Time training steps and sampling of a fractal model (run on demand; not part of the test suite).

    python benchmarks/bench.py --config tiny_mar --mode sample --batch-size 8 --cfg 4
    python benchmarks/bench.py --config fractalmar_in64 --mode train --batch-size 2 --repeats 3
    python benchmarks/bench.py --config fractalmar_huge_in256 --mode sample --device cuda \
        --official-settings --batch-size 64 --out results.jsonl

Weights are random (timings do not depend on them: AR levels always take L steps, MAR levels
their fixed iteration counts). ``train`` times one optimizer step (forward, backward, gradient
clipping, AdamW) on random uint8 images; ``sample`` times one ``FractalGen.sample`` call for the
whole batch and reports seconds per image. Peak memory is the process's peak RSS on CPU
(``resource.getrusage``; run one mode per process for a clean number) and
``torch.cuda.max_memory_allocated`` on CUDA. It prints no speed-up: ratios against the official
code are measured side by side, in one invocation, by ``benchmarks/compare.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fractalgen import FractalConfig, FractalGen, SamplingConfig  # noqa: E402
from fractalgen.config import PRESETS, get_preset  # noqa: E402
from fractalgen.flops import total_gflops  # noqa: E402
from fractalgen.model import COMPILE_MODES, threads_for_sampling  # noqa: E402
from fractalgen.runtime import autocast, busy_cores, resolve_device  # noqa: E402
from fractalgen.sampling import OFFICIAL_SETTINGS  # noqa: E402
from fractalgen.train import loss_and_grads, make_optimizer  # noqa: E402


def tiny_ar() -> FractalConfig:
    """Tiny AR model: 64 -> 4 -> 1, widths 64/32/16, depths 2/1/1, heads 4/2/2 (0.27M)."""
    return FractalConfig((64, 4, 1), (64, 32, 16), (2, 1, 1), (4, 2, 2), ("ar", "ar", "ar"),
                         channels=3, class_num=1000, num_conds=1)


def tiny_mar() -> FractalConfig:
    """Tiny MAR model: same sizes, types mar, mar, ar, 5 conditions (0.22M)."""
    return FractalConfig((64, 4, 1), (64, 32, 16), (2, 1, 1), (4, 2, 2), ("mar", "mar", "ar"),
                         channels=3, class_num=1000, num_conds=5)


CONFIGS = {"tiny_ar": tiny_ar, "tiny_mar": tiny_mar, **PRESETS}

# ------------------------------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def build(config: FractalConfig, device: torch.device, seed: int) -> FractalGen:
    torch.manual_seed(seed)
    if device.type == "cuda":  # initialise on the GPU: much faster for the big presets
        with torch.device(device):
            return FractalGen(config)
    return FractalGen(config).to(device)


def random_batch(config: FractalConfig, batch: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    s, c = config.image_size, config.channels
    images = torch.randint(0, 256, (batch, c, s, s), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(0, config.class_num, (batch,), generator=g).to(device) if config.conditional else None
    return images, labels


def sampling_settings(args) -> SamplingConfig:
    if args.official_settings:
        if args.config not in OFFICIAL_SETTINGS:
            raise SystemExit(f"no official sampling settings for {args.config}; known: {', '.join(OFFICIAL_SETTINGS)}")
        overrides = {}
        if args.num_iter:
            overrides["num_iter"] = args.num_iter
        return SamplingConfig.official(args.config, **overrides)
    return SamplingConfig(cfg=args.cfg, cfg_schedule=args.cfg_schedule, temperature=args.temperature,
                          official_temperature=True, filter_threshold=args.filter_threshold,
                          num_iter=args.num_iter)


def run_train(model: FractalGen, config: FractalConfig, args, device, dtype) -> list[float]:
    """Seconds of every optimizer step, warm-up steps first."""
    model.set_grad_checkpointing(args.grad_checkpointing)
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.05)
    images, labels = random_batch(config, args.batch_size, device, args.seed)
    times = []
    for i in range(args.warmup + args.repeats):
        sync(device)
        t0 = time.perf_counter()
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = loss_and_grads(model, images, labels, device, dtype, args.micro_batches, args.lower_chunks)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
        if not math.isfinite(loss.item()):
            raise SystemExit(f"non-finite loss {loss.item()}")
    return times


def run_sample(model: FractalGen, config: FractalConfig, args, device, dtype, settings) -> list[float]:
    """Seconds of every sampling call, warm-up calls first."""
    model.eval()
    if args.compile:
        model.compile_sampling(mode=args.compile)
    times = []
    for i in range(args.warmup + args.repeats):
        _, labels = random_batch(config, args.batch_size, device, args.seed + i)
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, dtype):
            out = model.sample(labels=labels, num_images=None if labels is not None else args.batch_size,
                               settings=settings, seed=args.seed + i, threads=args.threads)
        sync(device)
        times.append(time.perf_counter() - t0)
        assert out.shape[0] == args.batch_size
    return times


def sampling_threads(args, config: FractalConfig, device: torch.device, settings) -> int:
    """The intra-op threads the timed calls ran on (sampling on CPU chooses them unless --threads)."""
    if args.mode == "train" or args.threads or device.type != "cpu":
        return torch.get_num_threads()
    return threads_for_sampling(config, args.batch_size * (2 if settings.guided else 1), settings, busy_cores)


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, choices=list(CONFIGS), help="model configuration")
    p.add_argument("--mode", required=True, choices=["train", "sample"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 1 for train and --compile, else 0)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast precision; auto = bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads, also while sampling (default: leave as is; sampling chooses by the "
                        "work, fractalgen.model.threads_for_sampling)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grad-checkpointing", action="store_true", help="train: recompute block activations")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="train: back-propagate the batch in this many parts (FractalGen.forward_backward)")
    p.add_argument("--lower-chunks", type=int, default=1,
                   help="train: back-propagate the patches below level 0 in this many parts")
    p.add_argument("--cfg", type=float, default=1.0, help="sample: classifier-free guidance scale")
    p.add_argument("--cfg-schedule", default="linear", choices=["constant", "linear"])
    p.add_argument("--temperature", type=float, default=1.0, help="sample: official (multiplying) temperature")
    p.add_argument("--filter-threshold", type=float, default=1e-4)
    p.add_argument("--num-iter", type=_int_list, default=(), help="MAR iterations per level, e.g. 64,16")
    p.add_argument("--official-settings", action="store_true",
                   help="sample with the preset's official cfg, temperature, iterations and filter")
    p.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES,
                   help="sample: compile the sampling steps (FractalGen.compile_sampling) with this torch.compile "
                        "mode (default: 'default'; 'reduce-overhead' adds CUDA graphs); warm-up defaults to 1")
    p.add_argument("--out", help="append one JSON line per run to this file")
    args = p.parse_args(argv)
    if args.compile and args.mode != "sample":
        p.error("--compile applies to --mode sample")
    if args.warmup is None:
        args.warmup = 1 if args.mode == "train" or args.compile else 0
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch-size and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.dtype_name = ("bfloat16" if device.type == "cuda" else "float32") if args.dtype == "auto" else args.dtype
    config = CONFIGS[args.config]()
    if args.mode == "sample" and args.cfg != 1.0 and not config.conditional and not args.official_settings:
        raise SystemExit(f"{args.config} is unconditional; use --cfg 1")
    rss_before = peak_rss_bytes()
    model = build(config, device, args.seed)
    params = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    settings = sampling_settings(args) if args.mode == "sample" else None
    if args.mode == "train":
        runs = run_train(model, config, args, device, args.dtype_name)
    else:
        runs = run_sample(model, config, args, device, args.dtype_name, settings)
    warmup_times, times = runs[:args.warmup], runs[args.warmup:]
    mean = sum(times) / len(times)
    gflops = total_gflops(config, "implementation")
    record = {
        "config": args.config, "mode": args.mode, "batch_size": args.batch_size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": args.dtype_name, "threads": sampling_threads(args, config, device, settings), "params": params,
        "warmup": args.warmup, "warmup_times_s": warmup_times, "repeats": args.repeats, "times_s": times,
        "mean_s": mean, "min_s": min(times),
        "s_per_image": mean / args.batch_size, "images_per_s": args.batch_size / mean,
        "forward_gflops_per_image": gflops,
        "peak_rss_gb": peak_rss_bytes() / 1e9, "rss_before_model_gb": rss_before / 1e9,
        "cuda_peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "torch": torch.__version__, "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if args.mode == "train":
        record["grad_checkpointing"] = args.grad_checkpointing
        record["micro_batches"], record["lower_chunks"] = args.micro_batches, args.lower_chunks
        # forward + backward ~ 3x the forward FLOPs (every MAR patch counted as going down: an upper bound)
        record["approx_train_tflops_per_s"] = 3 * gflops * args.batch_size / mean / 1e3
    else:
        record["compile"] = args.compile
        record["sampling"] = {"cfg": settings.cfg, "cfg_schedule": settings.cfg_schedule,
                              "temperature": settings.temperature, "official_temperature": settings.official_temperature,
                              "filter_threshold": settings.filter_threshold,
                              "num_iter": [settings.iterations(l) for l in range(config.num_levels - 1)
                                           if config.generator_type_list[l] == "mar"]}
    print_table(record)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return record


def print_table(r: dict) -> None:
    mem = f"{r['cuda_peak_gb']:.2f} GB (cuda)" if r["cuda_peak_gb"] is not None else f"{r['peak_rss_gb']:.2f} GB (peak RSS)"
    what = "s/step" if r["mode"] == "train" else "s/call"
    rows = [
        ("config", f"{r['config']} ({r['params'] / 1e6:.2f}M params, {r['forward_gflops_per_image']:.2f} fwd GFLOPs/img)"),
        ("mode", r["mode"] + (" + grad checkpointing" if r.get("grad_checkpointing") else "")
         + (f", back-propagated in {r['micro_batches']} x {r['lower_chunks']} parts"
            if r.get("micro_batches", 1) * r.get("lower_chunks", 1) > 1 else "")),
        ("device", f"{r['device']} {r['device_name']}, {r['dtype']}, {r['threads']} threads"),
        ("batch", str(r["batch_size"])),
    ]
    if r["mode"] == "sample":
        s = r["sampling"]
        rows.append(("sampling", f"cfg {s['cfg']} ({s['cfg_schedule']}), temp {s['temperature']}, "
                                 f"filter {s['filter_threshold']}, MAR iters {s['num_iter']}"))
        if r["compile"]:
            first = ", ".join(f"{t:.1f}" for t in r["warmup_times_s"])
            rows.append(("compile", f"mode {r['compile']}; warm-up calls (compiling) {first} s"))
    rows += [
        (what, f"{r['mean_s']:.3f} mean, {r['min_s']:.3f} min over {r['repeats']} (after {r['warmup']} warm-up)"),
        ("s/image", f"{r['s_per_image']:.4f}  ({r['images_per_s']:.2f} img/s)"),
        ("memory", mem),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:>{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()
