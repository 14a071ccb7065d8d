"""The unfiltered-label fast path gives Pillow's values or declines (None): never other values."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ssr_cache.data.labels import ID_PALETTE
from ssr_cache.data.opencv import cv2
from ssr_cache.data.png_io import read_label_ids, write_png_atomic
from ssr_cache.data.png_unfiltered import decode_unfiltered_label
from ssr_cache.errors import SSRError


def _blocky_ids(h: int = 75, w: int = 131, classes: int = 34, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.repeat(rng.integers(0, classes, (h // 8 + 1, w // 8 + 1), dtype=np.uint8), 8, 0), 8, 1)
    ids[rng.random(ids.shape) < 0.05] = 255  # some scattered pixels, as at object borders
    return ids[:h, :w]


def _pillow_values(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image)


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(struct.pack(">I", len(payload)) + kind + payload
                    + struct.pack(">I", zlib.crc32(kind + payload)) for kind, payload in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


def _with_rows(data: bytes, rows: np.ndarray) -> bytes:
    """The same PNG with its IDAT replaced by `rows` ((H, W + 1): filter byte, then samples), split in two
    IDAT chunks as encoders do for big images."""
    stream = zlib.compress(rows.tobytes())
    kept = [c for c in _chunks(data) if c[0] != b"IDAT"]
    half = len(stream) // 2
    return _png(kept[:-1] + [(b"IDAT", stream[:half]), (b"IDAT", stream[half:])] + kept[-1:])


def test_palette_label_as_the_datasets_write_it_takes_the_fast_path(tmp_path):
    # GTA5's labels: 8-bit palette PNGs, which libpng and Pillow write unfiltered.
    ids = _blocky_ids()
    write_png_atomic(tmp_path / "l.png", ids, palette=ID_PALETTE)
    data = (tmp_path / "l.png").read_bytes()
    fast = decode_unfiltered_label(data)
    assert fast is not None
    np.testing.assert_array_equal(fast, ids)
    np.testing.assert_array_equal(fast, _pillow_values(data))
    assert fast.dtype == np.uint8 and fast.shape == ids.shape and not fast.flags.writeable
    np.testing.assert_array_equal(read_label_ids(tmp_path / "l.png"), ids)
    # What the readers do with it: a table lookup, by cv2.LUT on the strided rows or by numpy indexing.
    table = np.arange(256, dtype=np.uint8)[::-1].copy()
    np.testing.assert_array_equal(cv2.LUT(fast, table), table[ids])
    np.testing.assert_array_equal(table[fast], table[ids])


def test_unfiltered_greyscale_and_multi_idat_take_the_fast_path():
    ids = _blocky_ids(seed=1)
    grey = io.BytesIO()
    Image.fromarray(ids).save(grey, format="PNG")
    rows = np.concatenate([np.zeros((ids.shape[0], 1), np.uint8), ids], axis=1)
    data = _with_rows(grey.getvalue(), rows)
    np.testing.assert_array_equal(_pillow_values(data), ids)
    np.testing.assert_array_equal(decode_unfiltered_label(data), ids)


@pytest.mark.parametrize("writer", ["pillow", "opencv"])
def test_filtered_greyscale_declines_and_reads_as_pillow(tmp_path, writer):
    # Cityscapes' label PNGs are greyscale with adaptive filters (Sub, Up, Paeth): the full decoder's job.
    ids = _blocky_ids(seed=2)
    path = tmp_path / "l_labelIds.png"
    if writer == "pillow":
        write_png_atomic(path, ids)
    else:
        assert cv2.imwrite(str(path), ids)
    data = path.read_bytes()
    assert decode_unfiltered_label(data) is None
    np.testing.assert_array_equal(read_label_ids(path), ids)


def test_a_single_filtered_row_declines():
    ids = _blocky_ids(seed=3)
    rows = np.concatenate([np.zeros((ids.shape[0], 1), np.uint8), ids], axis=1)
    rows[40, 0] = 2  # Up: row 40 is stored as its difference from row 39
    rows[40, 1:] = ids[40] - ids[39]
    grey = io.BytesIO()
    Image.fromarray(ids).save(grey, format="PNG")
    data = _with_rows(grey.getvalue(), rows)
    assert decode_unfiltered_label(data) is None
    np.testing.assert_array_equal(_pillow_values(data), ids)  # the file is valid: Pillow undoes the filter


def test_low_bit_depth_palette_declines_and_reads_as_pillow(tmp_path):
    ids = (_blocky_ids(seed=4) % 4).astype(np.uint8)
    image = Image.fromarray(ids)
    image.putpalette(ID_PALETTE[:4].ravel().tolist())
    image.save(tmp_path / "l.png", bits=2)
    data = (tmp_path / "l.png").read_bytes()
    assert data[24] == 2  # IHDR bit depth
    assert decode_unfiltered_label(data) is None
    np.testing.assert_array_equal(read_label_ids(tmp_path / "l.png"), ids)


def test_colour_and_16_bit_pngs_decline():
    rgb = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(rgb, format="PNG")
    grey16 = cv2.imencode(".png", np.zeros((8, 8), np.uint16))[1].tobytes()
    assert decode_unfiltered_label(rgb.getvalue()) is None
    assert decode_unfiltered_label(grey16) is None
    assert decode_unfiltered_label(b"not a png at all") is None


# damage → whether Pillow then refuses the file (one line) or still reads every row of it
DAMAGES = {"truncated": "refused", "idat_byte_flipped": "refused", "bad_stream_good_crc": "read", "no_iend": "read"}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_labels_decline_to_the_full_decoder(tmp_path, damage):
    ids = _blocky_ids(seed=5)
    write_png_atomic(tmp_path / "l.png", ids, palette=ID_PALETTE)
    data = (tmp_path / "l.png").read_bytes()
    chunks = _chunks(data)
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    elif damage == "idat_byte_flipped":  # the chunk's CRC no longer matches
        at = data.index(b"IDAT") + 20
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
    elif damage == "bad_stream_good_crc":  # the CRC matches the damaged bytes; the deflate stream's end does not
        kind, payload = next(c for c in chunks if c[0] == b"IDAT")
        bad = payload[:-5] + bytes([payload[-5] ^ 0xFF]) + payload[-4:]
        data = _png([c if c[0] != b"IDAT" else (kind, bad) for c in chunks])
    else:
        data = _png([c for c in chunks if c[0] != b"IEND"])
    assert decode_unfiltered_label(data) is None
    (tmp_path / "l.png").write_bytes(data)
    if DAMAGES[damage] == "refused":
        with pytest.raises(SSRError, match=r"l\.png: truncated or corrupt PNG") as info:
            read_label_ids(tmp_path / "l.png")
        assert "\n" not in str(info.value)
    else:  # Pillow reads every row before it reaches the damage
        np.testing.assert_array_equal(read_label_ids(tmp_path / "l.png"), ids)


def test_pillow_size_limit_is_followed_and_may_be_off(tmp_path, monkeypatch):
    ids = _blocky_ids(seed=6)
    write_png_atomic(tmp_path / "l.png", ids, palette=ID_PALETTE)
    data = (tmp_path / "l.png").read_bytes()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", ids.size - 1)  # a bomb by Pillow's rule: Pillow decides
    assert decode_unfiltered_label(data) is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's documented "no limit"
    np.testing.assert_array_equal(decode_unfiltered_label(data), ids)


def _palette_chunks(seed: int = 7) -> tuple[np.ndarray, list[tuple[bytes, bytes]]]:
    ids = _blocky_ids(seed=seed)
    data = io.BytesIO()
    image = Image.fromarray(ids)
    image.putpalette(ID_PALETTE.ravel().tolist())
    image.save(data, format="PNG")
    return ids, _chunks(data.getvalue())


def test_benign_chunks_keep_the_fast_path():
    ids, chunks = _palette_chunks()
    at = next(i for i, c in enumerate(chunks) if c[0] == b"IDAT")
    extra = [(b"pHYs", struct.pack(">IIB", 2835, 2835, 1)), (b"tEXt", b"Software\0test")]
    data = _png(chunks[:at] + extra + chunks[at:-1] + [(b"tEXt", b"Comment\0after")] + chunks[-1:])
    np.testing.assert_array_equal(_pillow_values(data), ids)
    np.testing.assert_array_equal(decode_unfiltered_label(data), ids)


# Files the fast path must leave to Pillow: each is malformed or unusual in a way that Pillow reads differently
# (a second IHDR wins there; IDAT split by another chunk is truncated there) or refuses.
def _second_ihdr(chunks):
    ihdr = chunks[0][1]
    return chunks[:1] + [(b"IHDR", struct.pack(">II", 1, 2) + ihdr[8:])] + chunks[1:]


def _split_idat(chunks):
    at = next(i for i, c in enumerate(chunks) if c[0] == b"IDAT")
    payload = chunks[at][1]
    return chunks[:at] + [(b"IDAT", payload[:10]), (b"tEXt", b"a\0b"), (b"IDAT", payload[10:])] + chunks[at + 1:]


ODD_FILES = {
    "second IHDR": _second_ihdr,
    "IDAT split by another chunk": _split_idat,
    "IHDR of 12 bytes": lambda c: [(b"IHDR", c[0][1][:12])] + c[1:],
    "unknown chunk": lambda c: c[:1] + [(b"zzZz", b"x")] + c[1:],
    "chunk type not letters": lambda c: c[:1] + [(b"a1@!", b"x")] + c[1:],
    "palette of 300 entries": lambda c: [c[0], (b"PLTE", bytes(900))] + [x for x in c[1:] if x[0] != b"PLTE"],
}


@pytest.mark.parametrize("odd", ODD_FILES)
def test_odd_files_decline_to_pillow(odd, tmp_path):
    _, chunks = _palette_chunks()
    data = _png(ODD_FILES[odd](chunks))
    assert decode_unfiltered_label(data) is None
    (tmp_path / "l.png").write_bytes(data)
    try:
        values = read_label_ids(tmp_path / "l.png")
    except SSRError as exc:  # Pillow refuses it: one line naming the file
        assert "l.png" in str(exc) and "\n" not in str(exc)
    else:  # Pillow reads it: what read_label_ids returns is Pillow's reading
        np.testing.assert_array_equal(values, _pillow_values(data))


def test_a_header_with_a_wrong_checksum_declines(tmp_path):
    # Colour type 3 -> 0 with the old CRC: read as greyscale the values would be the same, only the CRC tells.
    _, chunks = _palette_chunks()
    data = bytearray(_png(chunks))
    assert data[25] == 3  # IHDR colour type
    data[25] = 0
    assert decode_unfiltered_label(bytes(data)) is None
    (tmp_path / "l.png").write_bytes(data)
    with pytest.raises(SSRError, match=r"l\.png: not a readable image") as info:  # Pillow checks it too
        read_label_ids(tmp_path / "l.png")
    assert "\n" not in str(info.value)


def test_a_label_that_is_not_a_png_is_one_line(tmp_path):  # only its first 8 bytes are read here
    (tmp_path / "l.png").write_bytes(b"GIF89a" + bytes(1 << 20))
    with pytest.raises(SSRError, match=r"l\.png"):
        read_label_ids(tmp_path / "l.png")
