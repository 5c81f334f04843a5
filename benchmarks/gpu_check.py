#!/usr/bin/env python
"""One-shot GPU sampling check: seconds per image with the official settings in bf16, at the
largest batch that fits a time budget (random weights; timings do not depend on them).

    python benchmarks/gpu_check.py --budget 270 --out "$OUT/gpu_results.jsonl" \
        fractalmar_huge_in256 fractalmar_in64

For every config: build on the GPU, one cheap warm-up call (``--warmup-batch``, default 2 images,
one MAR iteration per level), then full official-settings sampling calls on a batch ladder: ``--start``, twice that,
then the largest ``start * 2**k`` whose predicted time (a line through the last two timings,
which separates the per-call launch overhead from the per-image work) fits 90% of what is
left of ``--budget``. Stops at ``--max-batch``, at the budget, or at an out-of-memory error.
``--compile MODE`` compiles the sampling steps first (each new batch size then compiles during
its call, which the timings include). Reports s/image of every call; the last (largest) one is
the headline. It times fractalgen alone: a speed-up is only what ``compare.py`` measures with the
official code in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import CONFIGS, build, sync  # noqa: E402
from fractalgen import SamplingConfig, load_model  # noqa: E402
from fractalgen.checkpoint import SHIPPED_MODELS  # noqa: E402
from fractalgen.flops import total_gflops  # noqa: E402
from fractalgen.model import COMPILE_MODES  # noqa: E402
from fractalgen.runtime import autocast  # noqa: E402
from fractalgen.sampling import OFFICIAL_SETTINGS  # noqa: E402

def timed_sample(model, config, batch: int, settings: SamplingConfig, dtype, seed: int, device,
                 graphs: bool | None = None) -> float:
    labels = (torch.randint(0, config.class_num, (batch,), generator=torch.Generator().manual_seed(seed)).to(device)
              if config.conditional else None)
    sync(device)
    t0 = time.perf_counter()
    with autocast(device, dtype):
        out = model.sample(labels=labels, num_images=batch, settings=settings, seed=seed, graphs=graphs)
    sync(device)
    assert out.shape[0] == batch
    return time.perf_counter() - t0


def settings_for(name: str, num_iter: tuple[int, ...]) -> SamplingConfig:
    """The preset's official settings; other configs: cfg 4 (1 when unconditional), linear
    schedule, filter 1e-4."""
    extra = {"num_iter": num_iter} if num_iter else {}
    if name in OFFICIAL_SETTINGS:
        return SamplingConfig.official(name, **extra)
    if name in SHIPPED_MODELS:  # the shipped models' own defaults (cfg 1)
        return SamplingConfig(**extra)
    cfg = 4.0 if CONFIGS[name]().conditional else 1.0
    return SamplingConfig(cfg=cfg, cfg_schedule="linear", filter_threshold=1e-4, **extra)


def predict(points: list[tuple[int, float]], batch: int) -> float:
    """Time of a call at ``batch`` from earlier (batch, seconds) points."""
    if len(points) >= 2:
        (b1, t1), (b2, t2) = points[-2], points[-1]
        slope = max((t2 - t1) / (b2 - b1), 1e-9) if b2 != b1 else t2 / b2
        return max(t2 + slope * (batch - b2), t2)
    b, t = points[-1]
    return t * batch / b


def next_batch(points, remaining: float, max_batch: int) -> int | None:
    """After one timing: double the batch if that fits. After two or more: the largest batch
    b * 2**k (capped at ``max_batch``) whose predicted time fits 90% of what is left."""
    b = points[-1][0]
    candidates = sorted({min(b * 2 ** k, max_batch) for k in range(1, 12)} - {b})
    if len(points) < 2:
        candidates = candidates[:1]
    fitting = [c for c in candidates if c > b and predict(points, c) <= 0.9 * remaining]
    return fitting[-1] if fitting else None


def check(name: str, args, out) -> None:
    device = args.device
    cuda = device.type == "cuda"
    t_start = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model = load_model(name, device=device) if name in SHIPPED_MODELS else build(CONFIGS[name](), device, 0).eval()
    config = model.config
    settings = settings_for(name, args.num_iter)
    if args.compile:
        model.compile_sampling(mode=args.compile)
    t_build = time.perf_counter() - t_start
    n_mar = sum(t == "mar" for t in config.generator_type_list[:-1])
    warm = settings_for(name, (1,) * n_mar)
    t_warm = timed_sample(model, config, args.warmup_batch, warm, args.dtype, 0, device, args.graphs) \
        if args.warmup_batch else 0.0
    print(f"[{name}] built in {t_build:.1f} s, warm-up {t_warm:.1f} s; compile {args.compile}; settings {settings}",
          flush=True)
    points: list[tuple[int, float]] = []
    fixed = list(args.batches)
    batch = fixed.pop(0) if fixed else args.start
    while batch is not None:
        remaining = args.budget - (time.perf_counter() - t_start)
        try:
            seconds = timed_sample(model, config, batch, settings, args.dtype, len(points) + 1, device, args.graphs)
        except torch.cuda.OutOfMemoryError:
            print(f"[{name}] batch {batch}: out of memory", flush=True)
            torch.cuda.empty_cache()
            break
        points.append((batch, seconds))
        record = {"config": name, "batch_size": batch, "seconds": seconds, "s_per_image": seconds / batch,
                  "images_per_s": batch / seconds, "dtype": str(args.dtype).replace("torch.", ""),
                  "cuda_peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
                  "device_name": torch.cuda.get_device_name(device) if cuda else str(device),
                  "torch": torch.__version__, "compile": args.compile, "graphs": args.graphs,
                  "settings": {"cfg": settings.cfg, "temperature": settings.temperature,
                               "cfg_schedule": settings.cfg_schedule, "filter_threshold": settings.filter_threshold,
                               "num_iter": list(settings.num_iter)},
                  "forward_gflops_per_image": total_gflops(config, "implementation"),
                  "budget_s": args.budget, "elapsed_s": time.perf_counter() - t_start}
        print(f"[{name}] batch {batch}: {seconds:.1f} s = {seconds / batch:.3f} s/image "
              f"({batch / seconds:.2f} img/s)" + (f", peak {record['cuda_peak_gb']:.1f} GB" if cuda else ""),
              flush=True)
        if out is not None:
            out.write(json.dumps(record) + "\n")
            out.flush()
        if args.split:
            print(f"[{name}] batch {batch} split: {split(model, config, batch, settings, args, device)}", flush=True)
        remaining = args.budget - (time.perf_counter() - t_start)
        if args.batches:
            batch = fixed.pop(0) if fixed else None
        else:
            batch = next_batch(points, remaining, args.max_batch)
    if points:
        b, t = points[-1]
        best_b, best_t = min(points, key=lambda bt: bt[1] / bt[0])
        print(f"[{name}] RESULT: {t / b:.3f} s/image at batch {b} (largest; best {best_t / best_b:.3f} at batch "
              f"{best_b}), {record['dtype']}, {settings}.", flush=True)
    del model
    if cuda:
        torch.cuda.empty_cache()


def split(model, config, batch: int, settings: SamplingConfig, args, device) -> dict:
    """Exclusive seconds per level of one more call (synchronised around every level call)."""
    from compare_workers import level_split
    return level_split(model, lambda: timed_sample(model, config, batch, settings, args.dtype, 0, device, args.graphs),
                       device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", choices=list(CONFIGS) + list(SHIPPED_MODELS),
                   help="presets (random weights) or shipped models")
    p.add_argument("--budget", type=float, default=270.0, help="seconds per config, build and warm-up included")
    p.add_argument("--start", type=int, default=16, help="first timed batch")
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--warmup-batch", type=int, default=2,
                   help="images of the cheap warm-up call (0: none; the first timed call then pays lazy loading and "
                        "compiling)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--num-iter", type=lambda t: tuple(int(v) for v in t.split(",") if v.strip()), default=(),
                   help="override the MAR iterations (smoke tests only), e.g. 2,2")
    p.add_argument("--compile", choices=COMPILE_MODES,
                   help="compile the sampling steps with this torch.compile mode (run inside the sampler's CUDA "
                        "graphs; reduce-overhead: torch's own graphs instead); each new batch size compiles")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test of the script")
    p.add_argument("--batches", type=lambda t: [int(v) for v in t.split(",") if v.strip()], default=[],
                   help="time these batch sizes (e.g. 1,64) instead of the ladder")
    p.add_argument("--graphs", choices=["auto", "on", "off"], default="auto",
                   help="static steps as CUDA graphs (auto: on CUDA)")
    p.add_argument("--split", action="store_true", help="also print the time per level of one more call")
    p.add_argument("--out", help="append JSON lines here")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    args.graphs = {"auto": None, "on": True, "off": False}[args.graphs]
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available")
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}", flush=True)
    out = open(args.out, "a") if args.out else None
    try:
        for name in args.configs:
            check(name, args, out)
    finally:
        if out is not None:
            out.close()


if __name__ == "__main__":
    main()
