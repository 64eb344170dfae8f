"""Camera pixel formats -> RGB (winclip_edge/line/pixels.py) against reference conversions written here from the
format definitions: a bit-by-bit packer per packing, byte examples worked out by hand, and a Bayer mosaic made from
a known RGB image."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from winclip_edge.line.pixels import PIXEL_FORMATS, PixelFormatError, bits_per_pixel, to_rgb, unpack


def pack_pfnc(values, bits: int) -> bytes:
    """PFNC ``MonoNp``: one bit stream, pixel 0 in the lowest bits, bytes little-endian."""
    stream = 0
    for i, v in enumerate(values):
        stream |= int(v) << (i * bits)
    return stream.to_bytes(-(-len(values) * bits // 8), "little")


def pack_gev(values, bits: int) -> bytes:
    """GigE Vision ``MonoNPacked``: per pair, byte 0 = high bits of pixel 0, byte 2 = high bits of pixel 1,
    byte 1 = the low bits of pixel 0 from bit 0 and those of pixel 1 from bit 4."""
    low = bits - 8
    values = list(values) + [0] * (len(values) % 2)
    out = bytearray()
    for a, b in zip(values[0::2], values[1::2]):
        out += bytes([a >> low, (a & ((1 << low) - 1)) | (b & ((1 << low) - 1)) << 4, b >> low])
    return bytes(out)


def expected_gray(values: np.ndarray, bits: int) -> np.ndarray:
    top = (values.astype(np.int64) >> (bits - 8)).astype(np.uint8)
    return np.stack([top] * 3, axis=-1)


def test_hand_worked_bytes_of_each_packing():
    # Mono12Packed: 0xABC, 0x123 -> AB, (C | 3 << 4), 12
    assert pack_gev([0xABC, 0x123], 12) == bytes([0xAB, 0x3C, 0x12])
    # Mono12p: 0xABC, 0x123 -> BC, (A | 3 << 4), 12
    assert pack_pfnc([0xABC, 0x123], 12) == bytes([0xBC, 0x3A, 0x12])
    # Mono10Packed: 0x2AB, 0x155 -> 0xAA, (3 | 1 << 4), 0x55
    assert pack_gev([0x2AB, 0x155], 10) == bytes([0xAA, 0x13, 0x55])
    # Mono10p: 0x3FF, 0x000, 0x2AA, 0x155 -> FF 03 A0 6A 55
    assert pack_pfnc([0x3FF, 0x000, 0x2AA, 0x155], 10) == bytes([0xFF, 0x03, 0xA0, 0x6A, 0x55])
    for name, raw, want in (("Mono12Packed", [0xAB, 0x3C, 0x12], [0xABC, 0x123]),
                            ("Mono12p", [0xBC, 0x3A, 0x12], [0xABC, 0x123]),
                            ("Mono10Packed", [0xAA, 0x13, 0x55], [0x2AB, 0x155]),
                            ("Mono10p", [0xFF, 0x03, 0xA0, 0x6A, 0x55], [0x3FF, 0x000, 0x2AA, 0x155])):
        assert unpack(np.array(raw, np.uint8), name, len(want)).tolist() == want, name


@pytest.mark.parametrize("name,bits,pack", [("Mono12Packed", 12, pack_gev), ("Mono10Packed", 10, pack_gev),
                                            ("Mono12p", 12, pack_pfnc), ("Mono10p", 10, pack_pfnc)])
@pytest.mark.parametrize("width,height", [(16, 6), (7, 5), (1, 1), (13, 3)])
def test_packed_mono_equals_the_reference_packer(name, bits, pack, width, height):
    values = np.random.default_rng(width * height + bits).integers(0, 1 << bits, size=(height, width))
    rgb = to_rgb(pack(values.reshape(-1).tolist(), bits), width, height, name)
    assert rgb.dtype == np.uint8 and rgb.shape == (height, width, 3)
    assert np.array_equal(rgb, expected_gray(values, bits))


def test_the_two_12_bit_packings_are_not_interchangeable():
    values = np.arange(64, dtype=np.int64).reshape(8, 8) * 61 % 4096
    raw = pack_gev(values.reshape(-1).tolist(), 12)
    assert np.array_equal(to_rgb(raw, 8, 8, "Mono12Packed"), expected_gray(values, 12))
    assert not np.array_equal(to_rgb(raw, 8, 8, "Mono12p"), expected_gray(values, 12))


@pytest.mark.parametrize("name,bits", [("Mono10", 10), ("Mono12", 12), ("Mono16", 16)])
def test_unpacked_mono_is_little_endian_low_bits(name, bits):
    values = np.random.default_rng(bits).integers(0, 1 << bits, size=(5, 9))
    raw = b"".join(int(v).to_bytes(2, "little") for v in values.reshape(-1))
    assert np.array_equal(to_rgb(raw, 9, 5, name), expected_gray(values, bits))
    assert np.array_equal(to_rgb(raw, 9, 5, PIXEL_FORMATS[name]), expected_gray(values, bits))  # by code


def test_mono8_rgb8_bgr8():
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, size=(4, 6), dtype=np.uint8)
    assert np.array_equal(to_rgb(gray.tobytes(), 6, 4, "Mono8"), np.stack([gray] * 3, axis=-1))
    rgb = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    assert np.array_equal(to_rgb(rgb.tobytes(), 6, 4, "RGB8"), rgb)
    assert np.array_equal(to_rgb(rgb[:, :, ::-1].copy().tobytes(), 6, 4, "BGR8"), rgb)
    out = to_rgb(rgb.tobytes(), 6, 4, "RGB8")
    out[0, 0] = 1  # a new, writable array: the camera buffer goes back to the stream at once


def mosaic(rgb: np.ndarray, pattern: str) -> tuple[np.ndarray, np.ndarray]:
    """The raw mosaic a sensor with ``pattern`` (first row's two colours, then the second row's) records of
    ``rgb``, and the channel index each pixel measured."""
    channel = {"R": 0, "G": 1, "B": 2}
    layout = np.array([[channel[pattern[0]], channel[pattern[1]]], [channel[pattern[2]], channel[pattern[3]]]])
    h, w, _ = rgb.shape
    which = np.tile(layout, (h // 2, w // 2))
    return np.take_along_axis(rgb, which[:, :, None], axis=2)[:, :, 0], which


@pytest.mark.parametrize("name,pattern", [("BayerRG8", "RGGB"), ("BayerGR8", "GRBG"), ("BayerGB8", "GBRG"),
                                          ("BayerBG8", "BGGR")])
def test_bayer_keeps_each_measured_value_and_a_flat_colour(name, pattern):
    rgb = np.random.default_rng(7).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    raw, which = mosaic(rgb, pattern)
    out = to_rgb(raw.tobytes(), 16, 12, name)
    assert out.shape == (12, 16, 3)
    inner = (slice(1, -1), slice(1, -1))  # bilinear demosaicing keeps the value a pixel measured
    measured = np.take_along_axis(out, which[:, :, None], axis=2)[:, :, 0]
    assert np.array_equal(measured[inner], raw[inner])
    flat = np.zeros((8, 8, 3), np.uint8) + np.array([200, 90, 30], np.uint8)
    assert np.array_equal(to_rgb(mosaic(flat, pattern)[0].tobytes(), 8, 8, name)[2:-2, 2:-2], flat[2:-2, 2:-2])
    named = getattr(cv2, f"COLOR_Bayer{pattern}2RGB", None)  # OpenCV's newer pattern-named codes, where present
    if named is not None:
        assert np.array_equal(out, cv2.cvtColor(raw, named))


def test_padding_after_each_row_is_skipped():
    values = np.random.default_rng(1).integers(0, 4096, size=(4, 6))
    rows = [pack_pfnc(r.tolist(), 12) + b"\xee\xee" for r in values]
    assert np.array_equal(to_rgb(b"".join(rows), 6, 4, "Mono12p", x_padding=2), expected_gray(values, 12))
    gray = np.random.default_rng(2).integers(0, 256, size=(3, 5), dtype=np.uint8)
    padded = b"".join(r.tobytes() + b"\x01\x02\x03" for r in gray)[:-3]  # the last row's padding may be cut
    assert np.array_equal(to_rgb(padded, 5, 3, "Mono8", x_padding=3), np.stack([gray] * 3, axis=-1))


def test_refusals_name_the_format_and_what_is_converted():
    with pytest.raises(PixelFormatError, match=r"0x0110000D.*Mono8"):
        to_rgb(b"\0" * 100, 5, 5, 0x0110000D)  # BayerRG10: not converted
    with pytest.raises(PixelFormatError, match="YUV422"):
        to_rgb(b"\0" * 100, 5, 5, "YUV422")
    with pytest.raises(PixelFormatError, match="buffer has 10"):
        to_rgb(b"\0" * 10, 5, 5, "Mono8")
    with pytest.raises(PixelFormatError, match="buffer has 10"):
        to_rgb(b"\0" * 10, 5, 5, "Mono12p")
    assert bits_per_pixel("Mono12p") == 12 and bits_per_pixel("Mono10Packed") == 12 and bits_per_pixel("RGB8") == 24


def test_codes_are_those_aravis_knows():
    """Where Aravis is installed: its own constants for the formats it names (it has no Mono10p/Mono12p)."""
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis
    except (ImportError, ValueError) as err:
        pytest.skip(f"Aravis introspection not installed ({err})")
    aravis = {"Mono8": "MONO_8", "Mono10": "MONO_10", "Mono12": "MONO_12", "Mono16": "MONO_16",
              "Mono10Packed": "MONO_10_PACKED", "Mono12Packed": "MONO_12_PACKED", "BayerGR8": "BAYER_GR_8",
              "BayerRG8": "BAYER_RG_8", "BayerGB8": "BAYER_GB_8", "BayerBG8": "BAYER_BG_8",
              "RGB8": "RGB_8_PACKED", "BGR8": "BGR_8_PACKED"}
    for name, constant in aravis.items():
        assert PIXEL_FORMATS[name] == getattr(Aravis, f"PIXEL_FORMAT_{constant}"), name
