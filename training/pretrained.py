"""The per-view ``encoder.pt`` written by diffusion pretraining, and finding/loading it for downstream training.

Why a file of its own: downstream trainers need only the encoder (and decoder, where shapes match) folded at the
feature timestep, plus enough identity (dataset, plans, configuration, view, network entry) to refuse weights that
were trained for another topology. Everything in it is a tensor or a plain Python value, so it loads with
``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from orthonet.errors import OrthoError
from orthonet.fileio import atomic_path
from orthonet.paths import results_root

PathLike = Union[str, Path]
ENCODER_FORMAT = "orthonet-encoder-v1"


def network_hash(spec: Dict) -> str:
    """Stable short hash of a plans ``network`` entry: two entries with equal hashes build identical topologies."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pretrain_folder_name(plans_name: str, configuration: str) -> str:
    return f"Pretrain__{plans_name}__{configuration}"


def pretrain_dir(dataset_name: str, plans_name: str, configuration: str) -> Path:
    """``…/results/<dataset>/Pretrain__<plans>__<config>``: one subfolder per pretrained view."""
    return results_root() / dataset_name / pretrain_folder_name(plans_name, configuration)


def pretrain_view_dir(dataset_name: str, plans_name: str, configuration: str, view: str) -> Path:
    return pretrain_dir(dataset_name, plans_name, configuration) / view


def save_encoder_file(path: PathLike, *, encoder_state_dict: Dict[str, torch.Tensor],
                      decoder_state_dict: Dict[str, torch.Tensor], view: str, dataset_name: str, plans_name: str,
                      configuration: str, network: Dict, input_channels: int, feature_timestep: int,
                      prediction_type: str, steps: int) -> None:
    """Write ``encoder.pt`` atomically."""
    payload = {
        "format": ENCODER_FORMAT,
        "view": view,
        "dataset_name": dataset_name,
        "plans_name": plans_name,
        "configuration": configuration,
        "network_json": json.dumps(network, sort_keys=True),
        "network_hash": network_hash(network),
        "input_channels": int(input_channels),
        "feature_timestep": int(feature_timestep),
        "prediction_type": prediction_type,
        "steps": int(steps),
        "encoder_state_dict": {k: v.detach().cpu().contiguous() for k, v in encoder_state_dict.items()},
        "decoder_state_dict": {k: v.detach().cpu().contiguous() for k, v in decoder_state_dict.items()},
    }
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)


