#!/usr/bin/env python
r"""Side-by-side benchmark of fractalgen against the official code (LTH14/fractalgen) on one machine.

    python benchmarks/compare.py --reference /work/scratch/official                  # every CPU row
    python benchmarks/compare.py --reference /work/scratch/official --rows tiny_mar_sample ar16_sample \
        --repeats 3 --threads 2 --out results.jsonl
    python benchmarks/compare.py --reference /work/scratch/official --rows tiny_ar_sample \
        --fractalgen-args="--compile"                                                  # a compiled variant
    python benchmarks/compare.py --reference DIR --device cuda --out gpu.jsonl        # + the GPU-only rows

``--reference DIR`` is a checkout of the official code, run unmodified: compare_workers.py patches,
inside its own process only, ``Tensor.cuda`` / ``Module.cuda`` (no-ops) and
``torch.cuda.amp.autocast`` (a null context) on CPU, and ``torch.library.register_fake`` (ignores
operators that do not exist, so that torchvision, imported by timm and the official
util/visualize.py, imports beside a CPU-only torch). The official side runs under
``--reference-python`` (default: ``DIR/../venv_off/bin/python`` if it exists, else this
interpreter), which needs torch, numpy, scipy, timm 0.9.x and torchvision (``--no-deps`` is
enough); fractalgen runs under this interpreter.

Per row the official code builds the model with a fixed seed (``--seed``) and saves it as an
official checkpoint ``{'model': state_dict}`` in a temporary folder. Every repeat then runs the
official code and fractalgen, each in a fresh process (ABBA order: official first on even
repeats, fractalgen first on odd ones), both loading that checkpoint (fractalgen through
``fractalgen.checkpoint.load_official`` with the matching ``FractalConfig``), with the same batch,
labels (0, 1, 2, ... cycling over the classes), cfg and schedule, official (multiplying)
temperature, filter threshold, MAR iterations, device and threads (``torch.set_num_threads`` and
OMP/MKL_NUM_THREADS). A worker times one call after building and loading the model and after
``--warmup`` untimed calls (default: 1 for training rows, 0 for sampling rows; on CUDA the context
and cuBLAS are initialised first, untimed). It reports the seconds, the peak RSS of the process
(``ru_maxrss``: includes the build and the checkpoint load) and the peak RSS during the warm-up
and timed calls (Linux). The first fractalgen run of a sampling row then makes one more, untimed
call with each level object's ``sample`` wrapped by timers: the exclusive seconds per level (the
split; "unavailable" if the wrapping fails). Per row: the median seconds of each side, official /
fractalgen, the peak RSS of each, the split, and the images' shape and value statistics (or the
training losses); a table on stdout and with ``--out`` one JSON line per row (with the machine,
torch versions, threads, commits).

Sampling calls the official model as engine_fractalgen.evaluate does: class embedding,
``fake_latent`` rows appended for cfg != 1, ``model.sample(cond_list=[emb] * num_conds, ...)``;
its normalised output is mapped to uint8 as the engine saves it. Training is one iteration of
engine_fractalgen.train_one_epoch: uint8 images through ToTensor + ImageNet Normalize,
``model(imgs, labels)``, its NativeScalerWithGradNormCount (gradient clip 3.0), AdamW (0.9, 0.95)
over util.misc.add_weight_decay groups, lr 1e-4, no DDP; against fractalgen's
``train.loss_and_grads``, clip 3.0 and AdamW (as benchmarks/bench.py). On CUDA the official side
runs under float16 autocast (the engine's ``torch.cuda.amp.autocast()``) and fractalgen in its
fastest setting: sampling in float32 with its steps replayed as CUDA graphs (launch-bound, and
autocast only adds casts), except the huge rows in bfloat16 (their level 0 is compute-bound);
training in bfloat16 (``--fractalgen-args="--dtype float16"`` matches the official precision). Short GPU rows deserve
``--warmup 1`` (lazy kernel loading).

Rows (3 channels, class_num 1000 unless said; sampling: linear cfg schedule, temperature 1,
filter 1e-4, MAR iterations 64,16 unless said):
  tiny_ar_sample   img (64,4,1), widths (64,32,16), depths (2,1,1), heads (4,2,2), ar/ar/ar,
                   num_conds 1; 8 images, cfg 4
  tiny_mar_sample  the same sizes, mar/mar/ar, num_conds 5; 8 images, cfg 4
  tiny_ar_train, tiny_mar_train   a training step of those at batch 8
  shipped_sample   the shipped Fashion-MNIST architecture (fractalgen/assets/fmnist_ar/config.json:
                   img (28,4,1), widths (224,96,32), depths (6,2,1), heads (8,4,2), ar/ar/ar,
                   dropout 0) at 3 channels (the official code is RGB only), 10 classes;
                   80 images (8 per class), cfg 1
  shipped_train    its training step at batch 32 (its model card's batch)
  ar16_sample      img (16,4,1), widths (64,32,16), depths (2,1,1), heads (4,2,2), ar/ar/ar;
                   128 images, cfg 3
  mar16_sample     img (16,4,1), widths (64,32,16), depths (2,1,1), heads (4,2,2), mar/mar/ar,
                   num_conds 5, 10 classes; 128 images, cfg 3, MAR iterations 16,16 (every patch a step)
  ar32_sample      img (32,4,1), widths (96,48,32), depths (2,1,1), heads (4,2,2), ar/ar/ar;
                   128 images, cfg 3
  ar_in64_sample, mar_in64_sample   fractalar_in64 / fractalmar_in64 (the official builders
                   models.fractalgen.fractalar_in64 / fractalmar_in64); 8 images, cfg 4, MAR
                   iterations cut to --num-iter on both sides (default 8,4; AR levels always take
                   every step). Minutes per run on CPU
  ar_in64_train, mar_in64_train     their training step at batch 2; fractalgen with
                   lower_chunks 16 (its memory-saving option, as in bench.py)
  with --device cuda also:
  huge256_sample   fractalmar_huge_in256, 64 images, official settings (cfg 19, temperature 1.1,
                   iterations 64,16,16, filter 1e-3, linear); the JSON line has seconds per image
  huge256_b16      the same with 16 images (a shorter GPU check)
  ar_in64_b1       fractalar_in64, 1 image, official settings (cfg 11, temperature 1.03)
  mar_in64_train_b32  fractalmar_in64, a training step at batch 32 (a GPU batch)

``--fractalgen-args="--compile [MODE] --dtype D --graphs on|off --lower-chunks K --micro-batches M
--grad-checkpointing"`` (the ``=`` form: the value starts with a dash) passes options to the
fractalgen worker, over the row's own; sampling rows take ``--compile`` (one more untimed,
compiling call) and ``--dtype``, training rows the others and ``--dtype``. They are recorded and
label the row (``tiny_ar_sample [compile=default]``), so variants are separate rows.
``--allocator LIB`` preloads that memory allocator (``LD_PRELOAD``, e.g. jemalloc) into every
worker of both sides; it is recorded with the machine and printed above the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from fractalgen import FractalConfig  # noqa: E402
from fractalgen.checkpoint import SHIPPED_MODEL  # noqa: E402
from fractalgen.config import get_preset  # noqa: E402
from fractalgen.model import COMPILE_MODES  # noqa: E402
from fractalgen.sampling import OFFICIAL_SETTINGS  # noqa: E402

WORKER = Path(__file__).resolve().parent / "compare_workers.py"
DEFAULT_NUM_ITER = (8, 4)
FRACTALGEN_DEFAULTS = {"compile": None, "dtype": "auto", "graphs": "auto", "lower_chunks": 1, "micro_batches": 1,
                       "grad_checkpointing": False}
#: The fractalgen options that apply to each mode (the others are dropped, not recorded).
FRACTALGEN_OPTIONS = {"sample": ("compile", "dtype", "graphs"), "train": ("dtype", "lower_chunks", "micro_batches",
                                                                "grad_checkpointing")}

#: What must be in --reference for it to be the official code: file -> definition it holds.
REFERENCE_FILES = {
    "models/fractalgen.py": "class FractalGen",
    "models/ar.py": "class AR",
    "models/mar.py": "class MAR",
    "models/pixelloss.py": "class PixelLoss",
    "util/misc.py": "class NativeScalerWithGradNormCount",
}


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------

def stack(sizes: tuple[int, ...], widths: tuple[int, ...], depths: tuple[int, ...], heads: tuple[int, ...],
          types: tuple[str, ...], class_num: int = 1000) -> Callable[[], FractalConfig]:
    """A 3-channel stack (num_conds 5 when level 0 is MAR, else 1)."""
    return lambda: FractalConfig(sizes, widths, depths, heads, types, channels=3, class_num=class_num,
                                 num_conds=5 if types[0] == "mar" else 1)


def shipped_rgb() -> FractalConfig:
    """The shipped Fashion-MNIST architecture at 3 channels (ImageNet normalisation, as the official code)."""
    config = FractalConfig.load(SHIPPED_MODEL / "config.json")
    return dataclasses.replace(config, channels=3, pixel_mean=None, pixel_std=None)


def preset(name: str) -> Callable[[], FractalConfig]:
    """A fractalgen preset (the official models carry the same names)."""
    return lambda: get_preset(name)


TINY = ((64, 4, 1), (64, 32, 16), (2, 1, 1), (4, 2, 2))


@dataclass
class Row:
    """One side-by-side measurement: the architecture, what is timed, and the sampling settings."""

    config: Callable[[], FractalConfig]
    mode: str                          # "sample" or "train"
    batch: int
    what: str                          # one line for the table
    preset: str | None = None          # official builder in models/fractalgen.py (else FractalGen with the lists)
    cfg: float = 1.0
    cfg_schedule: str = "linear"
    temperature: float = 1.0           # official, multiplying temperature
    filter_threshold: float = 1e-4
    num_iter: tuple[int, ...] = (64, 16)
    cut_num_iter: bool = False         # the MAR iterations come from --num-iter
    fractalgen_options: dict = field(default_factory=dict)
    cuda_only: bool = False


ROWS: dict[str, Row] = {
    "tiny_ar_sample": Row(stack(*TINY, ("ar", "ar", "ar")), "sample", 8, "tiny AR, 8 images, cfg 4", cfg=4.0),
    "tiny_mar_sample": Row(stack(*TINY, ("mar", "mar", "ar")), "sample", 8, "tiny MAR, 8 images, cfg 4", cfg=4.0),
    "tiny_ar_train": Row(stack(*TINY, ("ar", "ar", "ar")), "train", 8, "tiny AR, train step, batch 8"),
    "tiny_mar_train": Row(stack(*TINY, ("mar", "mar", "ar")), "train", 8, "tiny MAR, train step, batch 8"),
    "shipped_sample": Row(shipped_rgb, "sample", 80, "shipped arch RGB, 80 images, cfg 1"),
    "shipped_train": Row(shipped_rgb, "train", 32, "shipped arch RGB, train step, batch 32"),
    "ar16_sample": Row(stack((16, 4, 1), (64, 32, 16), (2, 1, 1), (4, 2, 2), ("ar", "ar", "ar")), "sample", 128,
                       "16px AR, 128 images, cfg 3", cfg=3.0),
    "mar16_sample": Row(stack((16, 4, 1), (64, 32, 16), (2, 1, 1), (4, 2, 2), ("mar", "mar", "ar"), class_num=10),
                        "sample", 128, "16px MAR, 10 classes, 128 images, cfg 3", cfg=3.0, num_iter=(16, 16)),
    "ar32_sample": Row(stack((32, 4, 1), (96, 48, 32), (2, 1, 1), (4, 2, 2), ("ar", "ar", "ar")), "sample", 128,
                       "32px AR, 128 images, cfg 3", cfg=3.0),
    "ar_in64_sample": Row(preset("fractalar_in64"), "sample", 8, "fractalar_in64, 8 images, cfg 4",
                          preset="fractalar_in64", cfg=4.0, cut_num_iter=True),
    "mar_in64_sample": Row(preset("fractalmar_in64"), "sample", 8, "fractalmar_in64, 8 images, cfg 4",
                           preset="fractalmar_in64", cfg=4.0, cut_num_iter=True),
    "ar_in64_train": Row(preset("fractalar_in64"), "train", 2, "fractalar_in64, train step, batch 2",
                         preset="fractalar_in64", fractalgen_options={"lower_chunks": 16}),
    "mar_in64_train": Row(preset("fractalmar_in64"), "train", 2, "fractalmar_in64, train step, batch 2",
                          preset="fractalmar_in64", fractalgen_options={"lower_chunks": 16}),
    "huge256_sample": Row(preset("fractalmar_huge_in256"), "sample", 64,
                          "fractalmar_huge_in256, 64 images, official settings", preset="fractalmar_huge_in256",
                          cuda_only=True, fractalgen_options={"dtype": "bfloat16"},
                          **OFFICIAL_SETTINGS["fractalmar_huge_in256"]),
    "huge256_b16": Row(preset("fractalmar_huge_in256"), "sample", 16,
                       "fractalmar_huge_in256, 16 images, official settings", preset="fractalmar_huge_in256",
                       cuda_only=True, fractalgen_options={"dtype": "bfloat16"},
                       **OFFICIAL_SETTINGS["fractalmar_huge_in256"]),
    "ar_in64_b1": Row(preset("fractalar_in64"), "sample", 1, "fractalar_in64, 1 image, official settings",
                      preset="fractalar_in64", cuda_only=True, **OFFICIAL_SETTINGS["fractalar_in64"]),
    "mar_in64_train_b32": Row(preset("fractalmar_in64"), "train", 32, "fractalmar_in64, train step, batch 32",
                              preset="fractalmar_in64", cuda_only=True),
}


# ------------------------------------------------------------------------------------------------
# Running the workers
# ------------------------------------------------------------------------------------------------

def check_reference(reference: Path) -> None:
    """Exit with a one-line error unless ``reference`` holds the official model code."""
    for name, definition in REFERENCE_FILES.items():
        path = reference / name
        if not path.is_file() or not re.search(rf"^{definition}\b", path.read_text(errors="replace"), re.M):
            raise SystemExit(f"compare.py: {reference} is not a checkout of the official fractalgen code: "
                             f"{name} with {definition} is missing")


def reference_python(reference: Path, given: str | None) -> str:
    """The interpreter for the official side: --reference-python, DIR/../venv_off/bin/python, or this one."""
    if given is None:
        venv = reference.parent / "venv_off" / "bin" / "python"
        return str(venv) if venv.exists() else sys.executable
    found = shutil.which(given)  # a path, or a command name on PATH
    if found is None:
        raise SystemExit(f"compare.py: --reference-python {given} is neither an executable file nor a command on PATH")
    return found


def fractalgen_options(row: Row, extra: str) -> dict:
    """The fractalgen worker's options: defaults, the row's own, then --fractalgen-args."""
    p = argparse.ArgumentParser(prog="--fractalgen-args", add_help=False, exit_on_error=False)
    p.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--graphs", choices=["auto", "on", "off"])
    p.add_argument("--lower-chunks", type=int)
    p.add_argument("--micro-batches", type=int)
    p.add_argument("--grad-checkpointing", action="store_true", default=None)
    try:
        given, unknown = p.parse_known_args(shlex.split(extra))
    except argparse.ArgumentError as e:
        raise SystemExit(f"compare.py: bad --fractalgen-args {extra!r}: {e}") from None
    if unknown:
        raise SystemExit(f"compare.py: --fractalgen-args: unknown options {' '.join(unknown)}")
    options = dict(FRACTALGEN_DEFAULTS, **row.fractalgen_options)
    options.update({k: v for k, v in vars(given).items() if v is not None})
    return {k: options[k] for k in FRACTALGEN_OPTIONS[row.mode]}


def variant(options: dict) -> str:
    """The fractalgen options that differ from the defaults, e.g. 'compile=default' ('' if none)."""
    return ", ".join(f"{k}={v}" for k, v in options.items() if v != FRACTALGEN_DEFAULTS[k])


def run_worker(python: str, spec: dict, workdir: Path) -> dict:
    """Run one worker process on ``spec``; its result, or exit naming the failure and its log."""
    spec_path = workdir / f"spec_{spec['side']}.json"
    spec_path.write_text(json.dumps(spec))
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if spec["allocator"]:
        env["LD_PRELOAD"] = spec["allocator"]
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # nothing CUDA is touched on the CPU path
    proc = subprocess.run([python, str(WORKER), str(spec_path)], cwd=workdir, env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1][len("RESULT "):])
    fd, log = tempfile.mkstemp(prefix=f"compare_{spec['row']}_{spec['side']}_", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    last = (proc.stderr.strip().splitlines() or ["(no error output)"])[-1]
    raise SystemExit(f"compare.py: {spec['side']} worker failed on {spec['row']} (exit {proc.returncode}): "
                     f"{last} (full output: {log})")


def row_spec(name: str, row: Row, args, config: FractalConfig, checkpoint: Path) -> dict:
    """What every worker of this row gets (the side, warm-up and profiling are filled in per run)."""
    num_iter = args.num_iter if row.cut_num_iter else row.num_iter
    return {
        "row": name, "reference": str(args.reference), "checkpoint": str(checkpoint), "preset": row.preset,
        "config": config.to_dict(), "mode": row.mode, "batch": row.batch, "seed": args.seed,
        "threads": args.threads, "device": args.device, "allocator": args.allocator and str(args.allocator),
        "warmup": args.warmup if args.warmup is not None else int(row.mode == "train"),
        "sampling": {"cfg": row.cfg, "cfg_schedule": row.cfg_schedule, "temperature": row.temperature,
                     "filter_threshold": row.filter_threshold, "num_iter": list(num_iter)},
        "fractalgen_options": fractalgen_options(row, args.fractalgen_args),
    }


def side_summary(runs: list[dict]) -> dict:
    """Median and every run of one side."""
    times = [r["seconds"] for r in runs]
    last = runs[-1]
    summary = {"median_s": statistics.median(times), "times_s": times, "warmup_s": [r["warmup_s"] for r in runs],
               # the calls reset the kernel's high-water mark (ru_maxrss too): the process peak is the larger one
               "peak_rss_gb": max(max(r["peak_rss_bytes"], r["rss_after_load_bytes"]) for r in runs) / 1e9,
               "rss_after_load_gb": max(r["rss_after_load_bytes"] for r in runs) / 1e9,
               "call_peak_rss_gb": (None if None in [r["call_peak_rss_bytes"] for r in runs]
                                    else max(r["call_peak_rss_bytes"] for r in runs) / 1e9),
               "dtype": last["dtype"], "torch": last["torch"], "python": last["python"], "threads": last["threads"]}
    if "cuda_peak_bytes" in last:
        summary["cuda_peak_gb"] = max(r["cuda_peak_bytes"] for r in runs) / 1e9
        summary["gpu"] = last["gpu"]
    if "images" in last:
        summary["images"] = last["images"]
    if "loss" in last:
        summary["losses"] = [r["loss"] for r in runs]
    return summary


def measure(name: str, row: Row, args, python_official: str, bar: tqdm) -> dict:
    """Make the row's checkpoint, run every repeat of both sides, and summarise."""
    config = row.config()
    with tempfile.TemporaryDirectory(prefix="compare_") as tmp:
        workdir = Path(tmp)
        spec = row_spec(name, row, args, config, workdir / "official_init.pth")
        bar.set_description(f"{name} init")
        init = run_worker(python_official, {**spec, "side": "init"}, workdir)
        runs: dict[str, list[dict]] = {"official": [], "fractalgen": []}
        split = None
        for repeat in range(args.repeats):
            order = ("official", "fractalgen") if repeat % 2 == 0 else ("fractalgen", "official")
            for side in order:
                bar.set_description(f"{name} {repeat + 1}/{args.repeats} {side}")
                profile = side == "fractalgen" and repeat == 0 and row.mode == "sample" and args.split
                python = python_official if side == "official" else sys.executable
                result = run_worker(python, {**spec, "side": side, "profile": profile}, workdir)
                split = result.pop("split", None) or split
                runs[side].append(result)
                bar.update()
    official, fractalgen = side_summary(runs["official"]), side_summary(runs["fractalgen"])
    fractalgen["options"], fractalgen["split"] = spec["fractalgen_options"], split
    record = {"row": name, "variant": variant(spec["fractalgen_options"]), "what": row.what, "mode": row.mode,
              "batch": row.batch, "preset": row.preset, "params": init["params"], "config": spec["config"],
              "device": args.device, "threads": args.threads, "repeats": args.repeats, "warmup": spec["warmup"],
              "seed": args.seed,
              "official": official, "fractalgen": fractalgen, "ratio": official["median_s"] / fractalgen["median_s"]}
    if row.mode == "sample":
        record["sampling"] = spec["sampling"]
        record["num_iter_cut"] = row.cut_num_iter and "mar" in config.generator_type_list
        record["official"]["s_per_image"] = official["median_s"] / row.batch
        record["fractalgen"]["s_per_image"] = fractalgen["median_s"] / row.batch
        shapes = official["images"]["shape"], fractalgen["images"]["shape"]
        record["same_image_shape"] = shapes[0] == shapes[1]
    return record


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------

