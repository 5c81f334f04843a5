"""The ``.fgz`` container of ``codec``: a small binary header, a compressed index and the coded
streams of the image groups, back to back (docs/FORMAT.md gives the byte layout).

The index is columnar (every image's label, then every name, then every CRC32) and
LZMA-compressed, so that a few hundred bytes of coded pixels per image do not drown in
bookkeeping. A CRC32 covers header and index; the pixels of every image carry their own CRC32,
checked after decoding (a corrupt stream decodes to wrong pixels, which the CRC catches).
"""

from __future__ import annotations

import lzma
import struct
import zlib
from dataclasses import dataclass, field

from .errors import CodecError

MAGIC = b"\x89FGZ"
VERSION = 1
#: Raw LZMA2 (no container around it: a file of one image stays small), strongest preset.
_LZMA = dict(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])


@dataclass
class Header:
    """What a ``.fgz`` file says about its images and how they were coded."""

    model_id: bytes            # 16 bytes: sha256 of the model's config and weights, truncated
    device: str                # device type the probabilities were computed on ("cpu", "cuda")
    software: str              # torch and constriction versions of the writer (for error messages)
    image_size: int
    channels: int
    group_size: int            # images coded together (one batch, one stream)
    seed: int                  # seed of the MAR orders
    num_iter: tuple[int, ...]  # MAR iterations per level (empty for AR stacks)
    crcs: list[int]            # CRC32 of each image's pixels (C, H, W) uint8
    labels: list[int] | None = None  # class of each image; None = the null condition
    names: list[str] | None = None   # original file name of each image
    group_bytes: list[int] = field(default_factory=list)  # coded stream length of each group
    group_crcs: list[int] = field(default_factory=list)   # CRC32 of each group's coded stream

    @property
    def count(self) -> int:
        return len(self.crcs)

    @property
    def dims(self) -> int:
        """Sub-pixels per image."""
        return self.channels * self.image_size ** 2

    def groups(self) -> list[range]:
        """The images of each group."""
        return [range(s, min(s + self.group_size, self.count)) for s in range(0, self.count, self.group_size)]


