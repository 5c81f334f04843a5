#!/usr/bin/env python
"""Worker processes of ``benchmarks/compare.py``: one fresh process per timed run.

    python benchmarks/compare_workers.py SPEC.json     # prints one line: RESULT {...json...}

``SPEC.json`` (written by compare.py) names the side: ``init`` (build the official model with a
fixed seed and save ``{'model': state_dict}``), ``official`` (load that checkpoint into the
official code and time one call) or ``fractalgen`` (load it with
``fractalgen.checkpoint.load_official`` and time one call). The official side runs under the
reference checkout's own interpreter, so this module imports only the standard library, torch
and numpy at the top; fractalgen is imported inside the fractalgen worker.

The official code runs unmodified. Inside the official worker process only: on CPU
``Tensor.cuda`` / ``Module.cuda`` return their object unchanged and ``torch.cuda.amp.autocast``
is a null context; everywhere ``torch.library.register_fake`` ignores registrations for operators
that do not exist (torchvision's C operators do not load beside a CPU-only torch, and its fake
registrations then fail ``import torchvision``, which timm and the official util/visualize.py
import).
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_KWARGS = ("label_drop_prob", "class_num", "attn_dropout", "proj_dropout", "guiding_pixel", "num_conds",
                   "r_weight")
OFFICIAL_LISTS = ("img_size_list", "embed_dim_list", "num_blocks_list", "num_heads_list", "generator_type_list")


# ------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs``; ignored elsewhere)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_since_reset() -> int | None:
    """Peak RSS since ``reset_peak_rss`` (``VmHWM``), None where /proc is unavailable."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(call: Callable[[], object], warmup: int, device: torch.device) -> dict:
    """Warm-up calls, then the timed one: seconds, the output, and the peak RSS during these calls.
    On CUDA the context and cuBLAS (float32 and float16) are initialised first, outside the timing."""
    if device.type == "cuda":
        a = torch.ones(64, 64, device=device)
        with torch.autocast("cuda", dtype=torch.float16):
            a @ a
        a @ a
        sync(device)
    reset_peak_rss()
    warmup_s = [timed(call, device)[0] for _ in range(warmup)]
    seconds, out = timed(call, device)
    return {"seconds": seconds, "warmup_s": warmup_s, "out": out, "call_peak_rss_bytes": peak_rss_since_reset()}


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds of one call of ``fn`` (device synchronised around it) and its result."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def image_stats(images: torch.Tensor) -> dict:
    """Shape and value statistics of a uint8 image batch."""
    x = images.detach().float().cpu()
    return {"shape": list(images.shape), "mean": x.mean().item(), "std": x.std().item(),
            "min": x.min().item(), "max": x.max().item()}


def labels_for(spec: dict, device: torch.device) -> torch.Tensor:
    """Class ids 0, 1, 2, ... cycling over the classes (the same on both sides)."""
    return torch.arange(spec["batch"], device=device) % spec["config"]["class_num"]


def random_images(spec: dict) -> torch.Tensor:
    """Seeded random uint8 training images (B, 3, S, S), the same on both sides."""
    g = torch.Generator().manual_seed(spec["seed"])
    s = spec["config"]["img_size_list"][0]
    return torch.randint(0, 256, (spec["batch"], 3, s, s), generator=g, dtype=torch.uint8)


