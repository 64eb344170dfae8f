"""GenICam pixel formats -> RGB uint8, the frame the Inspector scores (pure numpy + OpenCV, no camera library).

A camera buffer is raw bytes plus a PFNC pixel-format code (``buffer.get_image_pixel_format()``). Deeper than 8
bits keeps the top 8 bits (``value >> (bits - 8)``: the same frame a camera set to Mono8 would send, without
rounding). Bayer mosaics are demosaiced by OpenCV's bilinear demosaicing. Two 10/12-bit packings exist and differ:

- GigE Vision 1.x/2.0 ``Mono10Packed`` / ``Mono12Packed`` (codes 0x010C0004 / 0x010C0006): 2 pixels in 3 bytes,
  byte 0 and byte 2 hold the high bits of pixel 0 and pixel 1, byte 1 the low bits of both (pixel 0 in its low
  nibble, pixel 1 in its high nibble). Older GigE cameras (Basler ace GigE, FLIR Blackfly/Blackfly S GigE).
- PFNC ``Mono10p`` / ``Mono12p`` (codes 0x010A0046 / 0x010C0047): one little-endian bit stream, pixel 0 in the
  lowest bits (4 pixels in 5 bytes for 10 bits, 2 in 3 for 12). USB3 Vision and newer GigE cameras.

A row ends where the camera says: ``x_padding`` bytes after each row (``buffer.get_image_padding()``); without
padding a packed stream runs on across rows (PFNC), as a row of an odd width does not end on a byte.
"""
from __future__ import annotations

import cv2
import numpy as np

from ..errors import WinclipError


class PixelFormatError(WinclipError, ValueError):
    """A pixel format this module does not convert, or a buffer too short for its image."""


# PFNC codes (GenICam Pixel Format Naming Convention 2.x; the GigE Vision "Packed" ones from the GigE Vision spec).
PIXEL_FORMATS: dict[str, int] = {
    "Mono8": 0x01080001,
    "Mono10": 0x01100003,
    "Mono12": 0x01100005,
    "Mono16": 0x01100007,
    "Mono10Packed": 0x010C0004,
    "Mono12Packed": 0x010C0006,
    "Mono10p": 0x010A0046,
    "Mono12p": 0x010C0047,
    "BayerGR8": 0x01080008,
    "BayerRG8": 0x01080009,
    "BayerGB8": 0x0108000A,
    "BayerBG8": 0x0108000B,
    "RGB8": 0x02180014,
    "BGR8": 0x02180015,
}
FORMAT_NAMES: dict[int, str] = {code: name for name, code in PIXEL_FORMATS.items()}
SUPPORTED = tuple(PIXEL_FORMATS)

# Unpacked mono deeper than 8 bits: one little-endian uint16 per pixel, value in the low bits.
_MONO16 = {"Mono10": 10, "Mono12": 12, "Mono16": 16}
# name -> (bits, bytes per group, pixels per group)
_PACKED = {"Mono10Packed": (10, 3, 2), "Mono12Packed": (12, 3, 2), "Mono10p": (10, 5, 4), "Mono12p": (12, 3, 2)}
# GenICam names a mosaic by its first row (BayerRG: R G / G B); OpenCV's legacy names count from the second pixel
# of the second row, so GenICam RG is OpenCV's BG (cv2.COLOR_BayerRGGB2RGB == cv2.COLOR_BayerBG2RGB where both exist).
_BAYER = {"BayerRG8": cv2.COLOR_BayerBG2RGB, "BayerGR8": cv2.COLOR_BayerGB2RGB,
          "BayerGB8": cv2.COLOR_BayerGR2RGB, "BayerBG8": cv2.COLOR_BayerRG2RGB}


def format_name(pixel_format: int | str) -> str:
    """The PFNC name of a code (or a name), refused with the list of what is converted."""
    name = FORMAT_NAMES.get(pixel_format) if isinstance(pixel_format, int) else pixel_format
    if name not in PIXEL_FORMATS:
        shown = f"0x{pixel_format:08X}" if isinstance(pixel_format, int) else repr(pixel_format)
        raise PixelFormatError(f"pixel format {shown} is not converted; set PixelFormat to one of {', '.join(SUPPORTED)}")
    return name


