"""Bad and unusual image inputs: each one gets a correct result (with a documented conversion) or an
error naming the file and the reason; one bad file never stops the others (docs/reliability.md)."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import textured_part
from winclip_edge import cli
from winclip_edge.preprocess import MAX_DECODE_PIXELS, ImageError, as_rgb, read_header, read_image

# Pillow only makes test files (CMYK, palette, EXIF); the runtime never uses it
Image = pytest.importorskip("PIL.Image")
ImageOps = pytest.importorskip("PIL.ImageOps")

HUGE_SIDE = 20_480  # > 20,000: 419 MP; a baseline JPEG this size is decoded at 1/4 -> 5120 px (26 MP)
HUGE_REDUCED = HUGE_SIDE // 4
EXIF_ORIENTATION = 0x0112


# ---------------------------------------------------------------- building the inputs
def rgb_image(h: int = 60, w: int = 90, seed: int = 0) -> np.ndarray:
    return textured_part((h, w), seed=seed)


def encode(image: np.ndarray, ext: str, *params: int) -> bytes:
    """Gray, RGB or RGBA (any depth) -> file bytes (cv2 wants BGR/BGRA)."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR if image.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    ok, data = cv2.imencode(ext, image, list(params))
    assert ok, ext
    return data.tobytes()


def pil_bytes(image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def black_gray_png(height: int, width: int) -> bytes:
    """A valid 8-bit grayscale PNG of any size, compressed row by row (never held in memory uncompressed)."""
    z = zlib.compressobj(1)
    row = bytes(width + 1)  # filter byte 0 + black pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def flat_gray_jpeg(height: int, width: int, sof: int = 0xC0) -> bytes:
    """A valid mid-grey baseline JPEG of any size: one-code Huffman tables, 2 bits per 8x8 block
    (DC difference 0, end of block), so 20k x 20k px take ~1.6 MB."""
    one_code = bytes([1] + [0] * 15)  # a single code of length 1, for symbol 0
    blocks = -(-height // 8) * -(-width // 8)
    return (b"\xff\xd8" + _jpeg_segment(0xDB, bytes([0] + [1] * 64))
            + _jpeg_segment(sof, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
            + _jpeg_segment(0xC4, b"\x00" + one_code + b"\x00") + _jpeg_segment(0xC4, b"\x10" + one_code + b"\x00")
            + _jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + bytes(-(-blocks * 2 // 8)) + b"\xff\xd9")


def exif_jpeg(rgb: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return pil_bytes(Image.fromarray(rgb), "JPEG", exif=exif.tobytes(), quality=95)


def marked_image(h: int = 48, w: int = 80) -> np.ndarray:
    """Dark image with a bright top-left corner: shows where 'up' ended after an orientation change."""
    rgb = np.full((h, w, 3), 30, np.uint8)
    rgb[: h // 4, : w // 4] = 230
    return rgb


# ---------------------------------------------------------------- refused inputs
def test_zero_byte_file_is_refused(tmp_path):
    path = write(tmp_path / "empty.png", b"")
    with pytest.raises(ImageError, match=r"empty\.png: empty file \(0 bytes\)"):
        read_image(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ImageError, match=r"nothere\.png: cannot read"):
        read_image(tmp_path / "nothere.png")


def test_text_file_named_png_is_refused(tmp_path):
    path = write(tmp_path / "notes.png", b"part 17: looks fine\n")
    with pytest.raises(ImageError, match=r"notes\.png: not an image.*'\.png'"):
        read_image(path)


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("keep", [0.3, 0.9, -2])  # fraction kept, or bytes dropped (-2: only the EOI marker)
def test_truncated_jpeg_is_refused_not_decoded_grey(tmp_path, keep, progressive):
    data = encode(rgb_image(), ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive))
    cut = data[:keep] if keep < 0 else data[: int(len(data) * keep)]
    path = write(tmp_path / "cut.jpg", cut)
    with pytest.raises(ImageError, match=r"cut\.jpg: truncated JPEG .*0xFFD9.*copy it again"):
        read_image(path)


def test_jpeg_with_exif_thumbnail_and_trailing_bytes_is_complete(tmp_path):
    """The end-marker rule must not refuse good files: an EXIF thumbnail (its own SOS/EOI) and bytes after EOI."""
    thumb = pil_bytes(Image.fromarray(rgb_image(16, 16)), "JPEG")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 1
    data = pil_bytes(Image.fromarray(rgb_image()), "JPEG", exif=exif.tobytes() + thumb) + b"\x00" * 16
    assert read_image(write(tmp_path / "ok.jpg", data)).shape == (60, 90, 3)


def test_truncated_png_is_refused(tmp_path):
    data = encode(rgb_image(), ".png")
    path = write(tmp_path / "cut.png", data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.png: truncated PNG \(no IEND chunk\)"):
        read_image(path)


def test_damaged_pixels_with_intact_ends_are_refused(tmp_path):
    data = bytearray(encode(rgb_image(), ".png"))
    data[60:400] = bytes(340)  # IDAT contents zeroed: header and IEND intact, zlib stream broken
    with pytest.raises(ImageError, match=r"bad\.png: damaged PNG"):
        read_image(write(tmp_path / "bad.png", bytes(data)))


# ---------------------------------------------------------------- converted inputs
def test_16bit_png_keeps_the_high_byte(tmp_path):
    gray16 = (np.arange(40 * 50, dtype=np.uint32).reshape(40, 50) * 29 % 65536).astype(np.uint16)
    rgb16 = np.stack([gray16, 65535 - gray16, gray16 // 2], axis=-1)
    assert np.array_equal(read_image(write(tmp_path / "g16.png", encode(gray16, ".png"))),
                          np.repeat((gray16 >> 8).astype(np.uint8)[:, :, None], 3, axis=2))
    assert np.array_equal(read_image(write(tmp_path / "c16.png", encode(rgb16, ".png"))), (rgb16 >> 8).astype(np.uint8))


def test_grayscale_is_replicated_to_rgb(tmp_path):
    gray = rgb_image()[:, :, 1].copy()
    assert np.array_equal(read_image(write(tmp_path / "gray.png", encode(gray, ".png"))), np.dstack([gray] * 3))


def test_rgba_png_drops_alpha_keeping_stored_colours(tmp_path):
    rgb = rgb_image()
    alpha = np.linspace(0, 255, rgb.shape[1], dtype=np.uint8)[None, :].repeat(rgb.shape[0], 0)
    rgba = np.dstack([rgb, alpha])
    data = encode(rgba, ".png")
    assert np.array_equal(read_image(write(tmp_path / "rgba.png", data)), rgb)
    assert np.array_equal(as_rgb(rgba), rgb)  # in-memory RGBA: same rule


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_png_is_expanded(tmp_path, transparent):
    palette = Image.fromarray(rgb_image()).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    kwargs = {"transparency": 0} if transparent else {}
    path = write(tmp_path / "palette.png", pil_bytes(palette, "PNG", **kwargs))
    assert np.array_equal(read_image(path), np.asarray(palette.convert("RGB")))


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    rgb = rgb_image()
    path = write(tmp_path / "cmyk.jpg", pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95))
    assert Image.open(path).mode == "CMYK"
    decoded = read_image(path)
    assert decoded.shape == rgb.shape
    # JPEG loss only: swapped or inverted channels would be off by tens of grey levels
    assert np.abs(decoded.astype(int) - rgb).mean() < 3.0


def test_one_pixel_image_gets_a_one_pixel_map(tmp_path, inspector):
    path = write(tmp_path / "dot.png", encode(np.full((1, 1, 3), 200, np.uint8), ".png"))
    result = inspector.inspect([path])[0]
    assert result.error is None and 0.0 <= result.score <= 1.0
    assert result.anomaly_map.shape == (1, 1)


@pytest.mark.parametrize("orientation, rotate", [(3, cv2.ROTATE_180), (6, cv2.ROTATE_90_CLOCKWISE),
                                                 (8, cv2.ROTATE_90_COUNTERCLOCKWISE)])
def test_exif_orientation_is_applied_and_the_map_follows_it(tmp_path, inspector, orientation, rotate):
    stored = marked_image()
    path = write(tmp_path / f"exif{orientation}.jpg", exif_jpeg(stored, orientation))
    shown = read_image(path)
    oracle = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))  # Pillow as the independent reference
    assert shown.shape == oracle.shape
    assert np.abs(shown.astype(int) - oracle).mean() < 2.0
    assert np.abs(shown.astype(int) - cv2.rotate(stored, rotate)).mean() < 3.0  # the bright corner moved with it
    raw = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    by_hand = cv2.cvtColor(cv2.rotate(raw, rotate), cv2.COLOR_BGR2RGB)
    from_file, from_array = inspector.inspect([path, by_hand])
    assert from_file.anomaly_map.shape == shown.shape[:2]
    assert from_file.score == from_array.score
    assert np.array_equal(from_file.anomaly_map, from_array.anomaly_map)


@pytest.mark.parametrize("name", ["Prüfteil 检查 #1.png", "with space.jpg", "ünïcödé dir/x y.png"])
def test_non_ascii_and_space_paths(tmp_path, name):
    data = encode(rgb_image(), Path(name).suffix)
    expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.array_equal(read_image(write(tmp_path / name, data)), expected)


# ---------------------------------------------------------------- huge images: bounded memory
@pytest.mark.parametrize("ext, params", [(".png", ()), (".jpg", ()), (".bmp", ()), (".tif", ()), (".webp", ()),
                                         (".webp", (cv2.IMWRITE_WEBP_QUALITY, 101)),
                                         (".jpg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1))])
def test_header_reader_matches_the_decoder(ext, params):
    rgb = rgb_image(37, 53)
    header = read_header(encode(rgb, ext, *params))
    assert (header.height, header.width, header.truncated) == (37, 53, False)


def test_header_reader_extended_webp():
    data = pil_bytes(Image.fromarray(np.dstack([rgb_image(37, 53), np.full((37, 53), 9, np.uint8)])), "WEBP")
    assert data[12:16] == b"VP8X"
    assert (read_header(data).height, read_header(data).width) == (37, 53)


# VmHWM (peak RSS of this address space) rather than ru_maxrss, which inherits the forking parent's peak
_PEAK_SCRIPT = """
import json, re, sys
from winclip_edge.preprocess import ImageError, read_image
out = {}
for path in sys.argv[1:]:
    try:
        out[path] = list(read_image(path).shape)
    except ImageError as err:
        out[path] = str(err)
out["peak_rss_mib"] = int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
print(json.dumps(out))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak memory is read from Linux /proc")
def test_huge_images_are_reduced_or_refused_with_bounded_memory(tmp_path):
    """Over 20k x 20k px: a baseline JPEG is decoded at 1/4 scale, a PNG and a progressive JPEG are refused
    from their header -- in a fresh process whose peak memory stays far below one full-size decode."""
    jpeg = write(tmp_path / "huge.jpg", flat_gray_jpeg(HUGE_SIDE, HUGE_SIDE))
    progressive = write(tmp_path / "huge-progressive.jpg", flat_gray_jpeg(HUGE_SIDE, HUGE_SIDE, sof=0xC2))
    png = write(tmp_path / "huge.png", black_gray_png(HUGE_SIDE, HUGE_SIDE))
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(jpeg), str(progressive), str(png)],
                         capture_output=True, text=True, timeout=120, check=True)
    out = json.loads(run.stdout)
    assert out[str(jpeg)] == [HUGE_REDUCED, HUGE_REDUCED, 3]
    for path in (progressive, png):
        assert f"{path.name}: {HUGE_SIDE}x{HUGE_SIDE} pixels (419 MP) is over the decode limit" in out[str(path)]
        assert "downscale the image first" in out[str(path)]
    full_decode_mib = HUGE_SIDE * HUGE_SIDE * 3 / 2**20  # 1200 MiB as RGB uint8
    assert out["peak_rss_mib"] < full_decode_mib / 2


def test_reduction_picks_the_smallest_factor_under_the_limit(tmp_path):
    side = int((MAX_DECODE_PIXELS * 2) ** 0.5)  # twice the limit: 1/2 scale suffices
    decoded = read_image(write(tmp_path / "big.jpg", flat_gray_jpeg(side, side)))
    assert decoded.shape == (-(-side // 2), -(-side // 2), 3)


# ---------------------------------------------------------------- one folder of everything through the CLI
@pytest.fixture(scope="module")
def inspector(tiny_bundle):
    from winclip_edge.inspector import Inspector

    inspector = Inspector(tiny_bundle, "widget")
    yield inspector
    inspector.close()


def mixed_folder(root: Path) -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
    """Every kind of input in one folder -> ({file: expected error words}, {file: expected map size})."""
    rgb = rgb_image()
    gray16 = (rgb[:, :, 0].astype(np.uint16) * 257)
    jpeg = encode(rgb, ".jpg")
    bad = {
        "empty.png": "empty file (0 bytes)",
        "cut.jpg": "truncated JPEG",
        "notes.png": "not an image",
        "huge.png": "over the decode limit",
    }
    good = {
        "gray16.png": (60, 90), "gray.png": (60, 90), "rgba.png": (60, 90), "palette.png": (60, 90),
        "cmyk.jpg": (60, 90), "dot.png": (1, 1), "exif6.jpg": (80, 48), "Prüfteil 检查 #1.png": (60, 90),
        "sub dir/part.jpg": (60, 90), "huge.jpg": (HUGE_REDUCED, HUGE_REDUCED),
    }
    files = {
        "empty.png": b"", "cut.jpg": jpeg[: len(jpeg) * 2 // 3], "notes.png": b"not a picture\n",
        "huge.png": black_gray_png(HUGE_SIDE, HUGE_SIDE), "gray16.png": encode(gray16, ".png"),
        "gray.png": encode(rgb[:, :, 1].copy(), ".png"), "rgba.png": encode(np.dstack([rgb, rgb[:, :, 0]]), ".png"),
        "palette.png": pil_bytes(Image.fromarray(rgb).convert("P"), "PNG"),
        "cmyk.jpg": pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG"), "dot.png": encode(rgb[:1, :1], ".png"),
        "exif6.jpg": exif_jpeg(marked_image(), 6), "Prüfteil 检查 #1.png": encode(rgb, ".png"),
        "sub dir/part.jpg": jpeg, "huge.jpg": flat_gray_jpeg(HUGE_SIDE, HUGE_SIDE),
    }
    for name, data in files.items():
        write(root / name, data)
    return bad, good


def test_mixed_folder_through_infer(tmp_path, tiny_bundle, capsys):
    folder = tmp_path / "in box"
    bad, good = mixed_folder(folder)
    out = tmp_path / "out"
    code = cli.main(["infer", "--bundle", str(tiny_bundle), "--product", "widget", "--out", str(out), "--quiet",
                     "--batch", "4", str(folder)])
    assert code == cli.EXIT_SOME_FAILED
    records = {str(Path(r["file"]).relative_to(folder)): r
               for r in map(json.loads, (out / "results.jsonl").read_text(encoding="utf-8").splitlines())}
    assert set(records) == set(bad) | set(good)
    stderr = capsys.readouterr().err
    for name, words in bad.items():
        r = records[name]
        assert r["score"] is None and r["error"].startswith(str(folder / name)) and words in r["error"], r
        assert f"error: {folder / name}: " in stderr
    for name, size in good.items():
        r = records[name]
        assert r["error"] is None and 0.0 <= r["score"] <= 1.0, r
        assert tuple(r["image_size"]) == size
        assert np.load(r["map"]).shape == size and Path(r["overlay"]).is_file()
