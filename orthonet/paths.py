"""Where orthonet keeps raw data, preprocessed data and results.

As nnU-Net: three environment variables (``ORTHO_raw``, ``ORTHO_preprocessed``, ``ORTHO_results``). When one is
unset we fall back to ``./ortho_data/{raw,preprocessed,results}`` and say so once, so a first-time user is never
blocked by configuration.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import List, Union

from orthonet.errors import OrthoError

_ENV = {"raw": "ORTHO_raw", "preprocessed": "ORTHO_preprocessed", "results": "ORTHO_results"}
_warned: set = set()


def _root(kind: str) -> Path:
    var = _ENV[kind]
    value = os.environ.get(var)
    if value:
        return Path(value).expanduser().resolve()
    default = Path.cwd() / "ortho_data" / kind
    if var not in _warned:
        _warned.add(var)
        print(f"[orthonet] {var} is not set; using {default}", file=sys.stderr)
    return default


def raw_root() -> Path:
    return _root("raw")


def preprocessed_root() -> Path:
    return _root("preprocessed")


def results_root() -> Path:
    return _root("results")


_NAME_RE = re.compile(r"^Dataset(\d{3})_(.+)$")


def dataset_id_from_name(name: str) -> int:
    m = _NAME_RE.match(name)
    if not m:
        raise OrthoError(f"'{name}' is not a dataset folder name", fix="dataset folders are named DatasetXXX_Name, "
                         "e.g. Dataset101_Knee")
    return int(m.group(1))


def _candidates(root: Path, dataset_id: int) -> List[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and _NAME_RE.match(p.name) and int(_NAME_RE.match(p.name).group(1)) == dataset_id)


def resolve_dataset_name(dataset: Union[int, str]) -> str:
    """Turn ``101``, ``"101"`` or ``"Dataset101_Knee"`` into the dataset folder name.

    Searches raw, preprocessed and results folders (in that order), so prediction works on a machine that only
    has results. Ambiguity (two folders with the same id) is an error, as in nnU-Net.
    """
    text = str(dataset).strip()
    if _NAME_RE.match(text):
        return text
    if not text.isdigit():
        raise OrthoError(f"'{dataset}' is neither a dataset id nor a DatasetXXX_Name folder name",
                         fix="pass the three-digit id (e.g. 101) or the full folder name (e.g. Dataset101_Knee)")
    dataset_id = int(text)
    for root_fn in (raw_root, preprocessed_root, results_root):
        root = root_fn()
        found = _candidates(root, dataset_id)
        if len(found) > 1:
            raise OrthoError(f"dataset id {dataset_id} is ambiguous in {root}: {', '.join(found)}",
                             fix="rename or remove one of them, or pass the full folder name")
        if found:
            return found[0]
    raise OrthoError(f"no dataset with id {dataset_id} (looked for Dataset{dataset_id:03d}_* in {raw_root()}, "
                     f"{preprocessed_root()} and {results_root()})",
                     fix="check ORTHO_raw, or create one with `ortho_make_synthetic -d "
                         f"{dataset_id}`")


def raw_dataset_dir(dataset: Union[int, str]) -> Path:
    return raw_root() / resolve_dataset_name(dataset)


def preprocessed_dataset_dir(dataset: Union[int, str]) -> Path:
    return preprocessed_root() / resolve_dataset_name(dataset)


def results_dataset_dir(dataset: Union[int, str]) -> Path:
    return results_root() / resolve_dataset_name(dataset)
