"""PNG figures for the eval report, drawn with numpy alone: no matplotlib, no Pillow.

The report is produced on GPU boxes and in CI where a plotting stack is one more thing to
install and pin; a heatmap and a bar chart are a few array writes, and PNG is a few chunks
around zlib. So this module owns the whole chain:

* `write_png`: minimal PNG encoder (8-bit RGB, filter 0, one IDAT), written atomically.
* `draw_text`: a built-in 5x7 bitmap font, letters drawn as capitals, scaled by an integer.
* `colormap`: a viridis-like lookup (8 anchors, linear in between), so that lightness grows
  with value and a greyscale print or a colour-blind reader still sees the order.
* `heatmap_png`: a [rows, cols] table (e.g. SQNR per layer x expert), NaN cells grey.
* `bar_chart_png`: per-layer routing shares, one bar per expert, optionally beside a reference.

Canvases are uint8 arrays [H, W, 3], indexed [y, x], origin top-left.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)  # text
NAN_GREY = (160, 160, 160)  # heatmap cells with no value (e.g. an expert that saw no tokens)
AXIS_GREY = (200, 200, 200)
BAR_COLOR = (31, 119, 180)  # candidate series
REFERENCE_COLOR = (255, 127, 14)  # reference series: blue/orange stay distinct for colour-blind readers

# viridis sampled at 0, 1/7, ..., 1; linear interpolation between anchors keeps it monotone in lightness.
VIRIDIS = np.array(
    [(68, 1, 84), (70, 50, 126), (54, 92, 141), (39, 127, 142),
     (31, 161, 135), (74, 193, 109), (160, 218, 57), (253, 231, 37)],
    dtype=np.float64,
)

GLYPH_W, GLYPH_H = 5, 7
_ADVANCE = GLYPH_W + 1  # one blank column between glyphs, in font pixels
_MARGIN = 8

# 5x7 glyphs, rows top to bottom, '#' = ink. Lower case is drawn with the capitals: labels are
# short and a second alphabet would double this table for no gain in legibility at 5x7.
_GLYPH_ROWS: dict[str, str] = {
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.", "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####", "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.", "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.", "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.", "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "A": ".###. #...# #...# #...# ##### #...# #...#", "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.", "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####", "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####", "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.", "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#", "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#", "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.", "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#", "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.", "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.", "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.", "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..", "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    " ": "..... ..... ..... ..... ..... ..... .....", ".": "..... ..... ..... ..... ..... .##.. .##..",
    "-": "..... ..... ..... ##### ..... ..... .....", "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....", "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.", ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##", ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    "=": "..... ..... ##### ..... ##### ..... .....", "_": "..... ..... ..... ..... ..... ..... #####",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.", ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
}
FONT: dict[str, np.ndarray] = {
    ch: np.array([[c == "#" for c in row] for row in rows.split()], dtype=bool) for ch, rows in _GLYPH_ROWS.items()
}


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Encode an [H, W, 3] uint8 image as PNG and write it under a temporary name, then rename.

    Filter type 0 on every row: adaptive filters shrink photos, but these figures are flat
    colour that zlib already compresses well. The rename means a report directory never holds
    a truncated figure, even if the process dies mid-write.
    """
    path = Path(path)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"write_png: got shape {tuple(rgb.shape)}, expected a non-empty [H, W, 3] image")
    if rgb.dtype != np.uint8:
        raise ValueError(f"write_png: got dtype {rgb.dtype}, expected uint8")
    height, width = rgb.shape[:2]
    rows = np.ascontiguousarray(rgb).reshape(height, width * 3)
    raw = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rows], axis=1)  # filter byte 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 (RGB), no interlace
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
            + chunk(b"IEND", b""))
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def canvas(height: int, width: int) -> np.ndarray:
    """A white [height, width, 3] uint8 canvas."""
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[:] = BACKGROUND
    return out


def text_size(text: str, scale: int) -> tuple[int, int]:
    """(width, height) in pixels of `text` drawn by `draw_text` at `scale`, without the trailing gap."""
    if not text:
        return 0, GLYPH_H * scale
    return (len(text) * _ADVANCE - 1) * scale, GLYPH_H * scale


