"""Lossless image compression with a fractal model: every sub-pixel is range-coded with the
probability the model gives it, so an image costs its negative log-likelihood in bits (plus a
few bytes of container).

>>> data = compress(model, images, labels)            # bytes of a .fgz file
>>> images, labels = decompress(model, data)          # bit-exact

Encoder and decoder run one code path: ``FractalGen.sample`` with a chooser that range-codes
(``constriction``'s RangeEncoder/RangeDecoder, categorical models over 256 values). The encoder
forces the image's values, the decoder reads them from the stream; both see the same float32
probabilities in the same order, which ``constriction`` quantises deterministically to integer
frequencies in which every value keeps a non-zero probability. To make "the same probabilities"
hold bit for bit:

- images are coded in groups of ``group_size`` sampled together (the batch shape decides how
  kernels round); one stream per group, so decoding one image decodes its group;
- every group runs on one intra-op thread (``torch.set_num_threads(1)`` while coding, restored
  afterwards), with autocast off, so a file does not depend on the thread count; groups run on
  ``workers`` Python threads side by side;
- the file records the model's identity (a hash of config and weights), the device type and the
  MAR schedule and seed; the CRC32 of every image catches what is left (another torch build or
  CPU kind, a damaged stream).

AR stacks code exactly their likelihood. MAR stacks code in the order drawn from the seed with
the schedule in the file (by default as many iterations as patches per level); patches predicted
in the same iteration are coded independently given the visible ones, which costs bits against
the random-order likelihood estimate of ``model.nll``, which scores one patch at a time.
Labels are stored when given; without them the null condition is used (the unconditional
likelihood).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import constriction
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .container import Header, check_name, pack, stream, unpack
from .errors import CodecError, InputError
from .levels import MARLevel
from .model import FractalGen
from .sampling import SamplingConfig

#: Images coded together by default: large enough for efficient batches, small enough that
#: decoding one image (which decodes its group) stays quick.
DEFAULT_GROUP = 512
_FAMILY = constriction.stream.model.Categorical(perfect=False)


def model_id(model: FractalGen) -> bytes:
    """16-byte identity of a model: sha256 of its config and of every weight's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, value in sorted(model.state_dict().items()):
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()[:16]


def software() -> str:
    """The versions that decide the coded probabilities, recorded in every file."""
    return f"torch {torch.__version__}, constriction {importlib.metadata.version('constriction')}"


class _RangeChooser:
    """The sampler's chooser: range-encodes the forced values (encoder) or decodes the values
    from ``stream`` (decoder), one call per sub-pixel step with that step's probabilities."""

    def __init__(self, stream: bytes | None = None):
        if stream is None:
            self.encoder = constriction.stream.queue.RangeEncoder()
            return
        if len(stream) % 4:
            raise CodecError("a coded stream has a length that is not a whole number of words; the file is corrupt")
        self.decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(stream, "<u4").astype(np.uint32))

    def __call__(self, probs: Tensor, targets: Tensor | None) -> Tensor:
        p = np.ascontiguousarray(probs.cpu().numpy(), dtype=np.float32)
        try:
            if targets is not None:
                self.encoder.encode(targets.cpu().numpy().astype(np.int32), _FAMILY, p)
                return targets
            values = self.decoder.decode(_FAMILY, p)
        except ValueError as e:  # constriction refuses probabilities that cannot be normalised
            raise CodecError(f"the model gave probabilities that cannot be coded ({e}); check its weights") from None
        return torch.from_numpy(values.astype(np.int64)).to(probs.device)

    def stream(self) -> bytes:
        return self.encoder.get_compressed().astype("<u4").tobytes()


@contextlib.contextmanager
def _coding_mode(model: FractalGen) -> Iterator[None]:
    """Eval mode (a model in train mode would drop labels at random) and one intra-op thread
    (kernels may round differently with more) while coding; both restored afterwards."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise CodecError("the codec computes probabilities in float32; load the model in float32")
    threads, training = torch.get_num_threads(), model.training
    torch.set_num_threads(1)
    model.eval()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        model.train(training)


def _code_group(model: FractalGen, header: Header, group: range, images: Tensor | None, stream: bytes | None,
                advance: Callable[[int], None]) -> tuple[Tensor, bytes]:
    """Encode (``images`` given) or decode (``stream`` given) one group: the same sampling call
    either way. Returns the group's images and its stream."""
    chooser = _RangeChooser(stream)
    labels = None if header.labels is None else torch.tensor(header.labels[group.start:group.stop])
    done = 0

    def on_step(step: int, total: int, _images: Tensor) -> None:
        nonlocal done
        now = len(group) * (step + 1) // total
        advance(now - done)
        done = now

    with torch.autocast(model.device.type, enabled=False):  # autocast state is per thread
        out = model.sample(labels=labels, num_images=None if labels is not None else len(group), seed=header.seed,
                           settings=SamplingConfig(num_iter=header.num_iter), targets=images, choose=chooser,
                           on_step=on_step, threads=1)
    return out, chooser.stream() if stream is None else stream


def _run_groups(model: FractalGen, groups: list[range], job: Callable, workers: int | None, progress: bool,
                desc: str) -> list:
    """``job(group, advance)`` for every group on ``workers`` threads, results in group order;
    ``advance(n)`` moves the progress bar (images, with their rate) by n images."""
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(groups), 8))
    lock = threading.Lock()
    # every worker sets its own thread count: a fresh thread's BLAS calls would otherwise use the default
    with tqdm(total=sum(len(g) for g in groups), desc=desc, unit="img", disable=not progress,
              dynamic_ncols=True) as bar, _coding_mode(model), \
            ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:

        def advance(n: int) -> None:
            with lock:
                bar.update(n)

        return list(pool.map(lambda group: job(group, advance), groups))


