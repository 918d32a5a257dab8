"""scoutq.evaluate.plots: PNGs decoded by an independent decoder, then checked pixel by pixel."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from scoutq.evaluate import plots

# viridis anchors at 0, 3/7, 5/7, 6/7 and 1, written out here rather than read from the module.
V0, V3, V5, V6, V7 = (68, 1, 84), (39, 127, 142), (74, 193, 109), (160, 218, 57), (253, 231, 37)
GREY = (160, 160, 160)
CELL = 24


def decode_png(path: Path) -> np.ndarray:
    """Minimal decoder: 8-bit RGB, no interlace, filter 0 only; every CRC checked."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, color_type, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color_type, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == height * stride
    rows = []
    for y in range(height):
        line = raw[y * stride:(y + 1) * stride]
        assert line[0] == 0, "expected filter type 0 (None)"
        rows.append(np.frombuffer(line[1:], dtype=np.uint8).reshape(width, 3))
    return np.stack(rows)


def mask_of(img: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return np.all(img == np.array(color, dtype=np.uint8), axis=-1)


def leftmost_block(img: np.ndarray, color: tuple[int, int, int]) -> tuple[int, int]:
    """Top-left (y, x) of the leftmost region of `color`, asserted to be a full CELL x CELL square."""
    ys, xs = np.nonzero(mask_of(img, color))
    assert xs.size, f"no pixel of colour {color}"
    x0 = int(xs.min())
    y0 = int(ys[xs == x0].min())
    assert mask_of(img[y0:y0 + CELL, x0:x0 + CELL], color).all()
    return y0, x0


def test_write_png_round_trips_exactly(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    plots.write_png(path, rgb)
    np.testing.assert_array_equal(decode_png(path), rgb)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary left behind


def test_write_png_rejects_bad_arrays(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        plots.write_png(tmp_path / "a.png", np.zeros((2, 2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        plots.write_png(tmp_path / "a.png", np.zeros((2, 2), dtype=np.uint8))
    assert not list(tmp_path.iterdir())


def test_font_glyphs_are_5x7_and_scale() -> None:
    for ch, glyph in plots.FONT.items():
        assert glyph.shape == (7, 5), ch
    for ch in "0123456789.-e+ :/SQNRdBlayerexpertokensharminmax":
        assert ch in plots.FONT or ch.upper() in plots.FONT, ch

    def inked(scale: int) -> int:
        img = plots.canvas(40, 200)
        plots.draw_text(img, 2, 2, "SQNR dB 1.5e-03", scale, (0, 0, 0))
        return int(mask_of(img, (0, 0, 0)).sum())

    assert inked(1) > 0 and inked(2) == 4 * inked(1)
    # lower case draws the capital glyph; clipping at the edge is not an error
    a, b = plots.canvas(10, 10), plots.canvas(10, 10)
    plots.draw_text(a, 0, 0, "e", 1, (0, 0, 0))
    plots.draw_text(b, 0, 0, "E", 1, (0, 0, 0))
    np.testing.assert_array_equal(a, b)
    plots.draw_text(a, 8, 8, "888", 3, (0, 0, 0))


def test_heatmap_cells_take_colormap_ends_and_nan_is_grey(tmp_path: Path) -> None:
    values = np.array([[0.0, np.nan, 3.0], [5.0, 6.0, 7.0]])
    path = tmp_path / "sqnr.png"
    plots.heatmap_png(path, values, "SQNR dB per expert", value_label="dB", cell=CELL)
    img = decode_png(path)
    assert img.shape[0] >= 2 * CELL and img.shape[1] >= 3 * CELL and img.shape[2] == 3

    y0, x0 = leftmost_block(img, V0)  # min, cell (0, 0)
    expected = {(0, 1): GREY, (0, 2): V3, (1, 0): V5, (1, 1): V6, (1, 2): V7}
    for (r, c), color in expected.items():
        block = img[y0 + r * CELL:y0 + (r + 1) * CELL, x0 + c * CELL:x0 + (c + 1) * CELL]
        assert mask_of(block, color).all(), (r, c, block[CELL // 2, CELL // 2])
    assert leftmost_block(img, V7) == (y0 + CELL, x0 + 2 * CELL)  # max cell, left of the colour bar

    # colour bar: right of the grid, max colour at its top row, min colour at its bottom
    right = img[:, x0 + 3 * CELL:]
    assert mask_of(right, V7).any() and mask_of(right, V0).any()
    # title (and labels) drawn in ink above the grid
    ink = mask_of(img, plots.INK)
    assert ink[:y0].sum() > 50
    assert ink[: y0 // 2].sum() > 20  # the title line itself
    assert ink[y0:y0 + 2 * CELL, :x0].any()  # row indices on the left


def test_heatmap_constant_and_all_nan_do_not_crash(tmp_path: Path) -> None:
    plots.heatmap_png(tmp_path / "c.png", np.full((3, 4), 2.5), "constant")
    img = decode_png(tmp_path / "c.png")
    mid = tuple(int(v) for v in plots.colormap(np.array(0.5)))
    y0, x0 = leftmost_block(img, mid)
    assert mask_of(img[y0:y0 + 3 * CELL, x0:x0 + 4 * CELL], mid).all()

    plots.heatmap_png(tmp_path / "n.png", np.full((2, 2), np.nan), "all nan")
    img = decode_png(tmp_path / "n.png")
    y0, x0 = leftmost_block(img, GREY)
    assert mask_of(img[y0:y0 + 2 * CELL, x0:x0 + 2 * CELL], GREY).all()

    plots.heatmap_png(tmp_path / "i.png", np.array([[1.0, np.inf], [-np.inf, 2.0]]), "inf", cell=8)
    assert decode_png(tmp_path / "i.png").ndim == 3
    with pytest.raises(ValueError, match="rows, cols"):
        plots.heatmap_png(tmp_path / "bad.png", np.zeros(3), "1-D")


def bar_heights(img: np.ndarray, color: tuple[int, int, int]) -> list[int]:
    """Heights of the bars of `color` standing on the lowest baseline, left to right."""
    mask = mask_of(img, color)
    base = int(np.nonzero(mask.any(axis=1))[0].max())
    heights = []
    for x in range(img.shape[1]):
        h = 0
        while base - h >= 0 and mask[base - h, x]:
            h += 1
        heights.append(h)
    # bars of one colour are separated by a gap, so each run of non-zero columns is one bar
    return [h for x, h in enumerate(heights) if h and (x == 0 or not heights[x - 1])]


def test_bar_chart_heights_follow_shares(tmp_path: Path) -> None:
    shares = np.array([[0.1, 0.2, 0.3, 0.4]])
    path = tmp_path / "routing.png"
    plots.bar_chart_png(path, shares, "tokens share per expert", panel=40)
    img = decode_png(path)
    heights = bar_heights(img, plots.BAR_COLOR)
    assert heights == [10, 20, 30, 40]
    assert mask_of(img[:20], plots.INK).sum() > 20  # title


def test_bar_chart_with_reference_and_ragged_layers(tmp_path: Path) -> None:
    values = [np.array([0.5, 0.25, 0.25]), np.array([0.1, 0.9])]
    reference = [np.array([0.2, 0.4, 0.4]), np.array([0.6, 0.4])]
    path = tmp_path / "routing.png"
    plots.bar_chart_png(path, values, "routing", reference=reference, panel=45)
    img = decode_png(path)
    # bottom layer: reference [0.6, 0.4] vs candidate [0.1, 0.9], scale max 0.9 -> 45 px
    assert bar_heights(img, plots.REFERENCE_COLOR) == [30, 20]
    assert bar_heights(img, plots.BAR_COLOR) == [5, 45]
    with pytest.raises(ValueError, match="reference lengths"):
        plots.bar_chart_png(path, values, "x", reference=[np.ones(3)])


def test_bar_chart_zero_and_nan_shares(tmp_path: Path) -> None:
    plots.bar_chart_png(tmp_path / "z.png", np.zeros((2, 3)), "no tokens")
    plots.bar_chart_png(tmp_path / "n.png", np.array([[np.nan, 1.0]]), "nan")
    assert bar_heights(decode_png(tmp_path / "n.png"), plots.BAR_COLOR) == [40]


def test_cross_check_with_pillow(tmp_path: Path) -> None:
    image_module = pytest.importorskip("PIL.Image")
    path = tmp_path / "h.png"
    plots.heatmap_png(path, np.arange(6.0).reshape(2, 3), "pillow")
    with image_module.open(path) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), decode_png(path))