def git_commit(path: Path) -> str | None:
    """Short commit of the checkout at ``path`` (+ "-dirty" with uncommitted changes), None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) or None


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(args, python_official: str) -> dict:
    """Where and with what the rows ran."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads, "device": args.device,
            "allocator": str(args.allocator) if args.allocator else "the C library's malloc",
            "commit": git_commit(ROOT), "reference": str(args.reference),
            "reference_commit": git_commit(args.reference),
            "python": sys.executable, "reference_python": python_official,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def split_text(split: dict | None) -> str:
    """The level split as percentages of the profiled call."""
    if not split:
        return ""
    if "unavailable" in split:
        return "unavailable: " + split["unavailable"]
    total = split["total_s"]
    parts = [f"{name} {100 * s / total:.0f}%" for name, s in split["exclusive_s"].items()]
    return ", ".join(parts + [f"other {100 * split['other_s'] / total:.0f}%"])


def row_notes(r: dict) -> list[str]:
    """Lines under the table for one row: settings that differ from the defaults, and the outputs."""
    notes = []
    if any(w for side in ("official", "fractalgen") for w in r[side]["warmup_s"]):
        warm = {side: [[round(t, 2) for t in w] for w in r[side]["warmup_s"]] for side in ("official", "fractalgen")}
        notes.append(f"warm-up seconds per run: official {warm['official']}, fractalgen {warm['fractalgen']}")
    if r["mode"] == "sample":
        s = r["sampling"]
        if r["num_iter_cut"]:
            notes.append(f"MAR iterations cut to {','.join(map(str, s['num_iter']))} on both sides (--num-iter)")
        o, f = r["official"]["images"], r["fractalgen"]["images"]
        notes.append(f"images: official {tuple(o['shape'])} mean {o['mean']:.1f} std {o['std']:.1f}, "
                     f"fractalgen {tuple(f['shape'])} mean {f['mean']:.1f} std {f['std']:.1f}"
                     + ("" if r["same_image_shape"] else "  SHAPES DIFFER"))
    else:
        notes.append(f"losses: official {[round(l, 3) for l in r['official']['losses']]}, "
                     f"fractalgen {[round(l, 3) for l in r['fractalgen']['losses']]}")
    return notes


