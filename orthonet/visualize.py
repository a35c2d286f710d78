"""Plotting helpers shared by ``ortho_show`` and the prediction overview: slices, overlays, montages, bar charts.

Why one module: the data viewer and the prediction report must draw a case the same way — the same label colours,
the same slice choice, the same millimetre-true pixel aspect — and take plain arrays plus geometry, so any stage can
call them with whatever it has (a label, a probability map, a saliency map). Matplotlib is used through its
object API with the Agg canvas: no global pyplot state, safe in worker processes and on machines without a display.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from orthonet.fileio import atomic_path
from orthonet.imageio import Geometry

PathLike = Union[str, Path]

#: Size of one view panel and of the diagnosis side panel, in inches (pixels = inches * dpi).
PANEL_INCHES = (4.0, 4.8)
SIDE_INCHES = 3.2

#: Colours for label values 1, 2, 3, ... (cycled); background is transparent. Distinct, colour-blind friendly first.
LABEL_COLORS = np.array([
    (0.90, 0.62, 0.00), (0.34, 0.71, 0.91), (0.00, 0.62, 0.45), (0.94, 0.89, 0.26), (0.00, 0.45, 0.70),
    (0.84, 0.37, 0.00), (0.80, 0.47, 0.65), (0.60, 0.60, 0.60), (0.89, 0.10, 0.11), (0.55, 0.34, 0.29),
    (0.58, 0.40, 0.74), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81), (1.00, 0.50, 0.75), (0.17, 0.63, 0.17),
    (0.68, 0.78, 0.91), (1.00, 0.73, 0.47), (0.60, 0.87, 0.54), (1.00, 0.60, 0.59), (0.77, 0.69, 0.84),
])


def label_color(value: int) -> Tuple[float, float, float]:
    """RGB colour of a label value (value 0 has no colour: it is drawn transparent)."""
    return tuple(LABEL_COLORS[(int(value) - 1) % len(LABEL_COLORS)])


def label_to_rgba(label2d: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(rows, cols, 4) float image: each label value in its colour, background fully transparent."""
    label2d = np.asarray(label2d).astype(np.int64)
    rgba = np.zeros(label2d.shape + (4,), dtype=np.float32)
    for value in np.unique(label2d):
        if value <= 0:
            continue
        mask = label2d == value
        rgba[mask, :3] = label_color(value)
        rgba[mask, 3] = alpha
    return rgba


# ------------------------------------------------------------------------------------------------------------
# geometry of a displayed slice
# ------------------------------------------------------------------------------------------------------------
def slice_axis(geometry: Geometry) -> int:
    """Numpy axis to slice along: the thickest spacing (a scanner's slice direction); axis 0 on ties."""
    spacing = np.asarray(geometry.array_spacing, dtype=np.float64)
    return int(np.argmax(spacing >= spacing.max() * (1 - 1e-6)))


def in_plane_spacing(geometry: Geometry, axis: int) -> Tuple[float, float]:
    """(row, column) pixel size in mm of a slice taken along numpy ``axis``."""
    rest = [s for i, s in enumerate(geometry.array_spacing) if i != axis]
    return float(rest[0]), float(rest[1])


def take_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2D slice ``index`` of a (z, y, x) volume along numpy ``axis``."""
    return np.take(volume, int(index), axis=axis)


def physical_to_index(geometry: Geometry, point_mm: Sequence[float]) -> np.ndarray:
    """Continuous numpy index (z, y, x) of a physical point (x, y, z in mm); inverse of the image's affine."""
    affine = geometry.index_to_physical()
    return np.linalg.solve(affine[:3, :3], np.asarray(point_mm, dtype=np.float64) - affine[:3, 3])


def label_centroid_mm(label: np.ndarray, geometry: Geometry) -> Optional[np.ndarray]:
    """Physical centre (mm) of all foreground voxels (label > 0), or None for an empty label."""
    idx = np.argwhere(np.asarray(label) > 0)
    if idx.size == 0:
        return None
    centre = idx.mean(0)
    return geometry.index_to_physical()[:3] @ np.append(centre, 1.0)


def slice_through(geometry: Geometry, axis: int, point_mm: Optional[Sequence[float]]) -> int:
    """Index of the slice (along ``axis``) nearest to a physical point; the middle slice if there is no point."""
    n = geometry.array_shape[axis]
    if point_mm is None:
        return n // 2
    return int(np.clip(np.round(physical_to_index(geometry, point_mm)[axis]), 0, n - 1))


def intensity_window(image: np.ndarray, percentiles: Tuple[float, float] = (0.5, 99.5)) -> Tuple[float, float]:
    """Display window from robust percentiles of the finite voxels (so one bright artefact does not blank all)."""
    finite = np.asarray(image)[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, percentiles)
    return (float(lo), float(hi)) if hi > lo else (float(lo), float(lo) + 1.0)