def draw_text(canvas: np.ndarray, x: int, y: int, text: str, scale: int, color: tuple[int, int, int]) -> None:
    """Draw `text` with its top-left corner at (x, y), each font pixel a scale x scale block.

    Letters without a glyph fall back to their capital, anything else to '?', so a label never
    silently loses characters. Parts outside the canvas are clipped, not an error.
    """
    if scale < 1:
        raise ValueError(f"draw_text: got scale {scale}, expected an integer >= 1")
    height, width = canvas.shape[:2]
    for i, ch in enumerate(text):
        glyph = FONT[ch] if ch in FONT else FONT.get(ch.upper(), FONT["?"])
        block = np.kron(glyph, np.ones((scale, scale), dtype=bool))
        gx, gy = x + i * _ADVANCE * scale, y
        x0, y0 = max(gx, 0), max(gy, 0)
        x1, y1 = min(gx + block.shape[1], width), min(gy + block.shape[0], height)
        if x0 >= x1 or y0 >= y1:
            continue
        mask = block[y0 - gy:y1 - gy, x0 - gx:x1 - gx]
        canvas[y0:y1, x0:x1][mask] = color


def colormap(t: np.ndarray) -> np.ndarray:
    """Map t in [0, 1] (clipped) to uint8 RGB [..., 3] by linear interpolation between VIRIDIS anchors.

    NaN maps to the low end so the lookup never indexes with garbage; callers paint NaN cells grey.
    """
    pos = np.clip(np.nan_to_num(np.asarray(t, dtype=np.float64), nan=0.0), 0.0, 1.0) * (len(VIRIDIS) - 1)
    low = np.minimum(np.floor(pos).astype(np.int64), len(VIRIDIS) - 2)
    frac = (pos - low)[..., None]
    return np.rint(VIRIDIS[low] * (1.0 - frac) + VIRIDIS[low + 1] * frac).astype(np.uint8)


def format_value(value: float) -> str:
    """Three significant digits, the precision a colour can convey anyway."""
    return "nan" if math.isnan(value) else f"{value:.3g}"


