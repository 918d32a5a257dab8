"""PNG figures for `scoutq eval --plots`, drawn with matplotlib.

Two pictures answer the questions a quantized MoE checkpoint raises:

* a heatmap of MoE layers x experts (e.g. weight or output SQNR in dB), which shows at a glance
  whether the error sits in a few experts, a few layers, or everywhere; cells with no value
  (an expert that received no evaluation tokens) are grey and say so in a legend;
* a routing histogram, one panel per MoE layer, giving each expert's share of the routed
  tokens, the candidate's bars beside the reference's, to spot experts the quantization
  starved or flooded.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never pyplot, so a
caller's own backend and pyplot state are left alone. `heatmap_figure` and `bar_chart_figure`
return the Figure (for tests or notebooks); the `_png` functions save it. The PNGs carry no
version or date metadata, so equal inputs give equal bytes, and appear atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import PercentFormatter

from scoutq.checkpoint.writer import atomic_path

MISSING_GREY = "0.6"
BAR_COLOR = "tab:blue"  # candidate
REFERENCE_COLOR = "tab:orange"  # blue/orange stay apart for colour-blind readers
DPI = 100
MAX_TICKS = 24  # beyond this many heatmap rows/columns, label every k-th so labels do not collide


def _ticks(count: int, limit: float = MAX_TICKS) -> np.ndarray:
    return np.arange(0, count, max(1, math.ceil(count / limit)))


def _ids(row_ids: Sequence[int] | None, rows: int, name: str) -> list[int]:
    if row_ids is None:
        return list(range(rows))
    if len(row_ids) != rows:
        raise ValueError(f"{name}: got {len(row_ids)} row_ids for {rows} rows")
    return [int(i) for i in row_ids]


def heatmap_figure(values: np.ndarray, title: str, row_label: str = "layer", col_label: str = "expert",
                   value_label: str = "value", *, missing_label: str = "no data",
                   row_ids: Sequence[int] | None = None) -> Figure:
    """A [rows, cols] table as coloured cells with a labelled colour bar.

    The colour range spans the finite values; +/-inf (an exactly reproduced expert has infinite
    SQNR) take the end colours rather than hiding the finite spread. NaN cells are grey, and a
    legend naming `missing_label` appears only when some exist. `row_ids` label the rows (e.g.
    the model's layer numbers when only some layers are MoE).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"heatmap: got shape {values.shape}, expected a non-empty [rows, cols] array")
    rows, cols = values.shape
    ids = _ids(row_ids, rows, "heatmap")
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi == lo:  # one value: centre it so its cells take the middle colour, not an end
        lo, hi = lo - 0.5, hi + 0.5
    shown = np.ma.masked_invalid(np.clip(values, lo, hi))  # clip keeps NaN, so only NaN is masked

    size = (min(3.2 + 0.42 * cols, 18.0), min(2.4 + 0.34 * rows, 14.0))
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    # with_extremes copies: the registered viridis, which the caller may use too, stays unchanged.
    image = ax.imshow(shown, cmap=colormaps["viridis"].with_extremes(bad=MISSING_GREY),
                      norm=Normalize(lo, hi), aspect="auto", interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_xticks(_ticks(cols))
    y_ticks = _ticks(rows)
    ax.set_yticks(y_ticks, [str(ids[t]) for t in y_ticks])
    fig.colorbar(image, ax=ax, label=value_label, aspect=max(20.0, 4 * size[1]))  # tall maps: keep the bar slim
    if np.isnan(values).any():
        fig.legend(handles=[Patch(facecolor=MISSING_GREY, edgecolor="0.3", label=f"grey: {missing_label}")],
                   loc="outside lower right", frameon=False)
    return fig


def _as_rows(values: np.ndarray | Sequence[np.ndarray], name: str) -> list[np.ndarray]:
    """[rows, cols] array or a list of per-layer 1-D arrays -> list of float64 1-D arrays."""
    if isinstance(values, np.ndarray):
        if values.ndim != 2:
            raise ValueError(f"bar chart: got {name} of shape {values.shape}, expected [rows, cols]")
        return [row.astype(np.float64) for row in values]
    rows = [np.asarray(row, dtype=np.float64) for row in values]
    for i, row in enumerate(rows):
        if row.ndim != 1:
            raise ValueError(f"bar chart: got {name}[{i}] of shape {row.shape}, expected a 1-D array")
    return rows


def bar_chart_figure(values: np.ndarray | Sequence[np.ndarray], title: str,
                     reference: np.ndarray | Sequence[np.ndarray] | None = None, row_label: str = "layer",
                     col_label: str = "expert", value_label: str = "share of tokens", label: str = "candidate",
                     reference_label: str = "reference", *, row_ids: Sequence[int] | None = None) -> Figure:
    """Routing histogram: one panel per row (MoE layer), one bar per expert (its share of tokens).

    Panels share the vertical scale so layers compare directly. With `reference` (same layout
    as `values`) each expert gets the reference bar on its left, the candidate's on its right.
    NaN or infinite shares draw no bar. Layers may have different numbers of experts.
    """
    series = _as_rows(values, "values")
    refs = _as_rows(reference, "reference") if reference is not None else None
    if not series or not all(len(s) for s in series):
        raise ValueError("bar chart: got no rows or an empty row, expected at least one expert per layer")
    if refs is not None and [len(r) for r in refs] != [len(s) for s in series]:
        raise ValueError(f"bar chart: got reference lengths {[len(r) for r in refs]}, "
                         f"expected the same as values {[len(s) for s in series]}")
    ids = _ids(row_ids, len(series), "bar chart")
    experts = max(len(s) for s in series)
    ncols = min(len(series), max(1, 64 // max(experts, 16)))  # wide layers get fewer panels per row
    nrows = math.ceil(len(series) / ncols)
    panel_w = min(max(3.2, 0.2 * experts * (1.6 if refs is not None else 1.0)), 16.0)
    fig = Figure(figsize=(panel_w * ncols + 0.8, 2.2 * nrows + 1.2), dpi=DPI, layout="constrained")

    first = None
    for i, shares in enumerate(series):
        ax = fig.add_subplot(nrows, ncols, i + 1, sharey=first)
        if first is None:
            first = ax
        x = np.arange(len(shares))
        bars = [(shares, BAR_COLOR, label)]
        if refs is not None:
            bars = [(refs[i], REFERENCE_COLOR, reference_label), (shares, BAR_COLOR, label)]
        width = 0.8 / len(bars)
        for k, (heights, color, name) in enumerate(bars):
            ax.bar(x + (k - (len(bars) - 1) / 2) * width, np.where(np.isfinite(heights), heights, 0.0),
                   width, color=color, label=name)
        ax.set_title(f"{row_label} {ids[i]}", fontsize="medium")
        ax.set_xticks(_ticks(len(shares), panel_w * 3))  # about a third of an inch per expert label
        ax.set_xlim(-0.6, len(shares) - 0.4)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
        ax.set_axisbelow(True)
        ax.grid(axis="y", alpha=0.3)
        if i % ncols:
            ax.tick_params(labelleft=False)
    fig.suptitle(title)
    fig.supxlabel(col_label)
    fig.supylabel(value_label)
    handles, names = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside upper right", ncols=len(names), frameon=False)
    return fig


def save_png(fig: Figure, path: Path) -> None:
    """Render `fig` to PNG at `path` through a temporary file in the same folder, then rename.

    The rename means a report folder never holds a half-written figure, even if the process
    dies mid-write; metadata Software=None drops the matplotlib version, keeping bytes stable.
    """
    FigureCanvasAgg(fig)  # attaches itself to fig: Agg rendering without pyplot or a global backend
    with atomic_path(path) as partial:
        fig.savefig(partial, format="png", dpi=DPI, metadata={"Software": None})


def heatmap_png(path: Path, values: np.ndarray, title: str, row_label: str = "layer", col_label: str = "expert",
                value_label: str = "value", *, missing_label: str = "no data",
                row_ids: Sequence[int] | None = None) -> None:
    """`heatmap_figure` written to `path` as PNG."""
    save_png(heatmap_figure(values, title, row_label, col_label, value_label, missing_label=missing_label,
                            row_ids=row_ids), path)


def bar_chart_png(path: Path, values: np.ndarray | Sequence[np.ndarray], title: str,
                  reference: np.ndarray | Sequence[np.ndarray] | None = None, row_label: str = "layer",
                  col_label: str = "expert", value_label: str = "share of tokens", label: str = "candidate",
                  reference_label: str = "reference", *, row_ids: Sequence[int] | None = None) -> None:
    """`bar_chart_figure` written to `path` as PNG."""
    save_png(bar_chart_figure(values, title, reference, row_label, col_label, value_label, label, reference_label,
                              row_ids=row_ids), path)
