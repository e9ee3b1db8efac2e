"""Image decoding: bounded before it starts, one-line errors, and conversions that keep what the image shows.

Every file, request attachment and dataset image goes through edgemeta.preprocess.decode_image
(Preprocess.file and load_images call it), so these tests hold for the CLI, the agent and training.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from edgemeta import preprocess as pp
from edgemeta.errors import EdgemetaError
from edgemeta.preprocess import Preprocess, load_images

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "omniglot-conv4"
SAMPLE = REPO / "samples" / "omniglot"
OMNI = Preprocess(28, 1, invert=True)  # the shipped models' preprocessing: dark ink on white, inverted

# A child that runs the CLI as its own child and reports that grandchild's peak memory (ru_maxrss, KiB on
# Linux): RUSAGE_CHILDREN of the test process would include every subprocess earlier tests ran.
MEASURED = ("import json, resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(json.dumps({'rc': p.returncode, 'stderr': p.stderr, "
            "'max_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")


def cli(*args) -> dict:
    p = subprocess.run([sys.executable, "-c", MEASURED, sys.executable, "-m", "edgemeta", *args],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def assert_one_line_error(result: dict, *fragments: str) -> str:
    assert result["rc"] == 2, result
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result["stderr"]
    assert "unexpected" not in lines[0] and "Traceback" not in result["stderr"]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def enroll(store: Path, image: Path) -> dict:
    return cli("enroll", "--store", str(store), "--model", str(MODEL), "--label", "a", str(image))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, color_type: int = 2) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header says width x height, with almost no pixel data: opening it reads the size."""
    return png_header(width, height) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def write_png_bomb(path: Path, side: int) -> None:
    """A valid white RGB PNG of side x side, compressed row block by row block (never held decoded)."""
    z = zlib.compressobj(9)
    rows = (b"\0" + b"\xff" * (3 * side)) * 64
    idat = [z.compress(rows) for _ in range(side // 64)]
    idat += [z.compress((b"\0" + b"\xff" * (3 * side)) * (side % 64)), z.flush()]
    path.write_bytes(png_header(side, side) + _chunk(b"IDAT", b"".join(idat)) + _chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    write_png_bomb(path, 13000)  # 169 megapixels, ~0.5 MB of file, ~860 MB for the old decode
    return path


def save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    img.save(path, fmt, **kw)
    return path


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def cross(size: int = 28) -> np.ndarray:
    """Black strokes (a cross) on white, as uint8 L."""
    a = np.full((size, size), 255, np.uint8)
    a[size // 6: -size // 6, size // 2 - 2: size // 2 + 2] = 0
    a[size // 2 - 2: size // 2 + 2, size // 6: -size // 6] = 0
    return a


# --- bounded before decoding -------------------------------------------------------------------------

def test_a_png_bomb_is_refused_from_its_header(bomb):
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(EdgemetaError) as e:
        OMNI.file(bomb)
    msg = str(e.value)
    assert "\n" not in msg and str(bomb) in msg and "13000x13000" in msg and "169.0 megapixels" in msg
    assert "limit of 24.0 megapixels" in msg and "resize it" in msg and "max_image_pixels" in msg
    with pytest.raises(EdgemetaError, match="attachment 1 is 13000x13000"):  # the agent's path: bytes
        OMNI.file("attachment 1", bomb.read_bytes())


def test_the_cli_refuses_a_png_bomb_in_one_line_with_little_memory(bomb, tmp_path):
    """Measured on the 2-core dev host: the refused bomb peaks at ~51 MB; the old decode took ~860 MB."""
    store = tmp_path / "store"
    result = enroll(store, bomb)
    assert_one_line_error(result, str(bomb), "13000x13000", "limit of 24.0 megapixels")
    assert "DecompressionBomb" not in result["stderr"]  # nor Pillow's two-line warning
    assert result["max_rss_mb"] < 600, result
    print(f"peak memory of the refused bomb: {result['max_rss_mb']:.0f} MB")
    assert not (store / "store.npz").exists()


def test_an_image_over_pillows_own_stop_is_one_line_not_unexpected(tmp_path):
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_declaring(20000, 20000))  # 400 MP: Pillow raises DecompressionBombError on opening
    assert_one_line_error(enroll(tmp_path / "store", huge), str(huge), "400.0 megapixels")
    with pytest.raises(EdgemetaError, match="more than Pillow decodes"):
        pp.decode_image(huge, OMNI, limits=pp.ImageLimits(max_pixels=10**9))


def test_pillows_warning_as_an_error_still_gives_our_one_line(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(png_declaring(10000, 10000))  # 100 MP: over Image.MAX_IMAGE_PIXELS, Pillow warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(EdgemetaError, match="10000x10000 .100.0 megapixels., more than the limit"):
            OMNI.file(big)


def test_limits_are_arguments_and_a_jpeg_counts_at_its_reduced_decode(tmp_path):
    y, x = np.mgrid[0:3000, 0:4000]
    photo = Image.fromarray(((x // 8 + y // 8) % 256).astype(np.uint8)).convert("RGB")
    jpeg, png = save(photo, tmp_path / "photo.jpg", quality=90), save(photo, tmp_path / "photo.png")
    small = pp.ImageLimits(max_pixels=1_000_000, max_bytes=64 * 2**20)
    out = pp.decode_image(jpeg, OMNI, limits=small)  # 12 MP on file, decoded at 1/8: 500x375
    assert out.shape == (28, 28, 1) and out.dtype == np.uint8
    with Image.open(jpeg) as full:
        reference = OMNI.image(full)
    assert np.abs(out.astype(int) - reference).mean() < 4  # the DCT-scaled decode looks the same
    with pytest.raises(EdgemetaError, match=r"4000x3000 \(12.0 megapixels\), more than the limit of 1.0 megapixels"):
        pp.decode_image(png, OMNI, limits=small)
    assert pp.decode_image(png, OMNI, limits=pp.ImageLimits(max_pixels=12_000_000)).shape == (28, 28, 1)


def test_the_file_size_limit_is_checked_before_reading(tmp_path):
    img = save(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)), tmp_path / "n.png")
    size = img.stat().st_size
    limits = pp.ImageLimits(max_bytes=1000)
    with pytest.raises(EdgemetaError, match=rf"n.png is {size / 1024:.1f} KiB, more than the limit of 1000 bytes per image"):
        pp.decode_image(img, OMNI, limits=limits)
    with pytest.raises(EdgemetaError, match="attachment 2 is .* more than the limit of 1000 bytes"):
        OMNI.file("attachment 2", img.read_bytes(), limits=limits)
    with pytest.raises(EdgemetaError, match="is larger than that, more than the limit"):  # no size to stat: read to the limit
        pp.decode_image("/dev/zero", OMNI, limits=limits)
    with pytest.raises(EdgemetaError, match="more than the limit of 1000 bytes"):
        load_images([img], OMNI, limits=limits)
    np.save(tmp_path / "stack.npy", np.zeros((10, 28, 28), np.uint8))
    with pytest.raises(EdgemetaError, match="stack.npy is 7.8 KiB, more than the limit"):
        load_images([tmp_path / "stack.npy"], OMNI, limits=limits)


def test_limits_from_the_environment(monkeypatch, tmp_path):
    img = save(Image.new("L", (100, 100), 255), tmp_path / "w.png")
    monkeypatch.setenv("EDGEMETA_MAX_IMAGE_PIXELS", "9999")
    with pytest.raises(EdgemetaError, match="more than the limit of 9999 pixels"):
        OMNI.file(img)
    assert OMNI.file(img, limits=pp.ImageLimits(max_pixels=10_000)).shape == (28, 28, 1)  # an argument is used as given
    monkeypatch.setenv("EDGEMETA_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(EdgemetaError, match=r"\$EDGEMETA_MAX_IMAGE_PIXELS must be a positive integer, got 'lots'"):
        OMNI.file(img)
    with pytest.raises(EdgemetaError, match="max_bytes must be a positive integer"):
        pp.ImageLimits(max_bytes=0)


def test_board_profiles_set_limits_by_memory(monkeypatch, tmp_path):
    from edgemeta.boards import boards_dir, list_boards, load_board, load_board_file

    boards = list_boards()
    for b in boards:
        assert isinstance(b.raw["max_image_pixels"], int) and isinstance(b.raw["max_image_bytes"], int), b.name
        assert b.image_limits == pp.ImageLimits(b.raw["max_image_pixels"], b.raw["max_image_bytes"])
    by_memory = sorted(boards, key=lambda b: b.raw["memory_mb"])
    pixels = [b.image_limits.max_pixels for b in by_memory]
    assert pixels == sorted(pixels)  # more memory, never a lower limit
    zero, pi5 = load_board("rpi-zero2w").image_limits, load_board("rpi5").image_limits
    assert zero.max_pixels < pi5.max_pixels and zero.max_pixels * 13 < 200 * 10**6  # RGBA worst case < 200 MB on 512 MB
    assert load_board_file(boards_dir() / "rpi5.toml").image_limits == pi5
    monkeypatch.setenv("EDGEMETA_MAX_IMAGE_PIXELS", "5")  # an operator's override wins
    assert load_board("rpi5").image_limits.max_pixels == 5
    monkeypatch.delenv("EDGEMETA_MAX_IMAGE_PIXELS")
    text = (boards_dir() / "rpi5.toml").read_text().replace("max_image_pixels = 64_000_000", 'max_image_pixels = "64M"')
    (tmp_path / "bad.toml").write_text(text)
    monkeypatch.setenv("EDGEMETA_BOARDS", str(tmp_path))
    with pytest.raises(EdgemetaError, match="bad.toml is broken: max_image_pixels must be a positive integer, got '64M'"):
        load_board("bad")


# --- one-line errors ---------------------------------------------------------------------------------

def test_truncated_and_non_images_give_one_line_errors(tmp_path):
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 80, 3), np.uint8))
    data = encoded(noise, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "x.png"
    text.write_text("this is not a picture\n")
    for path in (truncated, text):
        with pytest.raises(EdgemetaError, match=f"cannot read image {path}") as e:
            OMNI.file(path)
        assert "\n" not in str(e.value)
        assert_one_line_error(enroll(tmp_path / "store", path), f"cannot read image {path}")
    # bytes (the agent's attachments): no Python internals such as <_io.BytesIO object at 0x...>
    for data in (text.read_bytes(), truncated.read_bytes(), b""):
        with pytest.raises(EdgemetaError, match="cannot read image attachment 1") as e:
            OMNI.file("attachment 1", data)
        assert " at 0x" not in str(e.value) and "<" not in str(e.value), str(e.value)
    with pytest.raises(EdgemetaError, match="does not exist"):
        OMNI.file(tmp_path / "missing.png")
    with pytest.raises(EdgemetaError, match="is a folder"):
        OMNI.file(tmp_path)


def test_formats_outside_the_list_are_not_tried(tmp_path):
    ico = save(Image.new("RGB", (32, 32), "white"), tmp_path / "a.ico")
    with pytest.raises(EdgemetaError, match="not an image in a known format"):
        OMNI.file(ico)


# --- conversions that keep what the image shows --------------------------------------------------------

def test_16_bit_grayscale_keeps_its_gradient(tmp_path):
    values = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    expected = np.rint(values / 257).astype(np.uint8)  # scaled by the bit depth, not clipped at 255
    pre = Preprocess(16, 1, invert=False)
    for path in (save(Image.fromarray(values), tmp_path / "g.png"),  # I;16
                 save(Image.fromarray(values.astype(">u2")), tmp_path / "g.tif"),  # I;16B
                 save(Image.fromarray(values), tmp_path / "g.pgm")):  # Pillow opens 16-bit PGM as I
        out = pre.file(path)[..., 0]
        assert (out == 255).mean() < 0.05, (path.name, out)
        assert np.array_equal(out, expected), path.name
    rgb = Preprocess(16, 3).file(tmp_path / "g.png")
    assert np.array_equal(rgb, np.repeat(expected[..., None], 3, axis=-1))


def test_32_bit_and_float_grayscale_scale_by_their_range(tmp_path):
    ints = np.linspace(0, 2**31 - 1, 256).astype(np.int32).reshape(16, 16)
    out = Preprocess(16, 1).file(save(Image.fromarray(ints), tmp_path / "i.tif"))[..., 0]
    assert np.abs(out.astype(int) - np.rint(ints / (2**31 - 1) * 255)).max() <= 1
    floats = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    floats[0, 0] = np.nan
    out = Preprocess(16, 1).file(save(Image.fromarray(floats), tmp_path / "f.tif"))[..., 0]
    assert out[0, 0] == 0 and out[-1, -1] == 255 and np.all(np.diff(out.ravel()[1:].astype(int)) >= 0)


def test_transparent_background_with_black_strokes_reads_like_strokes_on_white(tmp_path):
    ink = cross(56)
    on_white = OMNI.file(save(Image.fromarray(ink), tmp_path / "white.png"))
    rgba = np.zeros((56, 56, 4), np.uint8)  # transparent black everywhere ...
    rgba[..., 3] = 255 - ink  # ... but the strokes, opaque black
    out = OMNI.file(save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"))
    assert out.max() > 200 and (out > 128).mean() < 0.4, "transparent became ink"  # not all black (all bright inverted)
    assert np.array_equal(out, on_white)
    la = np.stack([np.zeros_like(ink), 255 - ink], axis=-1)
    assert np.array_equal(OMNI.file(save(Image.fromarray(la, "LA"), tmp_path / "la.png")), on_white)
    # palette with a transparent index (GIF, indexed PNG): index 0 transparent black, index 1 opaque black
    p = Image.fromarray((ink == 0).astype(np.uint8), "P")
    p.putpalette([0, 0, 0, 0, 0, 0] + [0] * 762)
    for fmt in ("png", "gif"):
        assert np.array_equal(OMNI.file(save(p, tmp_path / f"p.{fmt}", transparency=0)), on_white), fmt


def test_partial_alpha_is_composited_and_the_background_follows_polarity(tmp_path):
    alpha = np.tile(np.linspace(0, 255, 28).round().astype(np.uint8), (28, 1))
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = alpha  # black ink fading in
    path = save(Image.fromarray(rgba, "RGBA"), tmp_path / "fade.png")
    inverted = OMNI.file(path)[..., 0].astype(int)  # over white: 255 * (1 - a), inverted: a
    assert np.abs(inverted - alpha).max() <= 1
    # a model without inversion takes bright on dark: transparent is black, white strokes stay white
    rgba[..., :3] = 255
    plain = Preprocess(28, 3, invert=False).file(save(Image.fromarray(rgba, "RGBA"), tmp_path / "w.png")).astype(int)
    assert np.abs(plain - alpha[..., None]).max() <= 1


def test_palette_and_cmyk_images(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(2).integers(0, 256, (28, 28, 3), np.uint8))
    p = rgb.quantize(16)
    for pre in (OMNI, Preprocess(28, 3)):
        assert np.array_equal(pre.file(save(p, tmp_path / "p.png")), pre.image(p.convert("RGB")))
    red = Image.new("CMYK", (32, 32), (0, 255, 255, 0))
    for fmt in ("tif", "jpg"):
        out = Preprocess(16, 3).file(save(red, tmp_path / f"red.{fmt}")).reshape(-1, 3).mean(axis=0)
        assert np.abs(out - [255, 0, 0]).max() < 8, (fmt, out)
        gray = Preprocess(16, 1).file(tmp_path / f"red.{fmt}").mean()
        assert abs(gray - 76) < 8, (fmt, gray)  # the luma of red


def test_modes_pillow_makes_in_memory():
    """Premultiplied alpha, palette alpha, LAB/HSV/RGBX and every 16-bit byte order."""
    rgba = Image.fromarray(np.dstack([np.zeros((28, 28, 3), np.uint8), 255 - cross()]), "RGBA")
    on_white = OMNI.image(Image.fromarray(cross()))
    for img in (rgba.convert("RGBa"), rgba.convert("LA").convert("La"), rgba.convert("PA")):
        assert np.array_equal(OMNI.image(img), on_white), img.mode
    rgb = Image.fromarray(np.random.default_rng(4).integers(0, 256, (28, 28, 3), np.uint8))
    for mode in ("LAB", "HSV", "RGBX", "YCbCr"):
        for pre in (OMNI, Preprocess(28, 3)):
            out = pre.image(rgb.convert(mode)).astype(int)
            assert np.abs(out - pre.image(rgb)).mean() < 6, (mode, pre)
    values = np.arange(0, 65536, 257, dtype=np.uint16)[:256].reshape(16, 16)
    for mode, dtype in (("I;16", "<u2"), ("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16N", "=u2")):
        img = Image.frombytes(mode, (16, 16), values.astype(dtype).tobytes())  # (Pillow's convert clips these)
        assert np.array_equal(Preprocess(16, 1).image(img)[..., 0], (values // 257).astype(np.uint8)), mode


def upright_picture() -> Image.Image:
    """40 wide, 28 tall; dark top band and a dark block at the left: every flip and turn tells."""
    a = np.full((28, 40), 230, np.uint8)
    a[:8] = 20
    a[12:, :10] = 60
    return Image.fromarray(a)


INVERSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_270}  # the transpose that makes what a camera stores under each orientation


def test_exif_rotated_jpeg_is_upright(tmp_path):
    upright = upright_picture().resize((160, 112), Image.Resampling.NEAREST)
    want = OMNI.file(save(upright, tmp_path / "upright.jpg", quality=95)).astype(int)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": what a phone held upright writes
    stored = save(upright.transpose(Image.Transpose.ROTATE_90), tmp_path / "phone.jpg", quality=95, exif=exif)
    got = OMNI.file(stored).astype(int)
    assert np.abs(got - want).mean() < 3, np.abs(got - want).mean()
    with Image.open(stored) as im:  # as ImageOps turns the full decode (ours is a 1/4-scale JPEG decode)
        assert np.abs(OMNI.image(ImageOps.exif_transpose(im)).astype(int) - got).mean() < 3
    assert np.abs(OMNI.image(upright.transpose(Image.Transpose.ROTATE_90)).astype(int) - want).mean() > 30  # it tells


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_image_ops(tmp_path, orientation):
    upright = upright_picture()
    stored = upright.transpose(INVERSE[orientation]) if orientation in INVERSE else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(stored, tmp_path / "o.png", exif=exif)
    assert np.array_equal(OMNI.file(path), OMNI.image(upright))
    with Image.open(path) as im:
        assert np.array_equal(OMNI.file(path), OMNI.image(ImageOps.exif_transpose(im)))


def test_ordinary_images_decode_as_before():
    """The shipped models were trained and evaluated on these pixels: 1-bit, 8-bit, RGB and palette
    images without transparency decode exactly as Pillow's convert + LANCZOS resize did."""
    def before(img: Image.Image, pre: Preprocess) -> np.ndarray:
        img = img.convert("L" if pre.channels == 1 else "RGB").resize((pre.image_size,) * 2, Image.Resampling.LANCZOS)
        arr = np.asarray(img, dtype=np.uint8)
        return (255 - arr if pre.invert else arr).reshape(pre.input_shape)

    files = sorted(SAMPLE.rglob("*.png"))[:60]
    for f in files:
        with Image.open(f) as img:
            assert img.mode == "1"
            assert np.array_equal(OMNI.file(f), before(img, OMNI)), f
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (50, 70, 3), np.uint8))
    for img in (rgb, rgb.convert("L"), rgb.quantize(64)):
        for pre in (OMNI, Preprocess(32, 3), Preprocess(28, 1)):
            assert np.array_equal(pre.file("x.png", encoded(img, "PNG")), before(img, pre)), (img.mode, pre)


# --- properties ---------------------------------------------------------------------------------------

SAVABLE = {"1": ("PNG", "BMP", "TIFF", "PPM"), "L": ("PNG", "JPEG", "BMP", "TIFF", "GIF", "PPM", "WEBP"),
           "P": ("PNG", "GIF", "BMP", "TIFF"), "RGB": ("PNG", "JPEG", "BMP", "TIFF", "PPM", "WEBP"),
           "RGBA": ("PNG", "TIFF", "WEBP"), "LA": ("PNG", "TIFF"), "I;16": ("PNG", "TIFF", "PPM"), "I": ("TIFF",),
           "F": ("TIFF",), "CMYK": ("JPEG", "TIFF"), "YCbCr": ("TIFF",)}
FUZZ_LIMITS = pp.ImageLimits(max_pixels=1_000_000, max_bytes=1_000_000) if hasattr(pp, "ImageLimits") else None


@st.composite
def images(draw):
    mode = draw(st.sampled_from(sorted(SAVABLE)))
    fmt = draw(st.sampled_from(SAVABLE[mode]))
    w, h = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    band_bytes = {"1": 1, "I;16": 2, "I": 4, "F": 4}.get(mode, 1) * len(Image.new(mode, (1, 1)).getbands())
    n = w * h * band_bytes if mode != "1" else (w + 7) // 8 * h
    img = Image.frombytes(mode, (w, h), rng.integers(0, 256, n, np.uint8).tobytes())
    kw = {}
    if mode == "P" and draw(st.booleans()):
        kw["transparency"] = int(rng.integers(0, 256))
    if fmt in ("JPEG", "PNG", "TIFF", "WEBP") and draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(1, 8))
        kw["exif"] = exif
    try:
        data = encoded(img, fmt, **kw)
    except (OSError, ValueError, KeyError, TypeError):
        assume(False)  # a mode/format pair this Pillow does not write
    return mode, fmt, (w, h), data


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(images(), st.sampled_from([8, 28, 33]), st.sampled_from([1, 3]), st.booleans())
def test_any_small_image_decodes_to_the_model_input(image, size, channels, invert):
    mode, fmt, dims, data = image
    out = pp.decode_image(data, Preprocess(size, channels, invert), name="random", limits=FUZZ_LIMITS)
    assert out.shape == (size, size, channels) and out.dtype == np.uint8, (mode, fmt, dims)


VALID = [encoded(Image.new(m, (20, 12), c), f) for m, c, f in
         (("RGB", "red", "PNG"), ("RGB", "red", "JPEG"), ("P", 3, "GIF"), ("RGBA", (0, 0, 0, 0), "TIFF"),
          ("L", 9, "BMP"), ("RGB", "blue", "WEBP"), ("I;16", 999, "PNG"), ("L", 7, "PPM"))]
PREFIXES = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"II*\x00", b"MM\x00*", b"BM", b"P5\n", b"RIFF\0\0\0\0WEBPVP8 "]


def _check_never_more_than_one_line(data: bytes) -> None:
    try:
        out = pp.decode_image(data, OMNI, name="attachment 1", limits=FUZZ_LIMITS)
    except EdgemetaError as e:
        assert "\n" not in str(e) and " at 0x" not in str(e) and str(e).count("attachment 1") >= 1, str(e)
    else:
        assert out.shape == (28, 28, 1) and out.dtype == np.uint8


@settings(max_examples=500, deadline=None, database=None)
@given(st.sampled_from(PREFIXES), st.binary(max_size=600))
def test_random_bytes_raise_nothing_but_edgemeta_error(prefix, data):
    _check_never_more_than_one_line(prefix + data)


@settings(max_examples=500, deadline=None, database=None)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
       st.integers(0, 10**6))
def test_damaged_images_raise_nothing_but_edgemeta_error(valid, flips, cut):
    data = bytearray(valid)
    for at, value in flips:
        data[at % len(data)] = value
    _check_never_more_than_one_line(bytes(data[: max(1, len(data) - cut % len(data))]))