def process_info(device: torch.device) -> dict:
    """Versions, threads and memory of this process."""
    info = {"torch": torch.__version__, "python": sys.version.split()[0], "threads": torch.get_num_threads(),
            "peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return info


# ------------------------------------------------------------------------------------------------
# The official code
# ------------------------------------------------------------------------------------------------

def make_official_importable(reference: str, device: torch.device) -> None:
    """Put the checkout on sys.path and apply the process-local patches it needs (module docstring)."""
    real_register_fake = torch.library.register_fake

    def tolerant_register_fake(op, func=None, /, *args, **kwargs):
        def register(f):
            try:
                return real_register_fake(op, f, *args, **kwargs)
            except RuntimeError as e:
                if "does not exist" not in str(e):
                    raise
                return f
        return register(func) if func is not None else register

    torch.library.register_fake = tolerant_register_fake
    if device.type == "cpu":
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        torch.nn.Module.cuda = lambda self, *args, **kwargs: self
        torch.cuda.amp.autocast = lambda *args, **kwargs: contextlib.nullcontext()
    sys.path.insert(0, reference)


def build_official(spec: dict):
    """The official model for ``spec['config']``: its preset builder (as main_fractalgen.py calls it)
    or ``FractalGen`` with the per-level lists, initialised with the fixed seed."""
    from models import fractalgen as official

    config = spec["config"]
    kwargs = {k: config[k] for k in OFFICIAL_KWARGS}
    torch.manual_seed(spec["seed"])
    np.random.seed(spec["seed"])
    if spec["preset"]:
        return official.__dict__[spec["preset"]](**kwargs)
    return official.FractalGen(**{k: list(config[k]) for k in OFFICIAL_LISTS}, **kwargs)


def official_autocast(device: torch.device):
    """engine_fractalgen.py's ``torch.cuda.amp.autocast()`` (float16) on CUDA; float32 on CPU."""
    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()


def run_init(spec: dict, device: torch.device) -> dict:
    """Build the official model with the seed and save it as an official checkpoint."""
    model = build_official(spec)
    torch.save({"model": model.state_dict()}, spec["checkpoint"])
    return {"params": sum(p.numel() for p in model.parameters())}


def run_official(spec: dict, device: torch.device) -> dict:
    """Load the checkpoint into the official model and time one sampling call or training step."""
    model = build_official(spec)
    model.load_state_dict(torch.load(spec["checkpoint"], map_location="cpu", weights_only=True)["model"], strict=True)
    model.to(device)
    rss_loaded = peak_rss_bytes()
    if spec["mode"] == "sample":
        model.eval()
        labels = labels_for(spec, device)
        s = spec["sampling"]

        def call():
            torch.manual_seed(spec["seed"])
            np.random.seed(spec["seed"])
            with torch.no_grad(), official_autocast(device):  # as engine_fractalgen.evaluate builds the conditions
                class_embedding = model.class_emb(labels)
                if s["cfg"] != 1.0:
                    class_embedding = torch.cat([class_embedding, model.fake_latent.repeat(spec["batch"], 1)], dim=0)
                return model.sample(cond_list=[class_embedding for _ in range(spec["config"]["num_conds"])],
                                    num_iter_list=list(s["num_iter"]), cfg=s["cfg"], cfg_schedule=s["cfg_schedule"],
                                    temperature=s["temperature"], filter_threshold=s["filter_threshold"],
                                    fractal_level=0)
    else:
        import util.misc as misc

        model.train()
        optimizer = torch.optim.AdamW(misc.add_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
        loss_scaler = misc.NativeScalerWithGradNormCount()  # disabled (a plain step) without CUDA
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        images = ((random_images(spec).float() / 255 - mean) / std).to(device)  # ToTensor + Normalize
        labels = labels_for(spec, device)

        def call():  # engine_fractalgen.train_one_epoch, one iteration
            with official_autocast(device):
                loss = model(images, labels)
            loss_value = loss.item()
            loss_scaler(loss, optimizer, clip_grad=3.0, parameters=model.parameters(), update_grad=True)
            optimizer.zero_grad()
            return loss_value

    result = measure(call, spec["warmup"], device)
    out = result.pop("out")
    result.update(rss_after_load_bytes=rss_loaded, dtype="float16 autocast" if device.type == "cuda" else "float32",
                  **process_info(device))
    if spec["mode"] == "sample":
        mean = torch.tensor(IMAGENET_MEAN, device=out.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=out.device).view(1, 3, 1, 1)
        result["images"] = image_stats(((out.float() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8))
    else:
        result["loss"] = out
    return result


# ------------------------------------------------------------------------------------------------
# fractalgen
# ------------------------------------------------------------------------------------------------

def level_split(model, call: Callable[[], object], device: torch.device) -> dict:
    """Exclusive seconds per level (inclusive minus nested levels) of one untimed call, by wrapping
    each level object's ``sample`` in this process; ``{'unavailable': why}`` if that fails."""
    try:
        types = model.config.generator_type_list
        targets = {}
        for i, level in enumerate(model.levels):
            targets[f"level{i} {types[i]}"] = level
            guide = getattr(level, "guide", None)
            if guide is not None and callable(getattr(guide, "sample", None)):
                targets[f"level{i} guiding pixel"] = guide
        targets["pixel"] = model.pixel
        exclusive = dict.fromkeys(targets, 0.0)
        calls = dict.fromkeys(targets, 0)
        children: list[float] = []

        def wrap(name: str, method: Callable) -> Callable:
            def timed_sample(*args, **kwargs):
                sync(device)
                t0 = time.perf_counter()
                children.append(0.0)
                try:
                    return method(*args, **kwargs)
                finally:
                    sync(device)
                    dt = time.perf_counter() - t0
                    exclusive[name] += dt - children.pop()
                    calls[name] += 1
                    if children:
                        children[-1] += dt
            return timed_sample

        for name, obj in targets.items():
            obj.sample = wrap(name, obj.sample)  # instance attribute shadows the method
        try:
            total, _ = timed(call, device)
        finally:
            for obj in targets.values():
                obj.__dict__.pop("sample", None)
    except Exception as e:  # the split is a diagnostic: never fail the benchmark over it
        return {"unavailable": f"{type(e).__name__}: {e}"}
    if not any(calls.values()):
        return {"unavailable": "no level's sample method was called (internals changed?)"}
    return {"total_s": total, "exclusive_s": exclusive, "other_s": total - sum(exclusive.values()), "calls": calls}


def run_fractalgen(spec: dict, device: torch.device) -> dict:
    """Load the checkpoint with ``load_official`` and time one sampling call or training step."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    from fractalgen import FractalConfig, SamplingConfig
    from fractalgen.checkpoint import load_official
    from fractalgen.runtime import autocast
    from fractalgen.train import loss_and_grads, make_optimizer

    opts = spec["fractalgen_options"]
    # auto: sampling in float32 (CUDA graphs leave the small steps launch-bound: autocast only adds
    # casts), training in bfloat16 on CUDA
    cuda_train = device.type == "cuda" and spec["mode"] == "train"
    dtype = ("bfloat16" if cuda_train else "float32") if opts["dtype"] == "auto" else opts["dtype"]
    model = load_official(spec["checkpoint"], FractalConfig.from_dict(spec["config"])).to(device)
    rss_loaded = peak_rss_bytes()
    warmup = spec["warmup"]
    if spec["mode"] == "sample":
        model.eval()
        if opts["compile"]:
            model.compile_sampling(mode=opts["compile"])
            warmup = max(warmup, 1)  # the first call compiles
        labels = labels_for(spec, device)
        s = spec["sampling"]
        settings = SamplingConfig(cfg=s["cfg"], cfg_schedule=s["cfg_schedule"], temperature=s["temperature"],
                                  official_temperature=True, filter_threshold=s["filter_threshold"],
                                  num_iter=tuple(s["num_iter"]))

        graphs = {"auto": None, "on": True, "off": False}[opts.get("graphs", "auto")]

        def call():
            with autocast(device, dtype):
                return model.sample(labels=labels, settings=settings, seed=spec["seed"], graphs=graphs,
                                    threads=spec["threads"])
    else:
        model.set_grad_checkpointing(opts["grad_checkpointing"])
        optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.05)
        images, labels = random_images(spec).to(device), labels_for(spec, device)

        def call():  # as benchmarks/bench.py run_train
            model.train()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_and_grads(model, images, labels, device, dtype, opts["micro_batches"], opts["lower_chunks"])
            torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
            optimizer.step()
            return loss.item()

    result = measure(call, warmup, device)
    out = result.pop("out")
    result.update(rss_after_load_bytes=rss_loaded, dtype=dtype, **process_info(device))
    if spec["mode"] == "sample":
        result["images"] = image_stats(out)
        result["split"] = level_split(model, call, device) if spec["profile"] else None
    else:
        result["loss"] = out
    return result


# ------------------------------------------------------------------------------------------------

def main(spec_path: str) -> None:
    """Run the side named in the spec and print its result as one JSON line."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if spec["side"] in ("init", "official"):
        make_official_importable(spec["reference"], torch.device("cpu") if spec["side"] == "init" else device)
    run = {"init": run_init, "official": run_official, "fractalgen": run_fractalgen}[spec["side"]]
    print("RESULT " + json.dumps(run(spec, device)), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: compare_workers.py SPEC.json (written by benchmarks/compare.py)")
    main(sys.argv[1])
