#!/usr/bin/env python
"""Sampling on an idle machine and with one core kept busy, torch's default threads against the
count fractalgen chooses, side by side in one run (run on demand).

    python benchmarks/busy_machine.py                                  # the main job, 3 rounds
    python benchmarks/busy_machine.py --repeats 5 --out busy.jsonl
    python benchmarks/busy_machine.py --jobs sample compress decompress --sample-args --model fmnist-mar

Each measurement runs one command in a fresh process and takes its wall time (start, model load
and the work: what a user waits for). "busy" starts ``yes`` writing to /dev/null (one core kept
busy, as another program would) half a second before the command and stops it when the command
ends; it is killed after ``--timeout`` seconds at most, like the command. The rounds alternate
idle/busy and the variants, and the table gives medians:

- ``sample``: ``fractalgen sample --out X.png`` (80 images, the shipped model), with
  ``--threads N`` (N = torch's default count: what sampling used before it chose) and without
  (the choice of ``fractalgen.model.threads_for_sampling``: by the work and the busy cores);
- ``compress`` / ``decompress``: the same 80 images as PNG files through ``fractalgen compress``
  and back (one intra-op thread per group of images, as always).

Timings on a shared machine are noisy: run it when ``uptime`` shows little load, several times.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from compare import cpu_model  # noqa: E402  (benchmarks/compare.py, beside this script)
from fractalgen import load_model  # noqa: E402
from fractalgen.checkpoint import DEFAULT_MODEL  # noqa: E402
from fractalgen.runtime import save_image  # noqa: E402

FRACTALGEN = [sys.executable, "-m", "fractalgen"]


def commands(folder: Path, jobs: list[str], sample_args: list[str]) -> dict[str, list[str]]:
    """The command of every (job, variant) measured."""
    default = str(torch.get_num_threads())
    sample = [*FRACTALGEN, "sample", "--out", str(folder / "grid.png"), *sample_args]
    every = {
        "sample, torch default threads": [*sample, "--threads", default],
        "sample, threads chosen": sample,
        "compress": [*FRACTALGEN, "compress", str(folder / "images"), "--out", str(folder / "x.fgz"), "--force",
                     "--model", DEFAULT_MODEL],
        "decompress": [*FRACTALGEN, "decompress", str(folder / "x.fgz"), "--out", str(folder / "back"), "--force",
                       "--model", DEFAULT_MODEL],
    }
    return {name: command for name, command in every.items() if name.split(",")[0] in jobs}


def write_images(folder: Path) -> None:
    """80 samples of the shipped model (8 per class) as PNG files: the codec commands' input."""
    images = load_model().eval().sample(labels=torch.arange(10).repeat_interleave(8), seed=0)
    for i, image in enumerate(images):
        save_image(image, folder / "images" / f"{i:03d}.png")


def timed(command: list[str], busy: bool, timeout: float) -> float:
    """Wall seconds of ``command``, with ``yes`` keeping a core busy meanwhile when ``busy``."""
    hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if busy else None
    try:
        if hog is not None:
            time.sleep(0.5)  # the scheduler has placed it before the command starts
        start = time.perf_counter()
        subprocess.run(command, check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def load() -> str:
    """The 1-minute load average, for the conditions line."""
    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each measures every variant idle and busy")
    parser.add_argument("--jobs", nargs="+", default=["sample"], choices=["sample", "compress", "decompress"],
                        help="what to measure")
    parser.add_argument("--sample-args", nargs=argparse.REMAINDER, default=[],
                        help="extra options of `fractalgen sample` (last on the line), e.g. --model fmnist-mar")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one command (and the busy core) may take")
    parser.add_argument("--out", help="append one JSON line per variant to this file")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` stops the busy core and the command too

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if {"compress", "decompress"} & set(args.jobs):
            write_images(folder)
        runs = commands(folder, args.jobs, args.sample_args)
        times: dict[tuple[str, bool], list[float]] = {(name, busy): [] for name in runs for busy in (False, True)}
        loads = [load()]
        for r in range(args.repeats):
            for busy in (False, True) if r % 2 == 0 else (True, False):
                for name, command in runs.items():
                    times[name, busy].append(timed(command, busy, args.timeout))
                    print(f"round {r + 1}: {name}, {'busy' if busy else 'idle'}: {times[name, busy][-1]:.2f} s",
                          flush=True)
            loads.append(load())

    print(f"\n{os.cpu_count()} cores ({cpu_model()}), torch {torch.__version__} ({torch.get_num_threads()} threads by default), "
          f"median of {args.repeats}; 1-minute load before and after each round: {' '.join(loads)}")
    print(f"{'job':<32} {'idle':>8} {'one core busy':>14} {'busy / idle':>12}")
    for name in runs:
        idle, busy = (statistics.median(times[name, b]) for b in (False, True))
        print(f"{name:<32} {idle:>7.2f}s {busy:>13.2f}s {busy / idle:>11.2f}x")
        if args.out:
            with open(args.out, "a") as file:
                file.write(json.dumps({"job": name, "idle_s": times[name, False], "busy_s": times[name, True],
                                       "cores": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__,
                                       "load": loads,
                                       "sample_args": args.sample_args}) + "\n")


if __name__ == "__main__":
    main()
