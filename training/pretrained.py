"""The per-view ``encoder.pt`` written by diffusion pretraining, and finding/loading it for downstream training.

Why a file of its own: downstream trainers need only the encoder (and decoder, where shapes match) folded at the
feature timestep, plus enough identity (dataset, plans, configuration, view, network entry) to refuse weights that
were trained for another topology. Everything in it is a tensor or a plain Python value, so it loads with
``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
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


def pretrain_view_dir(dataset_name: str, plans_name: str, configuration: str, view: str) -> Path:
    return results_root() / dataset_name / pretrain_folder_name(plans_name, configuration) / view


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
    """Where pretrained encoders come from: ``{view: encoder.pt path}`` plus a description for the log."""

    files: Dict[str, Path]
    description: str


def find_pretrained(pretrained: str, plans: Dict, configuration: str, views: List[str]) -> Optional[PretrainedSource]:
    """Resolve ``--pretrained auto|none|PATH`` to encoder files per view.

    ``auto``: this dataset's ``ortho_pretrain`` output, else that of the dataset named in the plans' transfer
    (``transferred_from``); None when neither exists. ``PATH``: a ``Pretrain__…`` folder (one subfolder per view),
    a single view folder, or one ``encoder.pt`` (used for the segmentation view only when it is a single file).
    """
    if pretrained == "none":
        return None
    if pretrained == "auto":
        sources = [(plans["dataset_name"], plans["plans_name"])]
        origin = plans.get("transferred_from")
        if origin:
            sources.append((origin["dataset_name"], origin.get("plans_name", plans["plans_name"])))
        for dataset_name, plans_name in sources:
            files = {v: pretrain_view_dir(dataset_name, plans_name, configuration, v) / "encoder.pt" for v in views}
            files = {v: p for v, p in files.items() if p.is_file()}
            if files:
                return PretrainedSource(files, f"{dataset_name} {pretrain_folder_name(plans_name, configuration)} "
                                               f"(views: {', '.join(sorted(files))})")
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        payload = load_encoder_file(path)
        return PretrainedSource({payload["view"]: path}, str(path))
    if path.is_dir():
        files = {v: path / v / "encoder.pt" for v in views if (path / v / "encoder.pt").is_file()}
        if not files and (path / "encoder.pt").is_file():
            payload = load_encoder_file(path / "encoder.pt")
            files = {payload["view"]: path / "encoder.pt"}
        if files:
            return PretrainedSource(files, str(path))
    raise OrthoError("no pretrained encoders found", path,
                     fix="pass a Pretrain__<plans>__<config> folder, a view folder or an encoder.pt file, "
                         "or use --pretrained auto|none")
