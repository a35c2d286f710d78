"""Plans transfer (``--plans-from 101``): reuse a source dataset's networks on a target dataset.

Why: a pretrained encoder only loads into a network with the same topology. The target keeps the source's
network entry and batch size per view, and its patch size except where the target's images are smaller (the patch
is then clipped to them, still a multiple of the network's strides, so the topology — and the encoder's network
hash — is unchanged). Everything that depends on the target's own images is recomputed with the target planner's
policy: the transpose (thick axis first), the target spacing and the resampling that follows from it, and the
intensity normalisation.

Views are matched by what each series is, not only by its name: a target view whose image headers clearly show a
sagittal, coronal or axial stack (the fingerprint's direction matrices; obliques such as the shoulder's
scapular-plane prescriptions count as the plane they are closest to, up to 40 degrees off) takes the source view of
the same orientation; otherwise the name decides (``sagittal``, ``oblCor``, ``T2AX`` ...). A single-view target
(e.g. a plain nnU-Net dataset, view ``image``) may be mapped onto any source view with ``--view-map image=sagittal``.
"""
from __future__ import annotations

import copy
import re
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from orthonet.dicom import VIEW_AXES, assign_view
from orthonet.errors import OrthoError
from orthonet.fileio import load_json
from orthonet.paths import preprocessed_root
from orthonet.planners.planner import DefaultPlanner
from orthonet.planners.plans import fingerprint_path
from orthonet.planners.topology import round_up_to_multiple

#: word beginnings that say which plane a series is (``oblCor``, ``T2SAG``, ``axPD``, ``transverse``)
_NAME_PREFIXES = {"sagittal": ("sag",), "coronal": ("cor",), "axial": ("ax", "tra")}


def orientation_from_name(view: str) -> Optional[str]:
    """'sagittal' | 'coronal' | 'axial' when exactly one plane is named by a word of ``view`` (words split at
    digits and camel case: ``oblCor`` -> obl, cor); else None."""
    words = [w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])", view)]
    hits = {o for o, prefixes in _NAME_PREFIXES.items() for w in words if w.startswith(prefixes)}
    return hits.pop() if len(hits) == 1 else None


def series_orientations(fingerprint: Optional[Dict]) -> Dict[str, Tuple[str, float]]:
    """Per view: the plane most of its training series are (from their direction matrices and spacings, as
    recorded by the fingerprint) and the median cosine to it; 'ambiguous' when no plane has a majority."""
    out: Dict[str, Tuple[str, float]] = {}
    for view, fp in ((fingerprint or {}).get("views") or {}).items():
        votes = [assign_view(d, list(sp)[::-1]) for d, sp in zip(fp.get("directions") or [], fp.get("spacings") or [])]
        if not votes:
            continue
        plane, n = Counter(v for v, _ in votes).most_common(1)[0]
        ok = plane != "ambiguous" and 2 * n > len(votes)
        out[view] = (plane if ok else "ambiguous", float(np.median([c for v, c in votes if v == plane])))
    return out


def _plane_of(view: str, orientations: Dict[str, Tuple[str, float]]) -> Optional[str]:
    """The plane a view's series are: their headers when clear, else its name."""
    plane = orientations.get(view, ("ambiguous", 0.0))[0]
    return plane if plane in VIEW_AXES else orientation_from_name(view)


def _match_one(tv: str, source_views: Sequence[str], target_or: Dict[str, Tuple[str, float]],
               source_or: Dict[str, Tuple[str, float]]) -> Tuple[Optional[str], str]:
    """Default source view for target view ``tv`` and why: the series' plane by its headers, then the same name,
    then the plane its name says."""
    plane, cos = target_or.get(tv, ("ambiguous", 0.0))
    if plane in VIEW_AXES:
        same = [sv for sv in source_views if _plane_of(sv, source_or) == plane]
        if same:
            sv = tv if tv in same else same[0]
            return sv, f"headers: {plane} series ({np.degrees(np.arccos(min(1.0, cos))):.0f} deg off the plane)"
    if tv in source_views:
        return tv, "same view name"
    plane = orientation_from_name(tv)
    same = [sv for sv in source_views if _plane_of(sv, source_or) == plane] if plane else []
    if same:
        return same[0], f"name: '{tv}' names a {plane} series"
    return None, ""


def resolve_view_map(target_views, source_views, view_map: Optional[Dict[str, str]] = None,
                     source_name: str = "the source plans", target_orientations: Optional[Dict] = None,
                     source_orientations: Optional[Dict] = None) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(target view -> source view, target view -> why); raises OrthoError when a target view has no counterpart.

    ``target_orientations`` / ``source_orientations``: :func:`series_orientations` of each side's fingerprint."""
    view_map = dict(view_map or {})
    target_or, source_or = dict(target_orientations or {}), dict(source_orientations or {})
    unknown = [t for t in view_map if t not in target_views]
    if unknown:
        raise OrthoError(f"--view-map names target view(s) {unknown}, but the target's views are "
                         f"{list(target_views)}")
    bad = {t: s for t, s in view_map.items() if s not in source_views}
    if bad:
        raise OrthoError(f"--view-map maps onto {sorted(set(bad.values()))}, which {source_name} lacks",
                         fix=f"map onto one of {list(source_views)}")
    out, why = {}, {}
    for tv in target_views:
        if tv in view_map:
            out[tv], why[tv] = view_map[tv], "--view-map"
            continue
        sv, reason = _match_one(tv, list(source_views), target_or, source_or)
        if sv is None and len(target_views) == 1 and len(source_views) == 1:
            sv, reason = next(iter(source_views)), "the only view on both sides"
        if sv is None:
            hint = (f"map it with --view-map {tv}=VIEW (VIEW one of {list(source_views)})"
                    if len(target_views) == 1 else
                    f"name the target's views like the source's {list(source_views)} in dataset.json, or map "
                    f"them with --view-map TARGET=SOURCE")
            raise OrthoError(f"view '{tv}' of the target has no matching view in {source_name} "
                             f"(views {list(source_views)})", fix=hint)
        out[tv], why[tv] = sv, reason
    return out, why


