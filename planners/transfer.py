"""Plans transfer (``--plans-from 101``): reuse a source dataset's networks on a target dataset.

Why: a pretrained encoder only loads into a network with the same topology. The target keeps the source's
network entry, patch size and batch size per view (and therefore its memory footprint), while everything that
depends on the target's own images is recomputed with the target planner's policy: the transpose (thick axis
first), the target spacing and the resampling that follows from it, and the intensity normalisation.
Views are matched by name; a single-view target (e.g. a plain nnU-Net dataset, view ``image``) may be mapped onto
any source view with ``--view-map image=sagittal``.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional

import numpy as np

from orthonet.errors import OrthoError
from planners.planner import DefaultPlanner


def resolve_view_map(target_views, source_views, view_map: Optional[Dict[str, str]] = None,
                     source_name: str = "the source plans") -> Dict[str, str]:
    """target view -> source view; raises OrthoError when a target view has no counterpart."""
    view_map = dict(view_map or {})
    unknown = [t for t in view_map if t not in target_views]
    if unknown:
        raise OrthoError(f"--view-map names target view(s) {unknown}, but the target's views are "
                         f"{list(target_views)}")
    out = {}
    for tv in target_views:
        sv = view_map.get(tv, tv)
        if sv not in source_views and len(target_views) == 1 and len(source_views) == 1:
            sv = next(iter(source_views))
        if sv not in source_views:
            hint = (f"map it with --view-map {tv}=VIEW (VIEW one of {list(source_views)})"
                    if len(target_views) == 1 else
                    f"name the target's views like the source's {list(source_views)} in dataset.json, or map "
                    f"them with --view-map TARGET=SOURCE")
            raise OrthoError(f"view '{tv}' of the target has no matching view in {source_name} "
                             f"(views {list(source_views)})", fix=hint)
        out[tv] = sv
    return out


def transfer_plans(source: Dict, planner: DefaultPlanner, view_map: Optional[Dict[str, str]] = None) -> Dict:
    """Plans for ``planner``'s dataset that reuse ``source``'s network topology per view."""
    spec = planner.spec
    mapping = resolve_view_map(spec.views, list(source["views"]), view_map,
                               f"plans '{source.get('plans_name')}' of {source.get('dataset_name')}")
    views = {}
    for tv, sv in mapping.items():
        src = source["views"][sv]
        forward, backward = planner.transpose(tv)
        target = planner.target_spacing(tv)
        spacing_t = np.asarray(target)[forward]
        median_t = planner.median_shape_at(tv, target)[forward]
        if spec.num_channels(tv) != int(src["num_input_channels"]):
            planner.log.info(f"  warning: view '{tv}' has {spec.num_channels(tv)} channel(s), the source view "
                             f"'{sv}' {src['num_input_channels']}: the encoder's first convolution will not load")
        configs = {}
        src_full = src["configurations"].get("3d_fullres")
        for cname, scfg in src["configurations"].items():
            cfg = copy.deepcopy(scfg)
            dim = len(scfg["patch_size"])
            if dim == 2:
                spacing, median = spacing_t[1:], median_t[1:]
            elif cname == "3d_fullres" or src_full is None:
                spacing, median = spacing_t, median_t
            else:  # e.g. 3d_lowres: keep the source's coarsening factor per axis
                factor = np.asarray(scfg["spacing"], float) / np.asarray(src_full["spacing"], float)
                spacing = spacing_t * factor
                median = median_t / factor
            cfg["data_identifier"] = planner.data_identifier(cname)
            cfg["spacing"] = [round(float(s), 6) for s in spacing]
            cfg["median_image_size_in_voxels"] = [int(round(m)) for m in median]
            cfg["resampling"] = planner.resampling(spacing)
            # keep the key order of a freshly planned configuration
            configs[cname] = {k: cfg[k] for k in scfg}
        fp = planner.fingerprint["views"][tv]
        views[tv] = {
            "transpose_forward": [int(a) for a in forward],
            "transpose_backward": [int(a) for a in backward],
            "num_input_channels": spec.num_channels(tv),
            "channel_names": spec.channels(tv),
            "original_median_spacing": [round(float(s), 6) for s in np.median(np.asarray(fp["spacings"]), 0)[forward]],
            "original_median_shape": [int(round(s)) for s in
                                      np.median(np.asarray(fp["shapes_after_crop"]), 0)[forward]],
            "normalization": planner.normalization(tv),
            "configurations": configs,
        }
        planner.log.info(f"  {tv}: topology from {source.get('dataset_name')}/{sv} "
                         f"({', '.join(configs)}), spacing {views[tv]['configurations'].get('3d_fullres', {}).get('spacing')}")
    return {
        "dataset_name": spec.root.name,
        "plans_name": planner.plans_name,
        "planner": planner.name,
        "planner_settings": planner.settings(),
        "transferred_from": {"dataset_name": source.get("dataset_name"), "plans_name": source.get("plans_name"),
                             "views": mapping},
        "segmentation_view": spec.segmentation_view if spec.has_segmentation else None,
        "num_classes": spec.num_classes,
        "labels": dict(spec.labels),
        "diagnoses": list(spec.diagnoses),
        "views": views,
    }