def rss_text(side: dict) -> str:
    """Peak RSS of the process, and in brackets during the timed call(s) where known."""
    call = side["call_peak_rss_gb"]
    return f"{side['peak_rss_gb']:.2f}" + (f" ({call:.2f})" if call is not None else "")


def print_table(records: list[dict], machine: dict) -> None:
    """The results as a table with per-row notes beneath."""
    gpu = machine["device"] != "cpu"
    header = ["row", "what", "official s", "fractalgen s", "off/fg", "official RSS GB", "fractalgen RSS GB"]
    if gpu:
        header += ["official GPU GB", "fractalgen GPU GB"]
    header.append("fractalgen split (exclusive)")
    table = [header]
    for r in records:
        o, f = r["official"], r["fractalgen"]
        label = f"{r['row']} [{r['variant']}]" if r["variant"] else r["row"]
        line = [label, r["what"], f"{o['median_s']:.2f}", f"{f['median_s']:.2f}", f"{r['ratio']:.2f}x",
                rss_text(o), rss_text(f)]
        if gpu:
            line += [f"{o.get('cuda_peak_gb', 0):.2f}", f"{f.get('cuda_peak_gb', 0):.2f}"]
        line.append(split_text(f["split"]))
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    print(f"\n{machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads, device {machine['device']}; "
          f"fractalgen {machine['commit']}, official {machine['reference_commit'] or machine['reference']}; "
          f"allocator: {machine['allocator']}; medians of {records[0]['repeats']} runs, each in a fresh process")
    for i, line in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("RSS: peak of the whole worker process (ru_maxrss, with the model build and checkpoint load); "
          "in brackets: peak during the warm-up and timed calls")
    for r in records:
        for note in row_notes(r):
            print(f"  {r['row']}: {note}")


