"""A fast path for label PNGs whose rows are stored unfiltered: inflate with libdeflate, drop each row's
filter byte.

libpng and Pillow write palette images unfiltered by default, so every GTA5 label is such a file. zlib's
inflate is most of Pillow's cost for one (2.8 of 3.2 ms for a 1914x1052 label); libdeflate inflates the same
stream in about 0.15 ms. A cache build reads each source label twice (planning, then the decoding worker).
Any other PNG (filtered rows, other bit depths or colour types, interlaced, damaged) gives None, and the
caller decodes it in full with Pillow, which also words the errors.
"""

from __future__ import annotations

import struct
import zlib

import deflate
import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GREY, _PALETTE = 0, 3  # PNG colour types whose 8-bit samples are the label's raw values


def decode_unfiltered_label(data: bytes) -> np.ndarray | None:
    """The raw values (H, W) uint8, read-only, of an 8-bit greyscale or palette PNG whose rows are all
    unfiltered; None for any other file. The chunk CRCs and zlib's Adler-32 are checked."""
    if len(data) < 33 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if depth != 8 or colour not in (_GREY, _PALETTE) or compression or filtering or interlace:
        return None
    if not 0 < width * height <= Image.MAX_IMAGE_PIXELS:  # Pillow's limit, so a bomb is refused as there
        return None
    view, idat, pos = memoryview(data), [], 8
    while True:
        if pos + 12 > len(data):
            return None  # truncated before IEND
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data) or zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            return None
        if kind == b"IDAT":
            idat.append(view[pos + 8:end - 4])
        elif kind == b"IEND":
            break
        pos = end
    stride = width + 1  # each row starts with its filter byte
    try:
        raw = deflate.zlib_decompress(b"".join(idat), height * stride)
    except deflate.DeflateError:
        return None
    if len(raw) != height * stride:
        return None
    rows = np.frombuffer(raw, np.uint8).reshape(height, stride)
    if rows[:, 0].any():
        return None  # a filtered row: undoing filters is the full decoder's job
    values = np.ascontiguousarray(rows[:, 1:])
    values.flags.writeable = False
    return values
