"""One synthetic exam: build the phantom, place the three stacks as a technologist would, acquire each view.

Why it is one function: every consumer (dataset writer, tests, benchmarks) needs exactly the same recipe, and a
case must be reproducible from (joint, seed, size, lesions, centre) alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from orthonet.errors import OrthoError
from orthonet.imageio import Geometry
from orthonet.synthetic.acquisition import (BiasField, SizePreset, acquire, noise_sigma, render_view,
                                            resolve_preset)
from orthonet.synthetic.intensities import center_profile, tissue_table
from orthonet.synthetic.joints import CaseRandom, JointModel, get_joint
from orthonet.synthetic.phantom import Phantom
from orthonet.synthetic.views import ViewGrid

VIEWS: Tuple[str, ...] = ("sagittal", "coronal", "axial")
SEGMENTATION_VIEW = "sagittal"


@dataclass
class ViewData:
    """One acquired stack: image (z, y, x float32 scanner magnitudes, integer-valued), label map on the same grid
    (uint8, the phantom's label at each slice's centre plane) and its geometry."""

    image: np.ndarray
    labels: np.ndarray
    geometry: Geometry
    grid: ViewGrid


@dataclass
class SyntheticCase:
    joint: str
    seed: int
    center: int
    center_name: str
    size: str
    views: Dict[str, ViewData]
    diagnoses: Tuple[str, ...]
    diagnosis: np.ndarray                       # uint8 0/1 per diagnosis, in ``diagnoses`` order
    labels: Dict[str, int]                      # label name -> value (background 0)
    lesion_sites_mm: Dict[str, np.ndarray]      # LPS position of each lesion's centre (also for absent ones)
    params: Dict = field(default_factory=dict)
    segmentation_view: str = SEGMENTATION_VIEW

    @property
    def present(self) -> Dict[str, bool]:
        return {d: bool(v) for d, v in zip(self.diagnoses, self.diagnosis)}


def draw_presence(model: JointModel, rngs: CaseRandom,
                  lesions: Optional[Mapping[str, bool]] = None) -> Dict[str, bool]:
    """Which abnormalities this case has: independent draws with each one's prevalence, then overrides."""
    rng = rngs.stream("presence")
    present = {d: bool(rng.random() < model.prevalence[d]) for d in model.diagnoses}
    for name, value in (lesions or {}).items():
        if name not in present:
            raise OrthoError(f"unknown abnormality '{name}' for the {model.name}",
                             fix=f"known: {', '.join(model.diagnoses)}")
        present[name] = bool(value)
    return present


def place_views(model: JointModel, phantom: Phantom, preset: SizePreset, fov_scale: float,
                rng: np.random.Generator) -> Dict[str, ViewGrid]:
    """Per-view grids centred near the joint with an off-centre shift and a small oblique tilt that partly
    follows the limb's rotation (as planned on a localiser), so no two views share a grid."""
    centre = phantom.patient_point(model.view_center)
    limb_rot = float(phantom.params.get("angles_deg", (0.0, 0.0, 0.0))[2])
    mirror = -1.0 if phantom.params.get("left") else 1.0
    grids = {}
    for view in VIEWS:
        layout = model.views[view]
        offset = rng.uniform(-6.0, 6.0, 3)
        tilt = rng.uniform(-4.0, 4.0, 3) + np.asarray(layout.tilt_deg, dtype=np.float64) * [1.0, 1.0, mirror]
        tilt[2] += 0.7 * limb_rot
        fov = (layout.fov_mm[0] * fov_scale * preset.fov_scale, layout.fov_mm[1] * fov_scale * preset.fov_scale)
        coverage = layout.coverage_mm * phantom.scale * preset.fov_scale
        in_plane = preset.in_plane_mm * layout.spacing_scale[0]
        thickness = preset.slice_mm * layout.spacing_scale[1]
        grids[view] = ViewGrid.make(view, centre + offset, fov, coverage, in_plane, thickness, oblique_deg=tilt)
    return grids


def generate_case(joint: str, seed: int, size: str = "default", lesions: Optional[Mapping[str, bool]] = None,
                  center: int = 0, **overrides) -> SyntheticCase:
    """Generate one multi-view exam.

    ``lesions`` overrides which abnormalities are present (name -> bool); everything else (anatomy, lesion sizes,
    views, noise) is unchanged by it. ``center`` picks the site profile (noise, contrast, bias, FOV).
    ``overrides`` adjust the size preset (``in_plane_mm``, ``slice_mm``, ``pv_samples``, ``fov_scale``)."""
    model = get_joint(joint)
    preset = resolve_preset(size, **overrides)
    rngs = CaseRandom(seed)
    present = draw_presence(model, rngs, lesions)
    phantom = model.build(rngs, present)
    profile = center_profile(int(center))
    table = tissue_table(profile, rngs.stream("tissue"))
    grids = place_views(model, phantom, preset, profile.fov_scale, rngs.stream("views"))
    bias = BiasField.random(rngs.stream("bias"), phantom.patient_point(model.view_center), profile.bias_strength)
    voxel_mm3 = preset.in_plane_mm ** 2 * preset.slice_mm
    sigma = noise_sigma(profile, voxel_mm3, table["fluid"])
    views = {}
    for view, grid in grids.items():
        signal, labels = render_view(phantom, grid, table, preset.pv_samples, preset.chunk_voxels)
        image = acquire(signal, grid, profile, bias, sigma, rngs.stream(f"noise:{view}"))
        views[view] = ViewData(image, labels, grid.geometry, grid)
    diagnosis = np.array([int(present[d]) for d in model.diagnoses], dtype=np.uint8)
    sites = {k: phantom.patient_point(v) for k, v in phantom.lesion_sites.items()}
    params = dict(phantom.params)
    params.update({"noise_sigma": sigma, "center_profile": profile.as_dict()})
    return SyntheticCase(model.name, int(seed), int(center), profile.name, preset.name, views, model.diagnoses,
                         diagnosis, model.label_dict(), sites, params)