# ------------------------------------------------------------------------------------------------

def _int_list(text: str) -> tuple[int, ...]:
    """'8,4' -> (8, 4)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 8,4, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"iterations must be >= 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, type=Path, help="checkout of the official code (LTH14/fractalgen)")
    p.add_argument("--reference-python", help="interpreter for the official side "
                                              "(default: REFERENCE/../venv_off/bin/python if it exists, else this one)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), metavar="ROW",
                   help=f"rows to run (default: every row of the device): {', '.join(ROWS)}")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per side and row (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (and OMP/MKL_NUM_THREADS) of every worker")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls before the timed one (default: 1 for training rows, 0 for sampling rows)")
    p.add_argument("--num-iter", type=_int_list, default=DEFAULT_NUM_ITER,
                   help="MAR iterations per level for the 64px sampling rows (default 8,4; official 64,16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, data and sampling")
    p.add_argument("--fractalgen-args", default="",
                   help='options for the fractalgen worker, e.g. --fractalgen-args="--compile --dtype bfloat16"')
    p.add_argument("--allocator", type=Path,
                   help="memory allocator preloaded (LD_PRELOAD) into every worker of both sides, e.g. "
                        "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 (default: the C library's malloc)")
    p.add_argument("--no-split", dest="split", action="store_false",
                   help="skip the extra fractalgen call that times each level (sampling rows)")
    p.add_argument("--out", type=Path, help="append one JSON line per row to this file")
    args = p.parse_args(argv)
    if args.allocator and not args.allocator.is_file():
        p.error(f"--allocator {args.allocator}: no such file (Debian: apt-get install libjemalloc2)")
    if args.repeats < 1 or args.threads < 1 or (args.warmup is not None and args.warmup < 0):
        p.error("--repeats and --threads must be >= 1, --warmup >= 0")
    args.reference = args.reference.resolve()
    available = [n for n, r in ROWS.items() if args.device == "cuda" or not r.cuda_only]
    args.rows = args.rows or available
    cuda_only = [n for n in args.rows if n not in available]
    if cuda_only:
        p.error(f"{', '.join(cuda_only)} run with --device cuda only")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the chosen rows; print the table, append JSON lines."""
    args = parse_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C: the running worker is killed and the
    # temporary checkpoint (GBs for the 64px rows) removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    check_reference(args.reference)
    python_official = reference_python(args.reference, args.reference_python)
    for name in args.rows:  # bad options fail before anything runs
        fractalgen_options(ROWS[name], args.fractalgen_args)
    machine = machine_info(args, python_official)
    records = []
    with tqdm(total=len(args.rows) * args.repeats * 2, unit="run") as bar:
        for name in args.rows:
            record = measure(name, ROWS[name], args, python_official, bar)
            record["machine"] = machine
            records.append(record)
            bar.write(f"{name}: official {record['official']['median_s']:.2f} s, "
                      f"fractalgen {record['fractalgen']['median_s']:.2f} s, {record['ratio']:.2f}x")
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
    print_table(records, machine)
    return records


if __name__ == "__main__":
    main()
