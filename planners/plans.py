"""Reading, writing and checking plans files (``$ORTHO_preprocessed/DatasetXXX_Name/{plans_name}.json``).

Why one module: preprocessing, training and inference must read the plan *only* through the file a user may have
edited, and a hand-edited file deserves a clear message (which key, which view) rather than a KeyError deep inside a
trainer. ``docs/planning.md`` explains every field.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Union

from orthonet.errors import OrthoError
from orthonet.fileio import load_json, save_json_readable

PathLike = Union[str, Path]

DEFAULT_PLANS_NAME = "orthoPlans"
#: Convenience copy of the default plans (internals.md).
PLANS_COPY_NAME = "plans.json"
FINGERPRINT_NAME = "fingerprint.json"
CONFIGURATIONS = ("3d_fullres", "2d", "3d_lowres")

_VIEW_KEYS = ("transpose_forward", "transpose_backward", "num_input_channels", "normalization", "configurations")
_CONFIG_KEYS = ("data_identifier", "spacing", "patch_size", "batch_size", "resampling", "network")


def plans_path(preprocessed_dir: PathLike, plans_name: str = DEFAULT_PLANS_NAME) -> Path:
    return Path(preprocessed_dir) / f"{plans_name}.json"


def fingerprint_path(preprocessed_dir: PathLike) -> Path:
    return Path(preprocessed_dir) / FINGERPRINT_NAME


def save_plans(plans: Dict, preprocessed_dir: PathLike) -> Path:
    """Write ``{plans_name}.json`` (indent 2, insertion order) and, for the default plans, the ``plans.json`` copy."""
    name = plans["plans_name"]
    path = plans_path(preprocessed_dir, name)
    save_json_readable(plans, path)
    if name == DEFAULT_PLANS_NAME:
        save_json_readable(plans, Path(preprocessed_dir) / PLANS_COPY_NAME)
    return path


def check_plans(plans: Dict, path: Optional[PathLike] = None) -> Dict:
    """Raise OrthoError naming the first missing or malformed key; return ``plans`` unchanged otherwise."""
    def bad(what: str) -> OrthoError:
        return OrthoError(f"plans file is incomplete: {what}", path,
                          fix="restore the key (see docs/planning.md) or re-plan with "
                              "`ortho_plan_and_preprocess -d ID --overwrite`")

    if not isinstance(plans, dict) or not isinstance(plans.get("views"), dict) or not plans["views"]:
        raise bad("no 'views' object")
    for key in ("dataset_name", "plans_name"):
        if key not in plans:
            raise bad(f"missing '{key}'")
    for view, vp in plans["views"].items():
        for key in _VIEW_KEYS:
            if key not in vp:
                raise bad(f"view '{view}' lacks '{key}'")
        fwd, bwd = vp["transpose_forward"], vp["transpose_backward"]
        if sorted(fwd) != [0, 1, 2] or [fwd[i] for i in bwd] != [0, 1, 2]:
            raise OrthoError(f"view '{view}': transpose_backward {bwd} does not undo transpose_forward {fwd}", path,
                             fix="transpose_backward[i] must be the position of axis i in transpose_forward")
        for cname, cfg in vp["configurations"].items():
            for key in _CONFIG_KEYS:
                if key not in cfg:
                    raise bad(f"view '{view}', configuration '{cname}' lacks '{key}'")
            dim = len(cfg["patch_size"])
            if len(cfg["spacing"]) != dim:
                raise OrthoError(f"view '{view}', configuration '{cname}': spacing {cfg['spacing']} and patch_size "
                                 f"{cfg['patch_size']} differ in length", path,
                                 fix="a 3D configuration has three spacings and three patch sizes, a 2D one two")
            if any(float(s) <= 0 for s in cfg["spacing"]) or any(int(p) < 1 for p in cfg["patch_size"]):
                raise OrthoError(f"view '{view}', configuration '{cname}': spacing and patch size must be positive",
                                 path)
    return plans


def load_plans(preprocessed_dir: PathLike, plans_name: str = DEFAULT_PLANS_NAME) -> Dict:
    """Load and check a plans file from a preprocessed dataset folder."""
    path = plans_path(preprocessed_dir, plans_name)
    if not path.is_file():
        raise OrthoError(f"plans '{plans_name}' not found", path,
                         fix="run `ortho_plan_and_preprocess -d ID` first (or pass the right --plans-name)")
    return check_plans(load_json(path, "plans file"), path)


def view_plan(plans: Dict, view: str) -> Dict:
    try:
        return plans["views"][view]
    except KeyError:
        raise OrthoError(f"the plans have no view '{view}' (views: {sorted(plans.get('views', {}))})",
                         fix="use one of the planned views or re-plan the dataset") from None


def configuration(plans: Dict, view: str, config: str) -> Dict:
    """The plan of one configuration of one view, with a clear error if it was not planned."""
    vp = view_plan(plans, view)
    if config not in vp["configurations"]:
        raise OrthoError(f"configuration '{config}' was not planned for view '{view}' "
                         f"(planned: {sorted(vp['configurations'])})",
                         fix="pick a planned configuration; 2d is planned only for anisotropic views and "
                             "3d_lowres only for large images (the planning log says why)")
    return vp["configurations"][config]


def data_folder(preprocessed_dir: PathLike, plans: Dict, view: str, config: str) -> Path:
    return Path(preprocessed_dir) / configuration(plans, view, config)["data_identifier"]


def planned_configurations(plans: Dict) -> List[str]:
    """Every configuration name planned for at least one view, in canonical order."""
    found = {c for vp in plans["views"].values() for c in vp["configurations"]}
    return [c for c in CONFIGURATIONS if c in found] + sorted(found - set(CONFIGURATIONS))


def preprocessing_hash(plans: Dict, view: str, config: str) -> str:
    """Short hash of every plan entry that changes the preprocessed arrays of (view, config).

    Stored with each preprocessed case: a rerun after editing the spacing, transpose or normalisation redoes the
    affected cases instead of silently keeping stale ones. Patch size, batch size and network do not count.
    """
    vp = view_plan(plans, view)
    cfg = configuration(plans, view, config)
    relevant = {"transpose_forward": vp["transpose_forward"], "normalization": vp["normalization"],
                "spacing": cfg["spacing"], "resampling": cfg["resampling"],
                "dim": len(cfg["patch_size"])}
    text = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
