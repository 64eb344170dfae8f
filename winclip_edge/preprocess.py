"""Pre-processing (docs/method.md §1), OpenCV only, shared by the runtime, the export verification
and the evaluation so that every path scores the same tensor.

Decode -> RGB uint8 -> resize the *whole* frame to the model input (no centre crop: the map must cover
every pixel). Normalisation is inside the graph (contract.py).

Conversions (documented in docs/reliability.md): EXIF orientation is applied; grayscale is replicated to
RGB; 16-bit images keep their high byte; an alpha channel is dropped (the colour channels are kept as
stored); palette images are expanded to RGB; CMYK JPEGs are converted by OpenCV (no ICC colour
management); a multi-frame file gives its first frame.

Refused before decoding, from the header alone (an inspection line must not run out of memory or score
half a picture): files over ``MAX_FILE_BYTES``, truncated PNG/JPEG files (no end marker: OpenCV 4.x
would decode the missing part as grey), and images over ``MAX_DECODE_PIXELS`` -- except sequential
JPEGs, which libjpeg decodes at 1/2, 1/4 or 1/8 scale without a full-size buffer (the model sees
~240 px anyway; the map is then at the decoded size).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import WinclipError

# cv2.INTER_AREA averages the source pixels (anti-aliased) when shrinking; bilinear when enlarging.
SHRINK_INTERPOLATION = cv2.INTER_AREA
ENLARGE_INTERPOLATION = cv2.INTER_LINEAR

MAX_FILE_BYTES = 1 << 30  # 1 GiB: a larger file is refused before it is read
MAX_DECODE_PIXELS = 1 << 26  # 67.1 MP (8192 x 8192, 201 MB as RGB uint8): the largest full-size decode
REDUCED_DECODE = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND"
PNG_TAIL_BYTES = 4096  # the IEND chunk must lie this close to the end (slack for bytes some tools append)
JPEG_SIGNATURE = b"\xff\xd8\xff"
JPEG_SOS, JPEG_EOI = b"\xff\xda", b"\xff\xd9"  # start of scan, end of image
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (C4/C8/CC are DHT/JPG/DAC)
JPEG_SEQUENTIAL = frozenset({0xC0, 0xC1})  # baseline/extended Huffman: streamed, so libjpeg can decode reduced
JPEG_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn markers carry no length field
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*")
TIFF_WIDTH, TIFF_LENGTH, TIFF_SHORT = 256, 257, 3  # tag ids, SHORT field type
WEBP_SIZE_BITS = 14  # width and height fields of the VP8 / VP8L headers
WEBP_SIZE_MASK = (1 << WEBP_SIZE_BITS) - 1
END_MARKERS = {"PNG": "IEND chunk", "JPEG": "end-of-image marker 0xFFD9 after the last scan"}


# File types a folder input is searched for (infer, register, calibrate, eval), compared lower-case.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


class ImageError(WinclipError, ValueError):
    """An input cannot be turned into an RGB image; the message names the file and the reason."""


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, read without decoding the pixels."""

    format: str  # PNG | JPEG | BMP | TIFF | WebP
    height: int  # as stored (before EXIF orientation)
    width: int
    truncated: bool = False  # the format's end marker is missing (PNG, JPEG only)
    reducible: bool = False  # sequential JPEG: decodable at 1/2, 1/4, 1/8 with memory for the reduced size only


def _png_header(data: bytes) -> ImageHeader | None:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return ImageHeader("PNG", height, width, truncated=PNG_END not in data[-PNG_TAIL_BYTES:])


def _jpeg_header(data: bytes) -> ImageHeader | None:
    i = 2
    while i + 4 <= len(data):  # walk the marker segments up to the frame header
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in JPEG_NO_LENGTH:
            i += 2
        elif marker in JPEG_SOF:
            if i + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            # Entropy-coded data never holds 0xFF 0xD9 (0xFF is stuffed): no EOI after the last scan = cut short.
            truncated = data.rfind(JPEG_EOI) < data.rfind(JPEG_SOS)
            return ImageHeader("JPEG", height, width, truncated=truncated, reducible=marker in JPEG_SEQUENTIAL)
        else:
            i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


