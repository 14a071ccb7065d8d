"""Reading and writing dataset image and label files; every failure is one SSRError line naming the file.

Images may be PNG, JPEG or WebP (a user's own folder); labels are always PNG. SYNTHIA's labels are 16-bit
multi-channel PNGs that PIL reads as 8-bit (wrong values), so they are decoded with OpenCV, as are 8-bit RGB
PNG images (faster than PIL).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import get_worker_info

from ssr_cache.atomic_file import write_atomic
from ssr_cache.data.opencv import cv2
from ssr_cache.data.png_unfiltered import PNG_SIGNATURE, decode_unfiltered_label
from ssr_cache.errors import SSRError

# What PIL raises for missing, non-image, truncated or corrupt files ("broken PNG file" is a SyntaxError).
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_LABEL_MODES = ("P", "L")


IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


def _open_png(path: Path, formats: tuple[str, ...] = ("PNG",)) -> Image.Image:
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise SSRError(f"{path}: file not found") from None
    except _READ_ERRORS as exc:
        raise SSRError(f"{path}: not a readable image ({exc})") from None
    if image.format not in formats:
        image.close()
        raise SSRError(f"{path}: expected a {' or '.join(formats)} file, found {image.format}")
    return image


def _load_fully(path: Path, image: Image.Image) -> None:
    # Image.open reads only the header; load() decodes every row, so a truncated file fails here.
    try:
        image.load()
    except _READ_ERRORS as exc:
        raise SSRError(f"{path}: truncated or corrupt PNG ({exc})") from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(W, H) of an image (PNG, JPEG, WebP), from its header only."""
    path = Path(path)
    with _open_png(path, IMAGE_FORMATS) as image:
        return image.size


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """The image (PNG, JPEG, WebP) as uint8 (H, W, 3).

    8-bit RGB(A) PNGs, what every supported dataset ships, decode with OpenCV: ~35 % less CPU than PIL
    plus its copy into numpy, and lossless, so the pixels are the same (tests compare them). Everything else
    (JPEG, WebP, palette, greyscale, 16-bit) goes through PIL, whose decoders define those pixels here.
    """
    path = Path(path)
    with _open_png(path, IMAGE_FORMATS) as image:
        if image.format == "PNG" and image.mode in ("RGB", "RGBA"):
            return _read_rgb_png_cv2(path)
        _load_fully(path, image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.array(image, dtype=np.uint8)


def _read_rgb_png_cv2(path: Path) -> np.ndarray:
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as exc:
        raise SSRError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if get_worker_info() is None:
        rgb, reason = cv2.imdecode(data, cv2.IMREAD_COLOR_RGB), "OpenCV could not decode it"
    else:
        rgb, reason = _imdecode_capturing_libpng(data)
    if rgb is None:
        raise SSRError(f"{path}: truncated or corrupt PNG ({reason})")
    return rgb


def _imdecode_capturing_libpng(data: np.ndarray) -> tuple[np.ndarray | None, str]:
    """cv2.imdecode (drops alpha, as PIL's convert("RGB") does) with what libpng prints on stderr before it
    gives up ("libpng error: IDAT: incorrect data check") captured into the reason, so a corrupt frame stays
    one line. Only in a DataLoader worker: fd 2 is process-wide, and there this is the one working thread."""
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            rgb = cv2.imdecode(data, cv2.IMREAD_COLOR_RGB)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if rgb is not None:
            return rgb, ""
        captured.seek(0)
        said = " ".join(captured.read().decode(errors="replace").split())
    return None, said or "OpenCV could not decode it"


def read_label_ids(path: str | os.PathLike) -> np.ndarray:
    """The raw values of a label PNG as uint8 (H, W), read-only: palette indices (GTA5) or greyscale values
    (Cityscapes). Unfiltered 8-bit files (every GTA5 label) take libdeflate's fast path, any other the full
    decoder. Read-only because it is a view of the decoded bytes (libdeflate's or Pillow's): a copy would cost
    0.8 ms for a GTA5 label, and every caller maps the raw values to a new array or copies them."""
    path = Path(path)
    with contextlib.suppress(OSError), open(path, "rb") as handle:  # unreadable: worded by Pillow below
        head = handle.read(len(PNG_SIGNATURE))
        ids = decode_unfiltered_label(head + handle.read()) if head == PNG_SIGNATURE else None
        if ids is not None:
            return ids
    return read_label_ids_with_pillow(path)


def read_label_ids_with_pillow(path: str | os.PathLike) -> np.ndarray:
    """`read_label_ids` by Pillow's full decode, for any label PNG (and the benchmark's side of the fast path)."""
    path = Path(path)
    with _open_png(path) as image:
        if image.mode not in _LABEL_MODES:
            hint = ", not a colour rendering" if image.mode in ("RGB", "RGBA") else ""
            raise SSRError(
                f"{path}: label PNG has mode {image.mode}; expected a palette (P) or greyscale (L) image of "
                f"label ids{hint}"
            )
        _load_fully(path, image)
        return np.asarray(image)


def read_label_16bit_red(path: str | os.PathLike) -> np.ndarray:
    """The first (R) channel of a 16-bit multi-channel label PNG (SYNTHIA: class id in R, instance id in G),
    as uint16 (H, W). An 8-bit file is refused: it is not what SYNTHIA ships, and its values would be wrong."""
    path = Path(path)
    with _open_png(path):  # one clear line for missing / non-PNG files before OpenCV sees them
        pass
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise SSRError(f"{path}: truncated or corrupt PNG (OpenCV cannot decode it)")
    if array.dtype != np.uint16:
        raise SSRError(f"{path}: SYNTHIA label is {array.dtype.itemsize * 8}-bit; expected the 16-bit "
                       "multi-channel PNG of the download (class id in the R channel), or *_labelTrainIds.png")
    if array.ndim == 2:
        return array
    return array[..., 2]  # OpenCV orders channels B, G, R(, A): R, the class id, is index 2


def write_label_16bit(path: str | os.PathLike, class_ids: np.ndarray, instance_ids: np.ndarray) -> None:
    """Write a 16-bit RGB label PNG as SYNTHIA does: class id in R, instance id in G, B zero."""
    path = Path(path)
    bgr = np.zeros((*class_ids.shape, 3), np.uint16)
    bgr[..., 2], bgr[..., 1] = class_ids, instance_ids

    def save(handle) -> None:
        ok, data = cv2.imencode(".png", bgr)
        if not ok:
            raise OSError(f"OpenCV could not encode {path}")
        handle.write(data.tobytes())

    write_atomic(path, save)


def write_jpeg_atomic(path: str | os.PathLike, array: np.ndarray, quality: int = 95) -> None:
    """Write uint8 (H, W, 3) as a JPEG (temp file + rename)."""
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    write_atomic(Path(path), lambda handle: image.save(handle, format="JPEG", quality=quality))


def write_png_atomic(path: str | os.PathLike, array: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write uint8 (H, W, 3) as RGB, or (H, W) as greyscale — palette mode when `palette` ((N, 3)) is given.

    The file is written next to its destination and renamed into place, so a reader never sees half a file
    and an existing file survives a failed write.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_png_atomic expects uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 3 and palette is None:
        image = Image.fromarray(np.ascontiguousarray(array))
    elif array.ndim == 2:
        image = Image.fromarray(np.ascontiguousarray(array))  # mode L
        if palette is not None:
            colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
            if len(colours) > 256:
                raise ValueError(f"a PNG palette holds at most 256 colours, got {len(colours)}")
            image.putpalette(colours.ravel().tolist())  # L → P, the values become palette indices
    else:
        raise ValueError(f"write_png_atomic expects (H, W, 3) or (H, W), got shape {array.shape}")

    write_atomic(path, lambda handle: image.save(handle, format="PNG"))