def load_source_fingerprint(source: Dict) -> Optional[Dict]:
    """The source dataset's fingerprint (its series' headers), or None when it is not on this machine."""
    path = fingerprint_path(preprocessed_root() / str(source.get("dataset_name")))
    return load_json(path, "fingerprint") if path.is_file() else None


def clip_patch(patch: Sequence[int], median: Sequence[float], network: Dict) -> List[int]:
    """The source's patch, clipped on each axis where the target's median image is smaller to that image rounded
    up to a multiple of the network's total stride: the network (and its hash) stays the source's, only the
    padding the target's smaller images would need is dropped."""
    strides = np.asarray(network["kwargs"]["strides"], dtype=np.int64).reshape(-1, len(patch))
    multiple = [int(m) for m in np.prod(strides, axis=0)]
    fit = round_up_to_multiple([max(1, int(round(m))) for m in median], multiple)
    return [int(min(int(p), int(f))) for p, f in zip(patch, fit)]


def match_transfer_views(source: Dict, planner: DefaultPlanner, view_map: Optional[Dict[str, str]] = None,
                         source_fingerprint: Optional[Dict] = None) -> Tuple[Dict[str, str], Dict[str, str]]:
    """target view -> source view (and why) by what each series is. A plain nnU-Net target's single ``image``
    view is not matched by its headers: such files are often stored reoriented, so it needs ``--view-map``."""
    spec = planner.spec
    fingerprint = source_fingerprint if source_fingerprint is not None else load_source_fingerprint(source)
    target_or = {} if spec.nnunet_format else series_orientations(planner.fingerprint)
    mapping, why = resolve_view_map(spec.views, list(source["views"]), view_map,
                                    f"plans '{source.get('plans_name')}' of {source.get('dataset_name')}",
                                    target_or, series_orientations(fingerprint))
    for tv, sv in mapping.items():
        note = "" if sv == tv or why[tv] == "--view-map" else "  (note: the names differ)"
        planner.log.info(f"  view '{tv}' <- {source.get('dataset_name')}/{sv}: {why[tv]}{note}")
    return mapping, why


def _transfer_configurations(planner: DefaultPlanner, tv: str, source_configs: Dict, spacing_t: np.ndarray,
                             median_t: np.ndarray) -> Dict:
    """The source view's configurations at the target's spacing and image size (``spacing_t``/``median_t``:
    3d_fullres, transposed); network and batch size stay the source's, the patch is clipped to the target."""
    configs = {}
    src_full = source_configs.get("3d_fullres")
    for cname, scfg in source_configs.items():
        cfg = copy.deepcopy(scfg)
        if len(scfg["patch_size"]) == 2:
            spacing, median = spacing_t[1:], median_t[1:]
        elif cname == "3d_fullres" or src_full is None:
            spacing, median = spacing_t, median_t
        else:  # e.g. 3d_lowres: keep the source's coarsening factor per axis
            factor = np.asarray(scfg["spacing"], float) / np.asarray(src_full["spacing"], float)
            spacing, median = spacing_t * factor, median_t / factor
        cfg["data_identifier"] = planner.data_identifier(cname)
        cfg["spacing"] = [round(float(s), 6) for s in spacing]
        cfg["median_image_size_in_voxels"] = [int(round(m)) for m in median]
        cfg["resampling"] = planner.resampling(spacing)
        cfg["patch_size"] = clip_patch(scfg["patch_size"], median, scfg["network"])
        if cfg["patch_size"] != list(scfg["patch_size"]):
            planner.log.info(f"  {tv}/{cname}: patch {scfg['patch_size']} clipped to {cfg['patch_size']} "
                             f"(median image {cfg['median_image_size_in_voxels']}); network unchanged")
        configs[cname] = {k: cfg[k] for k in scfg}   # the key order of a freshly planned configuration
    return configs


def transfer_plans(source: Dict, planner: DefaultPlanner, view_map: Optional[Dict[str, str]] = None,
                   source_fingerprint: Optional[Dict] = None) -> Dict:
    """Plans for ``planner``'s dataset that reuse ``source``'s network topology per view."""
    spec = planner.spec
    mapping, why = match_transfer_views(source, planner, view_map, source_fingerprint)
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
        configs = _transfer_configurations(planner, tv, src["configurations"], spacing_t, median_t)
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
                             "views": mapping, "view_matching": why},
        "segmentation_view": spec.segmentation_view if spec.has_segmentation else None,
        "num_classes": spec.num_classes,
        "labels": dict(spec.labels),
        "diagnoses": list(spec.diagnoses),
        "views": views,
    }