def _bmp_header(data: bytes) -> ImageHeader | None:
    if len(data) < 26:
        return None
    if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height = struct.unpack("<HH", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])  # negative height = top-down rows
    return ImageHeader("BMP", abs(height), width)


def _tiff_header(data: bytes) -> ImageHeader | None:
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", data[4:8])[0] if len(data) >= 8 else len(data)
    if ifd + 2 > len(data):
        return None
    count = struct.unpack(order + "H", data[ifd:ifd + 2])[0]
    size = {}
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(data) - 11), 12):  # 12-byte IFD entries
        tag, kind = struct.unpack(order + "HH", data[entry:entry + 4])
        if tag in (TIFF_WIDTH, TIFF_LENGTH):
            size[tag] = struct.unpack(order + ("H" if kind == TIFF_SHORT else "I"),
                                      data[entry + 8:entry + (10 if kind == TIFF_SHORT else 12)])[0]
    return ImageHeader("TIFF", size[TIFF_LENGTH], size[TIFF_WIDTH]) if len(size) == 2 else None


def _webp_header(data: bytes) -> ImageHeader | None:
    kind = data[12:16]
    if kind == b"VP8 " and len(data) >= 30:  # lossy: 14-bit sizes after the key-frame start code
        width, height = struct.unpack("<HH", data[26:30])
        return ImageHeader("WebP", height & WEBP_SIZE_MASK, width & WEBP_SIZE_MASK)
    if kind == b"VP8L" and len(data) >= 25:  # lossless: 14-bit (size - 1) fields
        bits = int.from_bytes(data[21:25], "little")
        return ImageHeader("WebP", (bits >> WEBP_SIZE_BITS & WEBP_SIZE_MASK) + 1, (bits & WEBP_SIZE_MASK) + 1)
    if kind == b"VP8X" and len(data) >= 30:  # extended: 24-bit (size - 1) fields
        return ImageHeader("WebP", int.from_bytes(data[27:30], "little") + 1, int.from_bytes(data[24:27], "little") + 1)
    return None


def sniff_format(data: bytes) -> str | None:
    """The image format named by the first bytes, or None."""
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data.startswith(JPEG_SIGNATURE):
        return "JPEG"
    if data.startswith(b"BM"):
        return "BMP"
    if data.startswith(TIFF_SIGNATURES):
        return "TIFF"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WebP"
    return None


_HEADER_READERS = {"PNG": _png_header, "JPEG": _jpeg_header, "BMP": _bmp_header, "TIFF": _tiff_header,
                   "WebP": _webp_header}


def read_header(data: bytes) -> ImageHeader | None:
    """Size and completeness of a PNG, JPEG, BMP, TIFF or WebP file from its bytes; None for other formats
    and damaged headers."""
    fmt = sniff_format(data)
    return None if fmt is None else _HEADER_READERS[fmt](data)