def check_name(name: str, error: type[Exception] = CodecError) -> None:
    """Raise ``error`` unless ``name`` is a plain file name (decompression writes files by it)."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise error(f"{name!r} is not a plain file name (no folders, not empty); give names like 'shirt.png'")


# ------------------------------------------------------------------------------------------------
# Varints and fields
# ------------------------------------------------------------------------------------------------

def _varint(value: int) -> bytes:
    """LEB128: 7 bits per byte, low bits first, high bit set on every byte but the last."""
    if value < 0:
        raise ValueError(f"varints are unsigned, got {value}")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class _Reader:
    """Reads fields from bytes; running past the end or an overlong varint raises CodecError."""

    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise CodecError(f"{self.what} ends early")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def varint(self) -> int:
        value = 0
        for shift in range(0, 64, 7):
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise CodecError(f"{self.what} holds a malformed number")

    def text(self) -> str:
        try:
            return self.take(self.varint()).decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"{self.what} holds a malformed text field") from None

    def varints(self, n: int) -> list[int]:
        return [self.varint() for _ in range(n)]


def _text(value: str) -> bytes:
    raw = value.encode("utf-8")
    return _varint(len(raw)) + raw


# ------------------------------------------------------------------------------------------------
# Whole files
# ------------------------------------------------------------------------------------------------

def _index_bytes(h: Header) -> bytes:
    """The index before compression (field order as in docs/FORMAT.md)."""
    flags = (h.labels is not None) | (h.names is not None) << 1
    parts = [h.model_id, _text(h.device), _text(h.software)]
    parts += [_varint(v) for v in (h.image_size, h.channels, h.count, h.group_size, h.seed, len(h.num_iter))]
    parts += [_varint(v) for v in h.num_iter]
    parts.append(_varint(flags))
    if h.labels is not None:
        parts += [_varint(v) for v in h.labels]
    if h.names is not None:
        parts += [_text(v) for v in h.names]
    parts.append(struct.pack(f"<{h.count}I", *h.crcs))
    parts += [_varint(v) for v in h.group_bytes]
    parts.append(struct.pack(f"<{len(h.group_crcs)}I", *h.group_crcs))
    return b"".join(parts)


def pack(header: Header, streams: list[bytes]) -> bytes:
    """A whole ``.fgz`` file: header, index, its CRC32, then the group streams."""
    header.group_bytes = [len(s) for s in streams]
    header.group_crcs = [zlib.crc32(s) for s in streams]
    index = lzma.compress(_index_bytes(header), **_LZMA)
    head = MAGIC + bytes([VERSION]) + _varint(len(index)) + index
    return head + struct.pack("<I", zlib.crc32(head)) + b"".join(streams)


def unpack(data: bytes) -> tuple[Header, int]:
    """The header of a ``.fgz`` file and the offset of its first group stream. Raises CodecError
    for another file type, an unknown version, a damaged index and a truncated or extended file
    (``stream`` checks each group's stream)."""
    if data[:len(MAGIC)] != MAGIC:
        raise CodecError("not a fractalgen compressed file (.fgz): wrong magic bytes")
    reader = _Reader(data, "the file header")
    reader.take(len(MAGIC))
    version = reader.take(1)[0]
    if version != VERSION:
        raise CodecError(f"the file uses .fgz format version {version}, this fractalgen reads version {VERSION}; "
                         "decompress it with the fractalgen release that wrote it")
    size = reader.varint()
    packed = reader.take(size)
    (crc,) = struct.unpack("<I", reader.take(4))
    if zlib.crc32(data[:reader.pos - 4]) != crc:
        raise CodecError("the file header is corrupt (CRC32 mismatch)")
    try:
        index = lzma.decompress(packed, **_LZMA)
    except lzma.LZMAError:
        raise CodecError("the file index is corrupt (cannot be decompressed)") from None
    header = _read_index(_Reader(index, "the file index"))
    payload = reader.pos
    if len(data) - payload != sum(header.group_bytes):
        state = "truncated" if len(data) - payload < sum(header.group_bytes) else "followed by extra bytes"
        raise CodecError(f"the file is {state}: {len(data)} bytes, the index describes "
                         f"{payload + sum(header.group_bytes)}")
    return header, payload


def _read_index(r: _Reader) -> Header:
    """Parse the decompressed index."""
    model_id, device, software = r.take(16), r.text(), r.text()
    size, channels, count, group, seed, levels = r.varints(6)
    if group < 1 or channels < 1 or size < 1:
        raise CodecError("the file index is corrupt (zero size, channels or group)")
    num_iter = tuple(r.varints(levels))
    flags = r.varint()
    labels = r.varints(count) if flags & 1 else None
    names = [r.text() for _ in range(count)] if flags & 2 else None
    for name in names or ():
        check_name(name)
    crcs = list(struct.unpack(f"<{count}I", r.take(4 * count)))
    groups = -(-count // group)
    group_bytes = r.varints(groups)
    group_crcs = list(struct.unpack(f"<{groups}I", r.take(4 * groups)))
    if r.pos != len(r.data):
        raise CodecError("the file index is corrupt (unexpected trailing bytes)")
    return Header(model_id, device, software, size, channels, group, seed, num_iter, crcs, labels, names, group_bytes,
                  group_crcs)


def stream(data: bytes, header: Header, payload: int, group: int) -> bytes:
    """The coded stream of ``group``, checked against its CRC32."""
    start = payload + sum(header.group_bytes[:group])
    chunk = data[start:start + header.group_bytes[group]]
    if zlib.crc32(chunk) != header.group_crcs[group]:
        raise CodecError(f"the coded stream of image group {group} is corrupt (CRC32 mismatch)")
    return chunk