def bits_per_pixel(pixel_format: int | str) -> int:
    """Bits one pixel takes in the buffer (PFNC codes carry it in bits 16-23)."""
    return (PIXEL_FORMATS[format_name(pixel_format)] >> 16) & 0xFF


def row_bytes(pixel_format: int | str, width: int) -> int:
    """Bytes of one row without padding (a packed row of odd width rounds up)."""
    return -(-width * bits_per_pixel(pixel_format) // 8)


def unpack(raw: np.ndarray, pixel_format: str, count: int) -> np.ndarray:
    """The first ``count`` pixels of a packed stream ``raw`` (uint8) as uint16 values of the format's depth."""
    _, group, per = _PACKED[pixel_format]
    groups = -(-count // per)
    need = groups * group
    if raw.size < need:
        raw = np.concatenate([raw, np.zeros(need - raw.size, np.uint8)])  # a last, partial group
    g = raw[:need].reshape(groups, group).astype(np.uint16)
    if pixel_format == "Mono12p":
        px = (g[:, 0] | (g[:, 1] & 0x0F) << 8, g[:, 1] >> 4 | g[:, 2] << 4)
    elif pixel_format == "Mono12Packed":
        px = (g[:, 0] << 4 | (g[:, 1] & 0x0F), g[:, 2] << 4 | g[:, 1] >> 4)
    elif pixel_format == "Mono10Packed":
        px = (g[:, 0] << 2 | (g[:, 1] & 0x03), g[:, 2] << 2 | (g[:, 1] >> 4 & 0x03))
    else:  # Mono10p
        px = (g[:, 0] | (g[:, 1] & 0x03) << 8, g[:, 1] >> 2 | (g[:, 2] & 0x0F) << 6,
              g[:, 2] >> 4 | (g[:, 3] & 0x3F) << 4, g[:, 3] >> 6 | g[:, 4] << 2)
    return np.stack(px, axis=1).reshape(-1)[:count]


def _rows(raw: np.ndarray, height: int, line: int, x_padding: int, name: str) -> np.ndarray:
    """``[height, line]`` bytes of the image, padding dropped; refused when the buffer is short."""
    stride = line + x_padding
    need = stride * height - x_padding  # the last row's padding may be missing
    if raw.size < need:
        raise PixelFormatError(f"{name} {height} rows of {line} bytes need {need} bytes, the buffer has {raw.size}")
    if x_padding == 0:
        return raw[:line * height].reshape(height, line)
    padded = np.zeros(stride * height, np.uint8)
    padded[:min(raw.size, padded.size)] = raw[:padded.size]
    return padded.reshape(height, stride)[:, :line]


def to_rgb(data: bytes | bytearray | memoryview | np.ndarray, width: int, height: int, pixel_format: int | str,
           x_padding: int = 0) -> np.ndarray:
    """``[height, width, 3]`` RGB uint8 of one camera image (a new array: the buffer can be reused at once)."""
    name = format_name(pixel_format)
    if width < 1 or height < 1:
        raise PixelFormatError(f"an image of {width}x{height} pixels has nothing to convert")
    raw = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    if name in _PACKED:
        bits = _PACKED[name][0]
        if x_padding:
            line = row_bytes(name, width)
            rows = _rows(raw, height, line, x_padding, name)
            values = np.stack([unpack(row, name, width) for row in rows])
        else:
            if raw.size < row_bytes(name, width * height):
                raise PixelFormatError(f"{name} {width}x{height} needs {row_bytes(name, width * height)} bytes, "
                                       f"the buffer has {raw.size}")
            values = unpack(raw, name, width * height).reshape(height, width)
        return _gray_to_rgb((values >> (bits - 8)).astype(np.uint8))
    if name in _MONO16:
        rows = _rows(raw, height, 2 * width, x_padding, name)
        values = np.ascontiguousarray(rows).view("<u2").reshape(height, width)
        return _gray_to_rgb((values >> (_MONO16[name] - 8)).astype(np.uint8))
    if name in ("RGB8", "BGR8"):
        image = _rows(raw, height, 3 * width, x_padding, name).reshape(height, width, 3)
        return (image if name == "RGB8" else image[:, :, ::-1]).copy()
    gray = np.ascontiguousarray(_rows(raw, height, width, x_padding, name))
    if name in _BAYER:
        return cv2.cvtColor(gray, _BAYER[name])
    return _gray_to_rgb(gray)  # Mono8


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)