def _schedule(model: FractalGen, num_iter: Sequence[int] | None) -> tuple[int, ...]:
    """MAR iterations per level as coded (every level listed; AR levels ignore theirs); empty for AR stacks."""
    if not any(isinstance(level, MARLevel) for level in model.levels):
        return ()
    num_iter = tuple(num_iter or ())
    if len(num_iter) > len(model.levels) or any(n < 1 for n in num_iter):
        raise InputError(f"num_iter must hold at most {len(model.levels)} values >= 1 (one per level), got {num_iter}")
    return tuple(min(level.seq_len, num_iter[i]) if i < len(num_iter) else level.seq_len
                 for i, level in enumerate(model.levels))


def compress(model: FractalGen, images: Tensor, labels: Tensor | Sequence[int] | None = None,
             names: Sequence[str] | None = None, group_size: int = DEFAULT_GROUP,
             num_iter: Sequence[int] | None = None, seed: int = 0, workers: int | None = None,
             progress: bool = False) -> bytes:
    """The ``.fgz`` bytes of uint8 ``images`` (B, C, S, S) coded with ``model``.

    ``labels`` (one class per image) condition a class-conditional model and are stored; without
    them the null condition is used. ``names`` (file names) are stored for ``decompress``'s
    caller. ``num_iter`` and ``seed`` fix the schedule and order of MAR levels (default: one
    iteration per patch). ``workers`` threads code groups side by side (default: one per core,
    at most 8); the file does not depend on it."""
    model.check_images(images)
    b = images.shape[0]
    if b == 0:
        raise InputError("no images to compress; give at least one")
    labels = model.check_labels(labels, b)
    if group_size < 1:
        raise InputError(f"group_size must be >= 1, got {group_size}")
    if not 0 <= seed < 2 ** 63:
        raise InputError(f"seed must be in 0..2**63-1, got {seed}")
    if names is not None:
        names = list(names)
        if len(names) != b:
            raise InputError(f"got {len(names)} names for {b} images")
        for name in names:
            check_name(name, InputError)
    images = images.to(model.device, torch.uint8)
    crcs = [zlib.crc32(image.cpu().numpy().tobytes()) for image in images]
    header = Header(model_id(model), model.device.type, software(), model.config.image_size, model.config.channels,
                    group_size, seed, _schedule(model, num_iter), crcs,
                    None if labels is None else labels.tolist(), names)
    streams = _run_groups(model, header.groups(), lambda group, advance: _code_group(
        model, header, group, images[group.start:group.stop], None, advance)[1], workers, progress, "compress")
    return pack(header, streams)


def read_header(data: bytes) -> Header:
    """The header of ``.fgz`` bytes (checked: magic, version, CRC, length)."""
    return unpack(data)[0]


def check_model(model: FractalGen, header: Header) -> None:
    """Raise CodecError unless ``model`` on its device is the one that coded ``header``'s file."""
    if header.model_id != model_id(model):
        raise CodecError(f"the file was compressed with another model (id {header.model_id.hex()}), not this one "
                         f"(id {model_id(model).hex()}); decompress with the model that compressed it")
    if header.device != model.device.type:
        raise CodecError(f"the file was coded on {header.device}; decompress on the same kind of device "
                         f"(--device {header.device}), this model is on {model.device.type}")


def decompress(model: FractalGen, data: bytes, select: Sequence[int] | None = None, workers: int | None = None,
               progress: bool = False) -> tuple[Tensor, Tensor | None]:
    """Images (B, C, S, S) uint8 and labels (None when coded with the null condition) of ``.fgz``
    bytes; with ``select``, only those images (in that order), decoding only their groups.
    Raises CodecError for another model, a damaged file or pixels that fail their CRC32."""
    header, payload = unpack(data)
    check_model(model, header)
    select = list(range(header.count)) if select is None else [int(i) for i in select]
    bad = [i for i in select if not 0 <= i < header.count]
    if bad or not select:
        raise InputError(f"select images of the file, which holds images 0..{header.count - 1}; got {select}")
    g = header.group_size
    wanted = sorted({i // g for i in select})
    streams = {k: stream(data, header, payload, k) for k in wanted}  # all checked before any decoding

    def job(group: range, advance: Callable[[int], None]) -> Tensor:
        return _code_group(model, header, group, None, streams[group.start // g], advance)[0]

    decoded = _run_groups(model, [header.groups()[k] for k in wanted], job, workers, progress, "decompress")
    by_group = dict(zip(wanted, decoded))
    images = torch.stack([by_group[i // g][i % g] for i in select])
    for i, image in zip(select, images):
        if zlib.crc32(image.cpu().numpy().tobytes()) != header.crcs[i]:
            name = f" ({header.names[i]})" if header.names else ""
            raise CodecError(f"image {i}{name} decodes to pixels that fail their CRC32: this machine does not "
                             f"reproduce the probabilities it was coded with ({header.software} on {header.device}; "
                             f"here {software()}); decompress with the software and kind of CPU/GPU that wrote it")
    labels = None if header.labels is None else torch.tensor([header.labels[i] for i in select])
    return images, labels