def load_encoder_file(path: PathLike) -> Dict:
    """Read an ``encoder.pt`` (weights_only) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise OrthoError("pretrained encoder file not found", path,
                         fix="run `ortho_pretrain DATASET CONFIG` first, or pass --pretrained none")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, pickle of non-allowed types, truncated file ...
        raise OrthoError(f"cannot read pretrained encoder ({type(e).__name__}: {str(e)[:200]})", path,
                         fix="rerun `ortho_pretrain` to rewrite it") from None
    if not isinstance(payload, dict) or payload.get("format") != ENCODER_FORMAT:
        raise OrthoError("not an orthonet encoder file", path, fix="point --pretrained at a folder or file written "
                         "by `ortho_pretrain` (…/Pretrain__<plans>__<config>/<view>/encoder.pt)")
    payload["network"] = json.loads(payload["network_json"])
    payload["path"] = str(path)
    return payload


@dataclass
class PretrainedSource:
    """Where pretrained encoders come from: ``{target view: encoder.pt}``, the view each file must have been
    pretrained as (``expected_views``: the source view of a plans transfer, or the view itself) and a description
    for the log."""

    files: Dict[str, Path]
    description: str
    expected_views: Dict[str, str] = field(default_factory=dict)


def transfer_view_map(plans: Dict, views: List[str]) -> Dict[str, str]:
    """target view -> the source view whose encoder it takes, as ``--plans-from`` recorded it (itself otherwise)."""
    mapping = (plans.get("transferred_from") or {}).get("views") or {}
    return {v: mapping.get(v, v) for v in views}


def _existing(folder: Path, names: Dict[str, str]) -> PretrainedSource:
    """The ``folder/<name>/encoder.pt`` files that exist, per target view (``names``: target view -> folder)."""
    files = {tv: folder / sv / "encoder.pt" for tv, sv in names.items()}
    found = {tv: p for tv, p in files.items() if p.is_file()}
    return PretrainedSource(found, str(folder), {tv: names[tv] for tv in found})


def _find_auto(plans: Dict, configuration: str, views: List[str]) -> Optional[PretrainedSource]:
    """This dataset's own ``ortho_pretrain`` encoders, else those of the plans-transfer source through the view
    map; None only when the plans were not transferred (a plain dataset without pretraining trains from scratch)."""
    origin = plans.get("transferred_from")
    candidates = [(plans["dataset_name"], plans["plans_name"], {v: v for v in views})]
    if origin:
        candidates.append((origin["dataset_name"], origin.get("plans_name") or plans["plans_name"],
                           transfer_view_map(plans, views)))
    for dataset_name, plans_name, names in candidates:
        folder = pretrain_dir(dataset_name, plans_name, configuration)
        found = _existing(folder, names)
        if found.files:
            found.description = f"{dataset_name} {folder.name}"
            return found
    if not origin:
        return None
    dataset_name, plans_name, names = candidates[-1]
    looked = ", ".join(f"{tv} <- {sv}" for tv, sv in names.items())
    raise OrthoError(f"these plans were transferred from {dataset_name} to start from its pretrained encoders, "
                     f"but none exist (views {looked})",
                     pretrain_dir(dataset_name, plans_name, configuration),
                     fix=f"run `ortho_pretrain {dataset_name} {configuration} -p {plans_name}` first, point "
                         f"--pretrained at a Pretrain__ folder or encoder.pt, or pass --pretrained none to train "
                         f"from scratch")


def _single_file(path: Path, names: Dict[str, str]) -> PretrainedSource:
    """One ``encoder.pt``: it goes into every target view that takes its view (itself, or through the transfer's
    view map); a file for a view the model lacks is an error, never a silent scratch run."""
    view = load_encoder_file(path)["view"]
    targets = [tv for tv, sv in names.items() if view in (sv, tv)]
    if not targets:
        raise OrthoError(f"this encoder.pt was pretrained for view '{view}', which the model lacks (its views: "
                         f"{', '.join(names)})", path,
                         fix=f"pass the encoder.pt of one of these views or the Pretrain__ folder holding them; to "
                             f"start another view from this '{view}' encoder, transfer the plans with "
                             f"`ortho_plan_and_preprocess -d TARGET --plans-from SOURCE --view-map VIEW={view}`")
    return PretrainedSource({tv: path for tv in targets}, str(path), {tv: view for tv in targets})


def _find_path(path: Path, plans: Dict, views: List[str]) -> PretrainedSource:
    """``--pretrained PATH``: an encoder.pt, a view folder or a Pretrain__ folder (its subfolders named like the
    transfer's source views, or like the model's own views)."""
    names = transfer_view_map(plans, views)
    if path.is_file():
        return _single_file(path, names)
    if path.is_dir():
        found = _existing(path, names)
        own = _existing(path, {v: v for v in views if v not in found.files})
        found.files.update(own.files)
        found.expected_views.update(own.expected_views)
        if found.files:
            return found
        if (path / "encoder.pt").is_file():
            return _single_file(path / "encoder.pt", names)
    raise OrthoError(f"no pretrained encoders found for views {', '.join(sorted(set(names.values()) | set(views)))}",
                     path, fix="pass a Pretrain__<plans>__<config> folder, a view folder or an encoder.pt file, "
                               "or use --pretrained auto|none")


def find_pretrained(pretrained: str, plans: Dict, configuration: str, views: List[str]) -> Optional[PretrainedSource]:
    """Resolve ``--pretrained auto|none|PATH`` to encoder files per view (of the model's ``views``).

    ``none``: None. ``auto``: this dataset's ``ortho_pretrain`` output, else that of the dataset the plans were
    transferred from, each target view taking its mapped source view (``transferred_from.views``); None when the
    plans were not transferred and nothing is pretrained (the plain from-scratch case), an OrthoError when they were
    transferred and no encoder exists. ``PATH``: see :func:`_find_path`; finding nothing there is an OrthoError.
    """
    if pretrained == "none":
        return None
    if pretrained == "auto":
        return _find_auto(plans, configuration, views)
    return _find_path(Path(pretrained).expanduser(), plans, views)