def _normalize(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Scale to [0, 1] over the finite values; returns (t, min, max).

    A constant (or single-valued) table has no range to divide by: it maps to the middle colour.
    +/-inf (e.g. the SQNR of an exactly representable expert) clip to the ends.
    """
    finite = np.isfinite(values)
    if not finite.any():
        return np.full(values.shape, 0.5), math.nan, math.nan
    lo, hi = float(values[finite].min()), float(values[finite].max())
    with np.errstate(invalid="ignore", divide="ignore"):
        if hi > lo:
            t = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
        else:
            t = np.where(values > hi, 1.0, np.where(values < lo, 0.0, 0.5))
    return t, lo, hi


def _tick_step(extent: int, label_len: int, scale: int) -> int:
    """Label every k-th row/column so labels `label_len` pixels long do not overlap cells `extent` wide."""
    return max(1, math.ceil((label_len + 2 * scale) / max(extent, 1)))  # two font pixels between labels


def heatmap_png(path: Path, values: np.ndarray, title: str, row_label: str = "layer", col_label: str = "expert",
                value_label: str = "", cell: int = 24) -> None:
    """Draw values [rows, cols] as cells of `cell` pixels, with a colour bar, and write a PNG.

    Layout, top to bottom: title; the column axis name; column indices; the grid, with row
    indices on its left (the row axis name above them) and the colour bar on its right,
    max at the top, min at the bottom, `value_label` above it. Indices are thinned to every
    k-th when they would be wider than a cell.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"heatmap_png: got shape {values.shape}, expected a non-empty [rows, cols] array")
    if cell < 1:
        raise ValueError(f"heatmap_png: got cell {cell}, expected >= 1")
    rows, cols = values.shape
    t, lo, hi = _normalize(values)
    title_s, tick_s = 2, 2 if cell >= 16 else 1
    line = GLYPH_H * tick_s + 4

    row_tick_w = max(text_size(str(rows - 1), tick_s)[0], text_size(row_label, tick_s)[0])
    grid_x = _MARGIN + row_tick_w + 6
    grid_y = _MARGIN + GLYPH_H * title_s + 6 + 2 * line
    grid_w, grid_h = cols * cell, rows * cell
    bar_x, bar_w = grid_x + grid_w + 12, 16
    bar_h = max(grid_h, 4 * line)  # room for both labels even for a single-row table
    labels = [format_value(hi), format_value(lo), value_label]
    width = max(bar_x + bar_w + 6 + max(text_size(s, tick_s)[0] for s in labels) + _MARGIN,
                _MARGIN * 2 + text_size(title, title_s)[0])
    height = grid_y + bar_h + _MARGIN
    img = canvas(height, width)

    draw_text(img, _MARGIN, _MARGIN, title, title_s, INK)
    draw_text(img, grid_x + (grid_w - text_size(col_label, tick_s)[0]) // 2, grid_y - 2 * line, col_label, tick_s, INK)
    draw_text(img, _MARGIN, grid_y - line, row_label, tick_s, INK)

    cells = colormap(t)
    cells[np.isnan(values)] = NAN_GREY
    img[grid_y:grid_y + grid_h, grid_x:grid_x + grid_w] = np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)

    col_step = _tick_step(cell, text_size(str(cols - 1), tick_s)[0], tick_s)
    for c in range(0, cols, col_step):
        w = text_size(str(c), tick_s)[0]
        draw_text(img, grid_x + c * cell + (cell - w) // 2, grid_y - line, str(c), tick_s, INK)
    row_step = _tick_step(cell, GLYPH_H * tick_s, tick_s)
    for r in range(0, rows, row_step):
        w, h = text_size(str(r), tick_s)
        draw_text(img, grid_x - 6 - w, grid_y + r * cell + (cell - h) // 2, str(r), tick_s, INK)

    # Colour bar: top row is t = 1, bottom row t = 0.
    ramp = colormap(np.linspace(1.0, 0.0, bar_h))
    img[grid_y:grid_y + bar_h, bar_x:bar_x + bar_w] = ramp[:, None, :]
    label_x = bar_x + bar_w + 6
    draw_text(img, label_x, grid_y, labels[0], tick_s, INK)
    draw_text(img, label_x, grid_y + bar_h - GLYPH_H * tick_s, labels[1], tick_s, INK)
    draw_text(img, bar_x, grid_y - line, value_label, tick_s, INK)
    write_png(path, img)


def _as_rows(values: np.ndarray | Sequence[np.ndarray], name: str) -> list[np.ndarray]:
    """[rows, cols] array or a list of per-layer 1-D arrays -> list of float64 1-D arrays."""
    if isinstance(values, np.ndarray):
        if values.ndim != 2:
            raise ValueError(f"bar_chart_png: got {name} of shape {values.shape}, expected [rows, cols]")
        return [row.astype(np.float64) for row in values]
    rows = [np.asarray(row, dtype=np.float64) for row in values]
    for i, row in enumerate(rows):
        if row.ndim != 1:
            raise ValueError(f"bar_chart_png: got {name}[{i}] of shape {row.shape}, expected a 1-D array")
    return rows


def bar_chart_png(path: Path, values: np.ndarray | Sequence[np.ndarray], title: str,
                  reference: np.ndarray | Sequence[np.ndarray] | None = None, row_label: str = "layer",
                  col_label: str = "expert", value_label: str = "share", label: str = "candidate",
                  reference_label: str = "reference", bar: int = 6, panel: int = 40) -> None:
    """Routing histogram: one panel per layer (row), one bar per expert, height = share; write a PNG.

    Every panel shares one vertical scale, the largest share anywhere, so layers compare at a
    glance; that maximum is printed in the legend. With `reference` (same layout as `values`),
    each expert gets the reference bar on its left and the candidate bar on its right.
    Negative or NaN shares draw no bar. Layers may have different numbers of experts.
    """
    series = _as_rows(values, "values")
    refs = _as_rows(reference, "reference") if reference is not None else None
    if not series:
        raise ValueError("bar_chart_png: got no rows, expected at least one layer")
    if refs is not None and [len(r) for r in refs] != [len(s) for s in series]:
        raise ValueError(f"bar_chart_png: got reference lengths {[len(r) for r in refs]}, "
                         f"expected the same as values {[len(s) for s in series]}")
    if bar < 1 or panel < 1:
        raise ValueError(f"bar_chart_png: got bar {bar}, panel {panel}, expected both >= 1")

    finite = [v[np.isfinite(v)] for v in series + (refs or [])]
    vmax = max((float(v.max()) for v in finite if v.size), default=0.0)
    scale_max = vmax if vmax > 0 else 1.0  # nothing positive to show: any scale draws empty panels

    s = 1  # tick labels at scale 1 keep panels dense; the title is scale 2
    line = GLYPH_H * s + 4
    slot = bar * (2 if refs is not None else 1) + 2
    experts = max(len(v) for v in series)
    label_w = max(text_size(str(len(series) - 1), s)[0], text_size(row_label, s)[0])
    plot_x = _MARGIN + label_w + 6
    plot_w = max(experts * slot, 1)
    legend_y = _MARGIN + GLYPH_H * 2 + 6
    plot_y = legend_y + 3 * line  # legend, scale note, row axis name
    panel_gap = 4
    plot_h = len(series) * (panel + panel_gap)
    swatch = GLYPH_H * s
    legend = [(label, BAR_COLOR)] + ([(reference_label, REFERENCE_COLOR)] if refs is not None else [])
    legend_w = sum(swatch + 4 + text_size(t, s)[0] + 12 for t, _ in legend)
    scale_text = f"full height = {format_value(vmax if vmax > 0 else math.nan)} {value_label}".rstrip()
    width = _MARGIN + max(plot_x - _MARGIN + plot_w, text_size(title, 2)[0], legend_w,
                          text_size(scale_text, s)[0], text_size(col_label, s)[0]) + _MARGIN
    height = plot_y + plot_h + 2 * line + _MARGIN
    img = canvas(height, width)

    draw_text(img, _MARGIN, _MARGIN, title, 2, INK)
    x = _MARGIN
    for text, color in legend:
        img[legend_y:legend_y + swatch, x:x + swatch] = color
        draw_text(img, x + swatch + 4, legend_y, text, s, INK)
        x += swatch + 4 + text_size(text, s)[0] + 12
    draw_text(img, _MARGIN, legend_y + line, scale_text, s, INK)
    draw_text(img, _MARGIN, plot_y - line, row_label, s, INK)

    for r, shares in enumerate(series):
        base = plot_y + r * (panel + panel_gap) + panel  # first row below the bars
        img[base, plot_x:plot_x + len(shares) * slot] = AXIS_GREY
        w = text_size(str(r), s)[0]
        draw_text(img, plot_x - 6 - w, base - GLYPH_H * s, str(r), s, INK)
        pairs = [(refs[r], REFERENCE_COLOR, 0), (shares, BAR_COLOR, bar)] if refs is not None else [
            (shares, BAR_COLOR, 0)]
        for row, color, offset in pairs:
            with np.errstate(invalid="ignore"):
                heights = np.rint(np.clip(np.nan_to_num(row / scale_max, nan=0.0), 0.0, 1.0) * panel).astype(int)
            for e, h in enumerate(heights):
                if h > 0:
                    x0 = plot_x + e * slot + offset
                    img[base - h:base, x0:x0 + bar] = color

    axis_y = plot_y + plot_h
    idx_step = _tick_step(slot, text_size(str(experts - 1), s)[0], s)
    for e in range(0, experts, idx_step):
        w = text_size(str(e), s)[0]
        draw_text(img, plot_x + e * slot + (slot - 2 - w) // 2, axis_y, str(e), s, INK)
    draw_text(img, plot_x + (plot_w - text_size(col_label, s)[0]) // 2, axis_y + line, col_label, s, INK)
    write_png(path, img)
