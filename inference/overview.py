"""``{CASE}_overview.png``: one picture per exam for a quick look and for report.html.

Each used view in the dataset's order (channel 0 on its original grid, millimetre-true aspect), the segmentation
overlaid on the segmentation view (slice through the predicted structures' centre), with ``--explain`` the
saliency map of the most probable finding on every view (slice through its peak) and, for whole-exam models, a
second row with that finding's attention-MIL map (where the model looked), and the diagnosis probabilities
as a bar chart with each diagnosis's decision threshold. Drawing itself is :mod:`orthonet.visualize` (shared with
``ortho_show``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from orthonet.dataset import DatasetSpec
from orthonet.imageio import Geometry
from orthonet.visualize import ViewPanel, label_centroid_mm, render_montage, slice_axis, slice_through


def _slice_through_peak(volume: np.ndarray, axis: int) -> Optional[int]:
    if volume is None or not np.any(volume > 0):
        return None
    return int(np.unravel_index(int(np.argmax(volume)), volume.shape)[axis])


def render_overview(prediction, images: Mapping[str, Tuple[np.ndarray, Geometry]], out_png: Path,
                    spec: DatasetSpec, thresholds: Mapping[str, float]) -> Optional[Path]:
    """Draw a :class:`orthonet.inference.predictor.CasePrediction` over its views' images (``{view: (z,y,x) array,
    geometry}``); returns the PNG path (None when there is no view to draw)."""
    views = [v for v in spec.views if v in images]
    if not views:
        return None
    finding = prediction.most_probable_finding()
    label_names = {v: k for k, v in spec.labels.items()}
    panels = []
    for view in views:
        image, geometry = images[view]
        label = None
        if prediction.segmentation is not None and view == prediction.segmentation_view:
            label = sitk.GetArrayFromImage(prediction.segmentation)
        saliency = None
        if finding is not None and view in prediction.saliency and finding in prediction.saliency[view]:
            saliency = sitk.GetArrayFromImage(prediction.saliency[view][finding])
        axis = slice_axis(geometry)
        index = _slice_through_peak(saliency, axis) if saliency is not None else None
        if index is None and label is not None:
            index = slice_through(geometry, axis, label_centroid_mm(label, geometry))
        name = view + (f" (saliency: {finding})" if saliency is not None else "")
        panels.append(ViewPanel(name, image, geometry, label=label, saliency=saliency, slice_index=index,
                                axis=axis))
    for view in views:
        attention = getattr(prediction, "attention", {}).get(view, {})
        if finding is None or finding not in attention:
            continue
        image, geometry = images[view]
        amap = sitk.GetArrayFromImage(attention[finding])
        axis = slice_axis(geometry)
        panels.append(ViewPanel(f"{view} (attention: {finding})", image, geometry, saliency=amap,
                                slice_index=_slice_through_peak(amap, axis), axis=axis))
    probabilities: Optional[Dict[str, float]] = None
    title = prediction.case_id
    if prediction.diagnoses is not None and prediction.diagnoses.probabilities:
        probabilities = {d: float(prediction.diagnoses.probabilities.get(d, np.nan)) for d in spec.diagnoses}
        if finding is not None:
            title += f"  |  most probable finding: {finding} ({probabilities[finding]:.2f})"
    threshold = {d: float(thresholds.get(d, 0.5)) for d in spec.diagnoses}
    return render_montage(panels, out_png, title=title, label_names=label_names, probabilities=probabilities,
                          threshold=threshold)