def decode_flags(header: ImageHeader, name: str = "image") -> int:
    """The cv2.imdecode flags for this header, or ImageError when the file must not be decoded."""
    h, w = header.height, header.width
    if header.truncated:
        raise ImageError(f"{name}: truncated {header.format} (no {END_MARKERS[header.format]}): the file is "
                         "incomplete -- partly copied or still being written; copy it again")
    if h < 1 or w < 1:
        raise ImageError(f"{name}: {header.format} header says {w}x{h} pixels: no image; re-save the file")
    if h * w <= MAX_DECODE_PIXELS:
        return cv2.IMREAD_COLOR
    if header.reducible:
        for factor, flags in REDUCED_DECODE.items():
            if -(-h // factor) * -(-w // factor) <= MAX_DECODE_PIXELS:
                return flags
    hint = (f"sequential JPEGs up to {MAX_DECODE_PIXELS * 64 / 1e6:.0f} MP are decoded at reduced size"
            if header.format == "JPEG" else "or save it as a baseline JPEG, which is decoded at reduced size")
    raise ImageError(f"{name}: {w}x{h} pixels ({h * w / 1e6:.0f} MP) is over the decode limit of "
                     f"{MAX_DECODE_PIXELS / 1e6:.1f} MP; the model sees only its input size (e.g. 240x240 px): "
                     f"downscale the image first ({hint})")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode a file into RGB uint8 ``[H, W, 3]`` with its EXIF orientation applied.

    Memory is bounded by ``MAX_FILE_BYTES`` plus ``MAX_DECODE_PIXELS`` (see the module docstring)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ImageError(f"{path}: {size / 2**20:.0f} MiB is over the file size limit of "
                             f"{MAX_FILE_BYTES / 2**20:.0f} MiB; downscale or compress the image")
        data = path.read_bytes()  # bytes + imdecode (not cv2.imread): non-ASCII paths work everywhere
    except OSError as err:
        raise ImageError(f"{path}: cannot read ({err.strerror or err})") from None
    return decode_image_bytes(data, str(path))


def decode_image_bytes(data: bytes, name: str) -> np.ndarray:
    """Decode the bytes of an image file (read from disk or uploaded) into RGB uint8 ``[H, W, 3]``, with the checks
    and conversions of :func:`read_image`; ``name`` (a path or an upload's name) starts the error messages."""
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    fmt = sniff_format(data)
    header = read_header(data)
    if fmt is not None and header is None:
        raise ImageError(f"{name}: damaged {fmt} header (its size cannot be read); copy the file again or re-save it")
    flags = cv2.IMREAD_COLOR if header is None else decode_flags(header, name)
    try:  # IMREAD_COLOR: applies EXIF orientation; 16-bit -> 8-bit; gray -> 3 channels; alpha dropped
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as err:
        raise ImageError(f"{name}: OpenCV cannot decode it ({str(err).strip().splitlines()[-1]})") from None
    if image is None:
        if fmt is None:
            raise ImageError(f"{name}: not an image: its content is no format OpenCV reads (starts with {data[:8]!r}); "
                             f"check what the file really is (its name says {Path(name).suffix or 'no extension'!r})")
        raise ImageError(f"{name}: damaged {fmt} (the header reads {header.width}x{header.height} but the pixel data "
                         "does not decode); copy the file again or re-save it")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def as_rgb(image: np.ndarray, name: str = "array") -> np.ndarray:
    """Validate an in-memory uint8 image and return RGB uint8 ``[H, W, 3]``.

    Accepted: RGB ``[H, W, 3]``, gray ``[H, W]`` or ``[H, W, 1]`` (replicated), RGBA ``[H, W, 4]`` (alpha
    dropped, like a file)."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageError(f"{name}: expected dtype uint8, got {image.dtype}; convert it (e.g. 16-bit: image >> 8)")
    if image.ndim == 3 and image.shape[2] in (1, 4):
        image = image[:, :, 0] if image.shape[2] == 1 else np.ascontiguousarray(image[:, :, :3])
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageError(f"{name}: expected an RGB image [H, W, 3], got shape {image.shape}")
    return image


def resize_to_model(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Whole-frame resize of RGB uint8 ``[H, W, 3]`` to the model input ``size = (H, W)``."""
    h, w = size
    if image.shape[:2] == (h, w):
        return np.ascontiguousarray(image)
    shrinking = image.shape[0] * image.shape[1] >= h * w
    interpolation = SHRINK_INTERPOLATION if shrinking else ENLARGE_INTERPOLATION
    return cv2.resize(image, (w, h), interpolation=interpolation)  # cv2 takes (width, height)
