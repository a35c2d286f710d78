"""``ortho_show``: one PNG that shows what a case looks like — every view, the label overlay, the diagnoses.

Why: before training on a dataset a person should look at it. A montage through one anatomical point (the label's
centroid, found in physical space and mapped into every view) shows at a glance whether the views, the label and
the diagnoses belong together.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np

from orthonet.cli_utils import run_cli
from orthonet.dataset import DIAGNOSES_FILES, LABEL_FOLDERS, SPLIT_FOLDERS, DatasetSpec, load_dataset, parse_diagnoses
from orthonet.errors import OrthoError
from orthonet.imageio import read_array
from orthonet.paths import raw_dataset_dir
from orthonet.visualize import ViewPanel, label_centroid_mm, montage_size_px, render_montage

PathLike = Union[str, Path]
SLICE_POLICIES = ("label_centroid", "middle")


def case_diagnoses(spec: DatasetSpec, case: str, split: str) -> Optional[Dict[str, Optional[float]]]:
    """name -> 1/0/NaN for one case from diagnoses.csv (or diagnosesTs.csv); None if the dataset has none.

    Tolerant on purpose: a broken table must not stop a person from looking at the images (problems are printed;
    ``ortho_verify_dataset`` reports them in full)."""
    if not spec.diagnoses:
        return None
    unknown = {name: float("nan") for name in spec.diagnoses}
    if split not in DIAGNOSES_FILES or not spec.diagnoses_path(split).is_file():
        return unknown
    table, problems = parse_diagnoses(spec, spec.diagnoses_path(split))
    if problems:
        print(f"[orthonet] warning: {spec.diagnoses_path(split).name} has {len(problems)} problem(s); run "
              "ortho_verify_dataset", file=sys.stderr)
    row = table.get(case)
    if row is None:
        return unknown
    return {name: float(v) for name, v in zip(spec.diagnoses, row)}


def _check_case(spec: DatasetSpec, case: str, split: str) -> None:
    if split not in SPLIT_FOLDERS:
        raise OrthoError(f"unknown split '{split}'", fix=f"use one of {list(SPLIT_FOLDERS)}")
    if case in spec.cases(split):
        return
    other = spec.find_split(case)
    if other is not None:
        raise OrthoError(f"case '{case}' is not in {SPLIT_FOLDERS[split]}/ but in {SPLIT_FOLDERS[other]}/",
                         spec.root, fix=f"pass --split {other}")
    known = spec.cases(split)
    listing = ", ".join(known[:8]) + (f" ... ({len(known)} in all)" if len(known) > 8 else "")
    raise OrthoError(f"no case '{case}' in {SPLIT_FOLDERS[split]}/ (cases there: {listing or 'none'})", spec.root,
                     fix="check the case id (the part of the file name before the view)")


def build_panels(spec: DatasetSpec, case: str, split: str = "Tr", slice_policy: str = "label_centroid"
                 ) -> Sequence[ViewPanel]:
    """One panel per view (channel 0), the label on the segmentation view, all cut through the label's centroid."""
    if slice_policy not in SLICE_POLICIES:
        raise OrthoError(f"unknown slice policy '{slice_policy}'", fix=f"use one of {list(SLICE_POLICIES)}")
    _check_case(spec, case, split)
    label = geometry = None
    if split in LABEL_FOLDERS and spec.has_label(case, split):
        label, geometry = read_array(spec.label_path(case, split), dtype=np.int16)
    point = label_centroid_mm(label, geometry) if (label is not None and slice_policy == "label_centroid") else None
    panels = []
    for view in spec.views:
        image, geom = read_array(spec.image_path(case, view, 0, split))
        view_label = label if view == spec.segmentation_view else None
        if view_label is not None and view_label.shape != image.shape:
            raise OrthoError(f"label shape {view_label.shape} does not match image shape {image.shape}",
                             spec.label_path(case, split), fix="run ortho_verify_dataset for details")
        title = view if spec.channels(view)[0] in ("", view) else f"{view} ({spec.channels(view)[0]})"
        panels.append(ViewPanel(title, image, geom, label=view_label, marker_mm=point))
    return panels


def render_case(dataset_dir: PathLike, case: str, out_png: PathLike, split: str = "Tr",
                slice_policy: str = "label_centroid", dpi: int = 100) -> Path:
    """Write a PNG montage of ``case``: every view, the label overlay with a legend, and the diagnoses."""
    spec = load_dataset(dataset_dir)
    panels = build_panels(spec, case, split, slice_policy)
    label_names = {v: k for k, v in spec.labels.items() if v != 0}
    diagnoses = case_diagnoses(spec, case, split)
    title = f"{spec.name}: {case} ({SPLIT_FOLDERS[split]})"
    if split in LABEL_FOLDERS and spec.segmentation_view and not spec.has_label(case, split):
        title += "  - no label"
    return render_montage(panels, out_png, title=title, label_names=label_names, diagnoses=diagnoses, dpi=dpi)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ortho_show", description="Write a PNG montage of one case: every view "
                                     "with the label overlay, and the case's diagnoses.")
    parser.add_argument("-d", "--dataset", required=True, help="dataset id (101) or folder name")
    parser.add_argument("-c", "--case", required=True, help="case id, e.g. knee_000")
    parser.add_argument("-o", "--output", default=None, help="PNG file to write (default: CASE.png)")
    parser.add_argument("--split", default="Tr", choices=list(SPLIT_FOLDERS), help="image folder (default Tr)")
    parser.add_argument("--slice", default="label_centroid", choices=list(SLICE_POLICIES),
                        help="which slice to show (default: through the label's centroid, else the middle)")
    parser.add_argument("--dpi", type=int, default=100, help="resolution (default 100)")
    args = parser.parse_args(argv)
    out = Path(args.output) if args.output else Path(f"{args.case}.png")
    render_case(raw_dataset_dir(args.dataset), args.case, out, args.split, args.slice, args.dpi)
    print(f"wrote {out}")
    return 0


cli = run_cli(main)

__all__ = ["render_case", "build_panels", "case_diagnoses", "main", "cli", "montage_size_px"]