# ------------------------------------------------------------------------------------------------------------
# one panel
# ------------------------------------------------------------------------------------------------------------
@dataclass
class ViewPanel:
    """What to draw for one view: arrays on the view's own grid, plus optional overlays.

    ``image`` is (z, y, x) or (C, z, y, x) (channel 0 is shown). ``label``, ``probability`` (0..1) and
    ``saliency`` (any scale, normalised per slice) are (z, y, x) on the same grid. ``slice_index`` None means the
    slice through ``marker_mm`` if given, else the middle slice."""

    name: str
    image: np.ndarray
    geometry: Geometry
    label: Optional[np.ndarray] = None
    probability: Optional[np.ndarray] = None
    saliency: Optional[np.ndarray] = None
    slice_index: Optional[int] = None
    axis: Optional[int] = None
    marker_mm: Optional[Sequence[float]] = None

    def volume(self) -> np.ndarray:
        return self.image[0] if self.image.ndim == 4 else self.image

    def resolved_axis(self) -> int:
        return slice_axis(self.geometry) if self.axis is None else int(self.axis)

    def resolved_index(self) -> int:
        if self.slice_index is not None:
            return int(np.clip(self.slice_index, 0, self.geometry.array_shape[self.resolved_axis()] - 1))
        return slice_through(self.geometry, self.resolved_axis(), self.marker_mm)


def draw_view(ax, panel: ViewPanel, label_alpha: float = 0.45) -> List[int]:
    """Draw one panel's slice with its overlays on ``ax``, in millimetres; return the label values shown."""
    volume = panel.volume()
    axis, index = panel.resolved_axis(), panel.resolved_index()
    row_mm, col_mm = in_plane_spacing(panel.geometry, axis)
    image2d = take_slice(volume, axis, index)
    extent = (0.0, image2d.shape[1] * col_mm, image2d.shape[0] * row_mm, 0.0)
    vmin, vmax = intensity_window(volume)
    ax.imshow(np.nan_to_num(image2d, nan=vmin), cmap="gray", vmin=vmin, vmax=vmax, extent=extent,
              interpolation="nearest", aspect="equal")
    shown: List[int] = []
    if panel.label is not None:
        label2d = take_slice(panel.label, axis, index)
        ax.imshow(label_to_rgba(label2d, label_alpha), extent=extent, interpolation="nearest", aspect="equal")
        shown = [int(v) for v in np.unique(label2d) if v > 0]
    if panel.probability is not None:
        prob2d = np.clip(take_slice(panel.probability, axis, index).astype(np.float32), 0.0, 1.0)
        ax.imshow(np.ma.masked_less(prob2d, 0.05), cmap="magma", vmin=0.0, vmax=1.0, alpha=0.55, extent=extent,
                  interpolation="nearest", aspect="equal")
    if panel.saliency is not None:
        sal2d = np.abs(take_slice(panel.saliency, axis, index).astype(np.float32))
        peak = float(sal2d.max())
        if peak > 0:
            ax.imshow(np.ma.masked_less(sal2d / peak, 0.1), cmap="jet", vmin=0.0, vmax=1.0, alpha=0.45,
                      extent=extent, interpolation="bilinear", aspect="equal")
    if panel.marker_mm is not None:
        idx = physical_to_index(panel.geometry, panel.marker_mm)
        row, col = [v for i, v in enumerate(idx) if i != axis]
        if 0 <= row <= image2d.shape[0] - 1 and 0 <= col <= image2d.shape[1] - 1:
            ax.plot([(col + 0.5) * col_mm], [(row + 0.5) * row_mm], marker="+", color="cyan", markersize=12,
                    markeredgewidth=1.2)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_xticks([])
    ax.set_yticks([])
    thick = panel.geometry.array_spacing[axis]
    ax.set_title(panel.name, fontsize=11)
    ax.set_xlabel(f"slice {index + 1}/{volume.shape[axis]}  |  {row_mm:.2g}x{col_mm:.2g} mm, {thick:.2g} mm "
                  "slices", fontsize=7)
    return shown


def draw_legend(ax, values: Sequence[int], label_names: Mapping[int, str], max_entries: int = 16) -> None:
    """Colour legend for label values, below the panel."""
    values = sorted(set(int(v) for v in values))[:max_entries]
    if not values:
        return
    handles = [Patch(facecolor=label_color(v), edgecolor="none", label=label_names.get(v, str(v))) for v in values]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2, fontsize=6.5,
              frameon=False, handlelength=1.0, columnspacing=0.8, labelspacing=0.3)


