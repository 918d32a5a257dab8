"""scoutq.evaluate.plots: figure contents checked on the matplotlib objects, PNG files on their bytes."""

from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from scoutq.evaluate import plots

PIL_Image = pytest.importorskip("PIL.Image")  # a matplotlib dependency: always there when matplotlib is

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SQNR = np.array([[18.2, np.nan, 17.1], [16.0, 19.5, np.inf]])


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of every chunk, each CRC checked."""
    assert data[:8] == PNG_SIGNATURE
    pos, chunks = 8, []
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert int.from_bytes(data[pos + 8 + length:pos + 12 + length], "big") == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    return chunks


def load_rgb(path: Path) -> np.ndarray:
    with PIL_Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_heatmap_figure_is_labelled() -> None:
    fig = plots.heatmap_figure(SQNR, "Expert output SQNR", value_label="SQNR (dB)", missing_label="no tokens routed",
                               row_ids=[1, 3])
    assert isinstance(fig, Figure)
    ax, bar = fig.axes  # the heatmap and its colour bar
    assert ax.get_title() == "Expert output SQNR"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("expert", "layer")
    assert list(ax.get_xticks()) == [0, 1, 2]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "3"]  # the model's layer numbers
    assert bar.get_ylabel() == "SQNR (dB)"
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["grey: no tokens routed"]


def test_heatmap_colour_scale_nan_and_inf() -> None:
    image = plots.heatmap_figure(SQNR, "t").axes[0].images[0]
    shown = image.get_array()
    # NaN is masked, so drawn in the "bad" colour; +inf is clipped to the top of the finite range.
    assert shown.mask.tolist() == [[False, True, False], [False, False, False]]
    assert (image.norm.vmin, image.norm.vmax) == (16.0, 19.5)
    assert shown[1, 2] == 19.5
    np.testing.assert_allclose(image.cmap.get_bad(), (0.6, 0.6, 0.6, 1.0))
    # no NaN, no legend
    assert not plots.heatmap_figure(np.ones((2, 2)), "t").legends


def test_heatmap_constant_and_all_nan(tmp_path: Path) -> None:
    norm = plots.heatmap_figure(np.full((3, 4), 2.5), "constant").axes[0].images[0].norm
    assert norm.vmin < 2.5 < norm.vmax and norm(2.5) == pytest.approx(0.5)  # the middle colour
    plots.heatmap_png(tmp_path / "n.png", np.full((2, 2), np.nan), "all nan")
    plots.heatmap_png(tmp_path / "i.png", np.array([[np.inf, -np.inf]]), "only inf")
    assert all(load_rgb(tmp_path / name).ndim == 3 for name in ("n.png", "i.png"))


@pytest.mark.parametrize("values", [np.zeros(3), np.zeros((0, 4)), np.zeros((2, 2, 2))])
def test_heatmap_rejects_bad_shapes(values: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"non-empty \[rows, cols\]"):
        plots.heatmap_png(tmp_path / "bad.png", values, "bad")
    with pytest.raises(ValueError, match="row_ids"):
        plots.heatmap_figure(np.zeros((2, 2)), "t", row_ids=[0])
    assert not list(tmp_path.iterdir())


def test_heatmap_png_is_valid_deterministic_and_shows_grey(tmp_path: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for path in (a, b):
        plots.heatmap_png(path, SQNR, "SQNR", value_label="SQNR (dB)", missing_label="no tokens")
    data = a.read_bytes()
    assert data == b.read_bytes()
    chunks = png_chunks(data)
    width, height = int.from_bytes(chunks[0][1][:4], "big"), int.from_bytes(chunks[0][1][4:8], "big")
    assert 300 <= width <= 3000 and 200 <= height <= 3000
    assert b"Software" not in data and b"matplotlib" not in data.lower()  # nothing version-dependent
    rgb = load_rgb(a)
    assert rgb.shape == (height, width, 3)
    assert np.all(rgb == 153, axis=-1).sum() > 1000  # the NaN cell, painted 0.6 grey
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temporary left behind


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "h.png"
    plots.heatmap_png(path, SQNR, "first")
    before = path.read_bytes()

    def broken(*_args: object, **_kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plots.heatmap_png(path, SQNR, "second")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["h.png"]


def bar_heights(ax: object, color: str) -> list[float]:
    from matplotlib.colors import to_rgba

    return [round(p.get_height(), 6) for p in ax.patches if p.get_facecolor() == to_rgba(color)]  # type: ignore[attr-defined]


def test_bar_chart_figure_is_labelled_with_reference() -> None:
    shares = np.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    reference = np.array([[0.4, 0.3, 0.2, 0.1], [0.5, 0.5, 0.0, 0.0]])
    fig = plots.bar_chart_figure(shares, "Routing", reference=reference, row_ids=[1, 3])
    assert fig.get_suptitle() == "Routing"
    assert (fig.get_supxlabel(), fig.get_supylabel()) == ("expert", "share of tokens")
    assert [ax.get_title() for ax in fig.axes] == ["layer 1", "layer 3"]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["reference", "candidate"]
    for ax, cand, ref in zip(fig.axes, shares, reference, strict=True):
        assert bar_heights(ax, plots.BAR_COLOR) == cand.tolist()
        assert bar_heights(ax, plots.REFERENCE_COLOR) == ref.tolist()
        assert list(ax.get_xticks()) == [0, 1, 2, 3]
        # each expert's reference bar sits just left of its candidate bar
        ref_x = [p.get_x() for p in ax.patches[:4]]
        cand_x = [p.get_x() for p in ax.patches[4:]]
        assert all(r < c < r + 1 for r, c in zip(ref_x, cand_x, strict=True))
    assert fig.axes[0].get_shared_y_axes().joined(fig.axes[0], fig.axes[1])  # one scale for every layer


def test_bar_chart_ragged_nan_and_errors(tmp_path: Path) -> None:
    fig = plots.bar_chart_figure([np.array([0.5, 0.5, 0.0]), np.array([np.nan, 1.0])], "ragged")
    assert [len(ax.patches) for ax in fig.axes] == [3, 2]
    assert bar_heights(fig.axes[1], plots.BAR_COLOR) == [0.0, 1.0]  # NaN draws no bar
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["candidate"]
    plots.bar_chart_png(tmp_path / "zeros.png", np.zeros((2, 3)), "no tokens")
    with pytest.raises(ValueError, match="reference lengths"):
        plots.bar_chart_png(tmp_path / "x.png", np.ones((2, 3)), "x", reference=[np.ones(3)])
    with pytest.raises(ValueError, match="at least one expert"):
        plots.bar_chart_png(tmp_path / "x.png", [], "x")
    with pytest.raises(ValueError, match=r"\[rows, cols\]"):
        plots.bar_chart_png(tmp_path / "x.png", np.ones(3), "x")
    assert [p.name for p in tmp_path.iterdir()] == ["zeros.png"]


def test_bar_chart_png_is_valid_and_deterministic(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shares, reference = rng.dirichlet(np.ones(8), size=4), rng.dirichlet(np.ones(8), size=4)
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in paths:
        plots.bar_chart_png(path, shares, "routing", reference=reference)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    height, width, _ = load_rgb(paths[0]).shape
    assert 600 <= width <= 4000 and 200 <= height <= 2000
    png_chunks(paths[0].read_bytes())


def test_plots_leave_pyplot_alone(tmp_path: Path) -> None:
    """A fresh interpreter: drawing must not import pyplot, which would pick and pin a global backend."""
    # Loaded from its file so the subprocess skips scoutq's package imports (torch): seconds saved.
    code = (
        "import importlib.util, sys, numpy as np\n"
        f"spec = importlib.util.spec_from_file_location('plots', {plots.__file__!r})\n"
        "plots = importlib.util.module_from_spec(spec); spec.loader.exec_module(plots)\n"
        f"plots.heatmap_png({str(tmp_path / 'h.png')!r}, np.eye(3), 't')\n"
        f"plots.bar_chart_png({str(tmp_path / 'r.png')!r}, np.eye(3), 't')\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG_SIGNATURE
