"""Writing diffusion samples so a person can judge them: NIfTI volumes in the view's own geometry and a PNG montage.

Why un-transpose: the model works on arrays in the plan's orientation (``transpose_forward`` applied, target
spacing). Written back in the view's original axis order with the target spacing (and, when known, the direction of
a real case of that view), a sample opens in any viewer the way the real scans do, next to them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from orthonet.fileio import atomic_path
from orthonet.imageio import Geometry, write_array

PathLike = Union[str, Path]
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def view_spacing_3d(plans: Dict, view: str, configuration: str) -> List[float]:
    """The configuration's target spacing as three numbers (numpy order, after transpose).

    2D configurations plan only the in-plane spacing; the slice axis takes the 3d_fullres spacing (or the view's
    median spacing), so a 2D sample can still be written as a one-slice volume with a sensible header.
    """
    vp = plans["views"][view]
    spacing = [float(s) for s in vp["configurations"][configuration]["spacing"]]
    if len(spacing) == 3:
        return spacing
    full = vp["configurations"].get("3d_fullres")
    if full is not None and len(full["spacing"]) == 3:
        return [float(full["spacing"][0])] + spacing
    median = vp.get("original_median_spacing")
    if median is not None and len(median) == 3:
        fwd = vp["transpose_forward"]
        return [float(median[fwd[0]])] + spacing
    return [1.0] + spacing


def untranspose(volume: np.ndarray, spacing: Sequence[float], transpose_backward: Sequence[int]):
    """A (z, y, x) array and its spacing in the plan's orientation -> the view's original numpy axis order."""
    back = [int(b) for b in transpose_backward]
    return np.ascontiguousarray(volume.transpose(back)), [float(spacing[b]) for b in back]


def write_sample_volumes(samples: np.ndarray, out_dir: PathLike, view: str, spacing: Sequence[float],
                         transpose_backward: Sequence[int] = (0, 1, 2), direction: Sequence[float] = IDENTITY,
                         prefix: str = "sample") -> List[Path]:
    """Write (N, C, z, y, x) samples (plan orientation) as ``{prefix}_{i:03d}_{view}_{c:04d}.nii.gz``.

    The names follow the dataset naming, so the files can be fed to orthonet's own tools. Origin is 0 (a sample is
    a patch with no place in the body).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, sample in enumerate(np.asarray(samples, dtype=np.float32)):
        for c, channel in enumerate(sample):
            arr, sp = untranspose(channel, spacing, transpose_backward)
            geom = Geometry(tuple(int(s) for s in arr.shape[::-1]), tuple(sp[::-1]), (0.0, 0.0, 0.0),
                            tuple(float(d) for d in direction))
            path = out_dir / f"{prefix}_{i:03d}_{view}_{c:04d}.nii.gz"
            write_array(arr, geom, path)
            written.append(path)
    return written


def montage_png(samples: np.ndarray, path: PathLike, spacing: Sequence[float], title: str = "",
                reference: Optional[np.ndarray] = None, n_slices: int = 6) -> Path:
    """PNG grid: one row per volume (real patches first, if given, then samples), ``n_slices`` evenly spaced
    slices along the plan's first axis (the view's slice direction), channel 0, one shared intensity window."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    samples = np.asarray(samples, dtype=np.float32)
    rows = [("sample", s[0]) for s in samples]
    if reference is not None and len(reference):
        rows = [("real", r[0]) for r in np.asarray(reference, dtype=np.float32)] + rows
    basis = np.concatenate([v.ravel() for label, v in rows if label == "real"] or [samples[:, 0].ravel()])
    lo, hi = np.percentile(basis, [1, 99]) if basis.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    depth = rows[0][1].shape[0]
    cols = max(1, min(n_slices, depth))
    idx = np.unique(np.linspace(0, depth - 1, cols + 2).round().astype(int)[1:-1]) if depth > cols else \
        np.arange(depth)
    aspect = float(spacing[-2]) / float(spacing[-1])
    fig, axes = plt.subplots(len(rows), len(idx), figsize=(1.8 * len(idx), 1.8 * len(rows) * min(3.0, aspect)),
                             squeeze=False)
    for r, (label, vol) in enumerate(rows):
        for c, z in enumerate(idx):
            ax = axes[r, c]
            ax.imshow(vol[min(z, vol.shape[0] - 1)], cmap="gray", vmin=lo, vmax=hi, aspect=aspect,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0:
                ax.set_title(f"slice {z}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


def as_volumes(batch: np.ndarray) -> np.ndarray:
    """(N, C, y, x) 2D samples -> (N, C, 1, y, x); 3D batches unchanged."""
    batch = np.asarray(batch)
    return batch[:, :, None] if batch.ndim == 4 else batch