# ------------------------------------------------------------------------------------------------------------
# diagnoses
# ------------------------------------------------------------------------------------------------------------
def _state(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "unknown"
    return "present" if float(value) >= 0.5 else "absent"


def draw_diagnosis_text(ax, diagnoses: Mapping[str, Optional[float]], title: str = "diagnoses") -> None:
    """One line per diagnosis: present (red), absent (green) or unknown (grey)."""
    colors = {"present": "#c0392b", "absent": "#1e8449", "unknown": "#7f8c8d"}
    ax.set_axis_off()
    ax.set_title(title, fontsize=11)
    n = max(len(diagnoses), 1)
    step = min(0.07, 0.9 / n)
    for i, (name, value) in enumerate(diagnoses.items()):
        state = _state(value)
        ax.text(0.02, 0.95 - i * step, name, fontsize=8, va="top", transform=ax.transAxes)
        ax.text(0.98, 0.95 - i * step, state, fontsize=8, va="top", ha="right", color=colors[state],
                fontweight="bold" if state == "present" else "normal", transform=ax.transAxes)
    if not diagnoses:
        ax.text(0.5, 0.5, "none declared", ha="center", fontsize=8, transform=ax.transAxes)


def draw_diagnosis_bars(ax, probabilities: Mapping[str, float], truth: Optional[Mapping[str, Optional[float]]] = None,
                        threshold: Union[float, Mapping[str, float]] = 0.5, title: str = "diagnoses") -> None:
    """Horizontal bars of predicted probabilities, a threshold tick per bar, and the truth (if known) as a dot."""
    names = list(probabilities)
    probs = np.array([float(probabilities[n]) for n in names])
    thresholds = np.array([float(threshold[n]) if isinstance(threshold, Mapping) else float(threshold)
                           for n in names])
    y = np.arange(len(names))[::-1]
    ax.barh(y, probs, color=["#c0392b" if p >= t else "#5d6d7e" for p, t in zip(probs, thresholds)], height=0.6)
    ax.scatter(thresholds, y, marker="|", s=120, color="black", zorder=3)
    if truth is not None:
        for yi, n in zip(y, names):
            state = _state(truth.get(n))
            if state != "unknown":
                ax.scatter([1.04], [yi], marker="o", s=20, clip_on=False,
                           color="#c0392b" if state == "present" else "#1e8449")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability" + ("  (dot: truth)" if truth is not None else ""), fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title, fontsize=11)


# ------------------------------------------------------------------------------------------------------------
# the montage
# ------------------------------------------------------------------------------------------------------------
def montage_size_px(n_panels: int, side_panel: bool, dpi: int = 100) -> Tuple[int, int]:
    """(width, height) in pixels of a montage with ``n_panels`` views (and the diagnosis panel)."""
    width = n_panels * PANEL_INCHES[0] + (SIDE_INCHES if side_panel else 0.0)
    return int(round(width * dpi)), int(round(PANEL_INCHES[1] * dpi))


def render_montage(panels: Sequence[ViewPanel], out_png: PathLike, title: str = "",
                   label_names: Optional[Mapping[int, str]] = None,
                   diagnoses: Optional[Mapping[str, Optional[float]]] = None,
                   probabilities: Optional[Mapping[str, float]] = None,
                   threshold: Union[float, Mapping[str, float]] = 0.5, dpi: int = 100) -> Path:
    """One row of view panels (+ a diagnosis panel) written atomically to ``out_png``.

    ``diagnoses`` (name -> 1/0/NaN) alone are listed as text; with ``probabilities`` they become a bar chart with
    the truth marked. The PNG is exactly :func:`montage_size_px` pixels."""
    if not panels:
        raise ValueError("render_montage needs at least one panel")
    side = diagnoses is not None or probabilities is not None
    width_px, height_px = montage_size_px(len(panels), side, dpi)
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    total_w = width_px / dpi
    pw, ph = PANEL_INCHES
    bottom, top = 0.27, 0.86
    for i, panel in enumerate(panels):
        ax = fig.add_axes((i * pw / total_w + 0.02 * pw / total_w, bottom, 0.96 * pw / total_w, top - bottom))
        shown = draw_view(ax, panel)
        if panel.label is not None:
            draw_legend(ax, shown, label_names or {})
    if side:
        x0 = len(panels) * pw / total_w
        if probabilities is not None:
            ax = fig.add_axes((x0 + 0.42 * SIDE_INCHES / total_w, bottom, 0.5 * SIDE_INCHES / total_w, top - bottom))
            draw_diagnosis_bars(ax, probabilities, diagnoses, threshold)
        else:
            ax = fig.add_axes((x0 + 0.04 * SIDE_INCHES / total_w, 0.08, 0.9 * SIDE_INCHES / total_w, top - 0.08))
            draw_diagnosis_text(ax, diagnoses or {})
    if title:
        fig.suptitle(title, fontsize=12, y=0.985)
    return save_figure(fig, out_png, dpi)


def save_figure(fig: Figure, out_png: PathLike, dpi: int = 100) -> Path:
    """Write a figure as PNG atomically (never a half-written file under the final name)."""
    out_png = Path(out_png)
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return out_png
