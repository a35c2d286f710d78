"""The orthonet dataset format (see docs/dataset_format.md) and the plain nnU-Net v2 format it also accepts.

A :class:`DatasetSpec` is the parsed ``dataset.json`` plus the naming rules; it answers "which cases exist" and
"which file holds case X, view V, channel C". Everything that touches raw data goes through it, so the nnU-Net
single-view layout is handled in exactly one place.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from orthonet.errors import OrthoError
from orthonet.fileio import load_json
from orthonet.imageio import Geometry, read_array, read_channels

PathLike = Union[str, Path]

#: View name used for a plain nnU-Net dataset (files carry no view tag).
NNUNET_VIEW = "image"
#: The image folders, by split name.
SPLIT_FOLDERS = {"Tr": "imagesTr", "Ts": "imagesTs", "Unlabeled": "imagesUnlabeled"}
#: The label folders, by split name (``labelsTs`` is optional test ground truth, used only by evaluation).
LABEL_FOLDERS = {"Tr": "labelsTr", "Ts": "labelsTs"}
#: The diagnosis tables, by split name (``diagnosesTs.csv`` is optional test ground truth).
DIAGNOSES_FILES = {"Tr": "diagnoses.csv", "Ts": "diagnosesTs.csv"}
KNOWN_KEYS = {"name", "views", "segmentation_view", "channel_names", "labels", "diagnoses", "file_ending",
              "numTraining", "numUnlabeled", "numTest", "licence", "license", "description", "reference",
              "release", "tensorImageSize", "modality", "overwrite_image_reader_writer", "regions_class_order",
              "dataset_name", "joint", "centers", "converted_by"}
_VIEW_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


@dataclass
class DatasetSpec:
    """A parsed dataset.json. ``nnunet_format`` marks a plain nnU-Net dataset (one view named ``image``)."""

    root: Path
    name: str
    views: List[str]
    segmentation_view: Optional[str]
    channel_names: Dict[str, Dict[str, str]]  # view -> {"0": "T2FS", ...}
    labels: Dict[str, int]
    diagnoses: List[str]
    file_ending: str
    num_training: int
    nnunet_format: bool = False
    raw: Dict = field(default_factory=dict)

    # ---- labels -------------------------------------------------------------------------------------------
    @property
    def ignore_label(self) -> Optional[int]:
        """Value of the ``ignore`` label (voxels excluded from the loss), or None."""
        return self.labels.get("ignore")

    @property
    def label_values(self) -> List[int]:
        """All values a label map may contain (background and ``ignore`` included)."""
        return sorted(set(self.labels.values()))

    @property
    def class_names(self) -> List[str]:
        """Segmentation classes in value order, background first, ``ignore`` excluded."""
        return [k for k, v in sorted(self.labels.items(), key=lambda kv: kv[1]) if k != "ignore"]

    @property
    def num_classes(self) -> int:
        """Output channels of a segmentation network (background included, ``ignore`` excluded)."""
        return len(self.class_names)

    @property
    def has_segmentation(self) -> bool:
        return self.segmentation_view is not None and self.num_classes > 1

    # ---- channels -----------------------------------------------------------------------------------------
    def channels(self, view: str) -> List[str]:
        names = self.channel_names[view]
        return [names[k] for k in sorted(names, key=int)]

    def num_channels(self, view: str) -> int:
        return len(self.channel_names[view])

    # ---- file naming --------------------------------------------------------------------------------------
    def image_name(self, case: str, view: str, channel: int) -> str:
        if self.nnunet_format:
            return f"{case}_{channel:04d}{self.file_ending}"
        return f"{case}_{view}_{channel:04d}{self.file_ending}"

    def label_name(self, case: str) -> str:
        if self.nnunet_format:
            return f"{case}{self.file_ending}"
        return f"{case}_{self.segmentation_view}{self.file_ending}"

    def images_dir(self, split: str = "Tr") -> Path:
        return self.root / SPLIT_FOLDERS[split]

    def image_path(self, case: str, view: str, channel: int, split: str = "Tr") -> Path:
        return self.images_dir(split) / self.image_name(case, view, channel)

    def image_paths(self, case: str, view: str, split: str = "Tr") -> List[Path]:
        return [self.image_path(case, view, c, split) for c in range(self.num_channels(view))]

    def labels_dir(self, split: str = "Tr") -> Path:
        """``labelsTr`` or ``labelsTs`` (unlabeled images never have labels)."""
        if split not in LABEL_FOLDERS:
            raise OrthoError(f"split '{split}' has no label folder", fix=f"use one of {sorted(LABEL_FOLDERS)}")
        return self.root / LABEL_FOLDERS[split]

    def label_path(self, case: str, split: str = "Tr") -> Path:
        return self.labels_dir(split) / self.label_name(case)

    def has_label(self, case: str, split: str = "Tr") -> bool:
        return (self.segmentation_view is not None and split in LABEL_FOLDERS
                and self.label_path(case, split).is_file())

    def label_file_pattern(self) -> re.Pattern:
        """Regex for a label file name: ``{CASE}_{VIEW}{ending}`` (``{CASE}{ending}`` for nnU-Net)."""
        ending = re.escape(self.file_ending)
        if self.nnunet_format:
            return re.compile(rf"^(?P<case>.+){ending}$")
        views = "|".join(re.escape(v) for v in sorted(self.views, key=len, reverse=True))
        return re.compile(rf"^(?P<case>.+)_(?P<view>{views}){ending}$")

    def parse_label_name(self, filename: str) -> Optional[Tuple[str, str]]:
        """(case, view) for a label file following the naming, else None."""
        m = self.label_file_pattern().match(filename)
        if not m:
            return None
        return m.group("case"), (NNUNET_VIEW if self.nnunet_format else m.group("view"))

    # ---- case discovery ----------------------------------------------------------------------------------
    def image_file_pattern(self) -> re.Pattern:
        ending = re.escape(self.file_ending)
        if self.nnunet_format:
            return re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){ending}$")
        views = "|".join(re.escape(v) for v in sorted(self.views, key=len, reverse=True))
        return re.compile(rf"^(?P<case>.+)_(?P<view>{views})_(?P<channel>\d{{4}}){ending}$")

    def parse_image_name(self, filename: str) -> Optional[Tuple[str, str, int]]:
        """(case, view, channel) for a file following the naming, else None."""
        m = self.image_file_pattern().match(filename)
        if not m:
            return None
        view = NNUNET_VIEW if self.nnunet_format else m.group("view")
        return m.group("case"), view, int(m.group("channel"))

    def cases(self, split: str = "Tr") -> List[str]:
        """Sorted case ids that have at least one image file in the split's folder."""
        folder = self.images_dir(split)
        if not folder.is_dir():
            return []
        found = set()
        for p in folder.iterdir():
            parsed = self.parse_image_name(p.name)
            if parsed is not None:
                found.add(parsed[0])
        return sorted(found)

    def labelled_cases(self) -> List[str]:
        return [c for c in self.cases("Tr") if self.has_label(c)]

    def find_split(self, case: str) -> Optional[str]:
        """The split (``Tr``, ``Ts`` or ``Unlabeled``) whose image folder holds ``case``, or None."""
        for split in SPLIT_FOLDERS:
            if case in self.cases(split):
                return split
        return None

    # ---- reading one case ---------------------------------------------------------------------------------
    def read_view(self, case: str, view: str, split: str = "Tr") -> Tuple[np.ndarray, Geometry]:
        """All channels of one view as (C, z, y, x) float32 plus the view's geometry (OrthoError on problems)."""
        return read_channels(self.image_paths(case, view, split))

    def read_label(self, case: str, split: str = "Tr") -> Optional[Tuple[np.ndarray, Geometry]]:
        """The segmentation (z, y, x) int16 on the segmentation view's grid, or None if the case has none."""
        if not self.has_label(case, split):
            return None
        return read_array(self.label_path(case, split), dtype=np.int16)

    # ---- diagnoses and centres ---------------------------------------------------------------------------
    @property
    def diagnoses_csv(self) -> Path:
        return self.root / "diagnoses.csv"

    def diagnoses_path(self, split: str = "Tr") -> Path:
        """``diagnoses.csv`` (training) or ``diagnosesTs.csv`` (optional test ground truth)."""
        if split not in DIAGNOSES_FILES:
            raise OrthoError(f"split '{split}' has no diagnosis table", fix=f"use one of {sorted(DIAGNOSES_FILES)}")
        return self.root / DIAGNOSES_FILES[split]

    @property
    def centers_csv(self) -> Path:
        return self.root / "centers.csv"

    def read_diagnoses(self, split: str = "Tr") -> Dict[str, np.ndarray]:
        """case id -> float array (len(diagnoses)) of 0/1, NaN where unknown. Raises on any problem.

        ``split="Ts"`` reads the optional ``diagnosesTs.csv`` (empty dict if absent)."""
        path = self.diagnoses_path(split)
        if split != "Tr" and not path.is_file():
            return {}
        table, problems = parse_diagnoses(self, path)
        if problems:
            raise OrthoError(f"{path.name} has problems:\n  - " + "\n  - ".join(problems), path,
                             fix="run `ortho_verify_dataset` for the full report")
        return table

    def read_centers(self) -> Dict[str, str]:
        """case id -> centre name from centers.csv (empty dict if absent)."""
        if not self.centers_csv.is_file():
            return {}
        with open(self.centers_csv, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and ("case_id" not in rows[0] or "center" not in rows[0]):
            raise OrthoError("centers.csv must have the columns case_id,center", self.centers_csv)
        return {r["case_id"]: r["center"] for r in rows}


# ------------------------------------------------------------------------------------------------------------
# dataset.json parsing
# ------------------------------------------------------------------------------------------------------------
def _parse_channel_names(raw, views: List[str], problems: List[str]) -> Dict[str, Dict[str, str]]:
    """Accept {"0": "T2"} (same channels in every view) or {"sagittal": {"0": "PD"}, ...} (per view)."""
    if not isinstance(raw, dict) or not raw:
        problems.append("'channel_names' must be a non-empty object such as {\"0\": \"T2FS\"}")
        return {v: {"0": "MRI"} for v in views}
    if all(isinstance(v, dict) for v in raw.values()):
        out = {}
        for view in views:
            if view not in raw:
                problems.append(f"'channel_names' is per view but has no entry for view '{view}'")
                out[view] = {"0": "MRI"}
            else:
                out[view] = {str(k): str(v) for k, v in raw[view].items()}
        extra = set(raw) - set(views)
        if extra:
            problems.append(f"'channel_names' names views not in 'views': {sorted(extra)}")
    else:
        out = {view: {str(k): str(v) for k, v in raw.items()} for view in views}
    for view, names in out.items():
        keys = sorted(names)
        if not all(k.isdigit() for k in keys) or sorted(int(k) for k in keys) != list(range(len(keys))):
            problems.append(f"'channel_names' keys for view '{view}' must be \"0\", \"1\", ... without gaps "
                            f"(found {keys})")
    return out


def _parse_labels(raw, problems: List[str]) -> Dict[str, int]:
    if not isinstance(raw, dict):
        problems.append("'labels' must be an object mapping structure names to integer values, "
                        "with \"background\": 0")
        return {"background": 0}
    labels = {}
    for k, v in raw.items():
        if isinstance(v, (list, tuple)):
            problems.append(f"label '{k}' is a region (list of values); orthonet supports integer labels only")
            continue
        if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, str) and v.isdigit()):
            problems.append(f"label '{k}' has value {v!r}; label values must be integers")
            continue
        labels[str(k)] = int(v)
    if labels.get("background") != 0:
        problems.append("'labels' must contain \"background\": 0")
    values = [v for k, v in labels.items()]
    if len(values) != len(set(values)):
        problems.append("two labels share one value in 'labels'")
    non_ignore = sorted(v for k, v in labels.items() if k != "ignore")
    if non_ignore and non_ignore != list(range(len(non_ignore))):
        problems.append(f"label values must be consecutive 0..N (found {non_ignore}); 'ignore' may be any value")
    if "ignore" in labels and non_ignore and labels["ignore"] <= max(non_ignore):
        problems.append("the 'ignore' label must have the highest value")
    return labels


def parse_dataset_json(root: PathLike) -> Tuple[Optional[DatasetSpec], List[str]]:
    """Parse ``root/dataset.json`` and return (spec, problems). ``spec`` is None only if unusable.

    Problems are errors only; harmless oddities (unknown keys) are reported by
    :func:`parse_dataset_json_detailed` as warnings, so an nnU-Net dataset.json with extra keys loads unchanged."""
    path = Path(root) / "dataset.json"
    spec, errors, _ = parse_dataset_json_detailed(root)
    if spec is None:
        return None, errors  # these already name the file
    return spec, [f"{path}: {p}" for p in errors]


def parse_dataset_json_detailed(root: PathLike) -> Tuple[Optional[DatasetSpec], List[str], List[str]]:
    """Parse ``root/dataset.json`` into (spec, errors, warnings); messages do not repeat the file name.

    ``spec`` is None only if the file is missing, not JSON or not an object (then ``errors`` says which)."""
    root = Path(root)
    path = root / "dataset.json"
    problems: List[str] = []
    warnings: List[str] = []
    try:
        raw = load_json(path, "dataset.json")
    except OrthoError as e:
        return None, [str(e)], warnings
    if not isinstance(raw, dict):
        return None, [f"{path}: dataset.json must hold a JSON object"], warnings

    nnunet = "views" not in raw
    if nnunet:
        orthonet_keys = sorted(k for k in ("segmentation_view", "diagnoses") if k in raw)
        if orthonet_keys:
            problems.append(f"dataset.json has orthonet keys {orthonet_keys} but lacks the required key 'views' "
                            "(without 'views' it would be read as a single-view nnU-Net dataset)")
    if nnunet:
        views = [NNUNET_VIEW]
        seg_view: Optional[str] = NNUNET_VIEW
    else:
        views = raw.get("views")
        if not isinstance(views, list) or not views or not all(isinstance(v, str) for v in views):
            problems.append("'views' must be a non-empty list of view names, e.g. [\"sagittal\", \"coronal\", "
                            "\"axial\"]")
            views = [str(v) for v in views] if isinstance(views, list) and views else ["sagittal"]
        bad = [v for v in views if not _VIEW_NAME_RE.match(v)]
        if bad:
            problems.append(f"view names must be letters/digits without '_' (found {bad})")
        if len(set(views)) != len(views):
            problems.append("'views' lists a view twice")
        seg_view = raw.get("segmentation_view")
        if seg_view is not None and seg_view not in views:
            problems.append(f"'segmentation_view' is '{seg_view}', which is not one of 'views' {views}")
            seg_view = None

    for key in ("channel_names", "file_ending", "numTraining") + (() if nnunet else ("labels", "diagnoses")):
        if key not in raw:
            problems.append(f"dataset.json lacks the required key '{key}'")
    if nnunet and "labels" not in raw:
        problems.append("dataset.json lacks the required key 'labels'")
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        warnings.append(f"unknown keys in dataset.json are ignored (typo?): {unknown}")

    channel_names = _parse_channel_names(raw.get("channel_names", raw.get("modality")), views, problems)
    labels = _parse_labels(raw.get("labels", {"background": 0}), problems)
    diagnoses = raw.get("diagnoses", [])
    if not isinstance(diagnoses, list) or not all(isinstance(d, str) and d for d in diagnoses):
        problems.append("'diagnoses' must be a list of abnormality names (may be empty)")
        diagnoses = []
    elif len(set(diagnoses)) != len(diagnoses):
        problems.append("'diagnoses' lists a name twice")
    if "case_id" in diagnoses:
        problems.append("'case_id' cannot be a diagnosis name")
    if not nnunet and seg_view is None and len(labels) > 1:
        problems.append("'labels' lists structures but 'segmentation_view' is missing")
    file_ending = raw.get("file_ending", ".nii.gz")
    if not isinstance(file_ending, str) or not file_ending.startswith("."):
        problems.append(f"'file_ending' must be a string starting with '.', e.g. \".nii.gz\" (found {file_ending!r})")
        file_ending = ".nii.gz"
    num_training = raw.get("numTraining", 0)
    if isinstance(num_training, bool) or not isinstance(num_training, int) or num_training < 0:
        problems.append(f"'numTraining' must be a non-negative integer (found {num_training!r})")
        num_training = 0
    for key in ("numUnlabeled", "numTest"):
        value = raw.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            problems.append(f"'{key}' must be a non-negative integer (found {value!r})")

    spec = DatasetSpec(root=root, name=str(raw.get("name", root.name)), views=list(views),
                       segmentation_view=seg_view, channel_names=channel_names, labels=labels,
                       diagnoses=list(diagnoses), file_ending=file_ending, num_training=num_training,
                       nnunet_format=nnunet, raw=raw)
    return spec, problems, warnings


def load_dataset(root: PathLike) -> DatasetSpec:
    """Load a dataset folder; any dataset.json problem raises one OrthoError listing all of them."""
    spec, problems = parse_dataset_json(root)
    if problems or spec is None:
        raise OrthoError("dataset.json is invalid:\n  - " + "\n  - ".join(problems), Path(root) / "dataset.json",
                         fix="correct the listed keys (docs/dataset_format.md describes each)")
    return spec


def parse_diagnoses(spec: DatasetSpec, path: Optional[PathLike] = None) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """Read diagnoses.csv (or ``path``, e.g. diagnosesTs.csv) into case -> float array (NaN = unknown) and a
    list of every problem found."""
    table, problems = parse_diagnoses_detailed(spec, path)
    return table, [message for message, _ in problems]


def parse_diagnoses_detailed(spec: DatasetSpec, path: Optional[PathLike] = None
                             ) -> Tuple[Dict[str, np.ndarray], List[Tuple[str, str]]]:
    """As :func:`parse_diagnoses`, but every problem comes as (message naming file and line, how to fix it)."""
    table: Dict[str, np.ndarray] = {}
    problems: List[Tuple[str, str]] = []
    path = spec.diagnoses_csv if path is None else Path(path)
    header_hint = f"case_id,{','.join(spec.diagnoses)}"
    if not spec.diagnoses:
        return table, problems
    if not path.is_file():
        return table, [(f"{path}: missing; dataset.json declares diagnoses {spec.diagnoses}",
                        f"create {path.name} with the header '{header_hint}' (empty cells mean unknown), "
                        "or set \"diagnoses\": [] in dataset.json")]
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        return table, [(f"{path}: unreadable CSV ({e})", "save the table as UTF-8 comma-separated text")]
    if not rows:
        return table, [(f"{path}: empty; expected a header '{header_hint}'",
                        f"write the header '{header_hint}' and one row per case")]
    header = [h.strip() for h in rows[0]]
    if not header or header[0] != "case_id":
        problems.append((f"{path}: the first column must be 'case_id' (found '{header[0] if header else ''}')",
                         f"make the header '{header_hint}'"))
    columns = header[1:]
    missing = [d for d in spec.diagnoses if d not in columns]
    extra = [c for c in columns if c not in spec.diagnoses]
    if missing:
        problems.append((f"{path}: columns missing for diagnoses {missing}",
                         f"make the header '{header_hint}' (the names in dataset.json 'diagnoses')"))
    if extra:
        problems.append((f"{path}: columns {extra} are not in dataset.json 'diagnoses'",
                         "rename them to match dataset.json 'diagnoses', or add them there"))
    dup_cols = sorted({c for c in columns if columns.count(c) > 1})
    if dup_cols:
        problems.append((f"{path}: duplicated columns {dup_cols}", "keep one column per diagnosis"))
    col_index = {d: header.index(d) for d in spec.diagnoses if d in header}
    first_line: Dict[str, int] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            problems.append((f"{path}, line {line_no}: {len(row)} cells but the header has {len(header)}",
                             "give every row one cell per header column (leave unknown cells empty)"))
            continue
        case = row[0].strip()
        if not case:
            problems.append((f"{path}, line {line_no}: empty case_id", "fill in the case id or delete the row"))
            continue
        if case in table:
            problems.append((f"{path}, line {line_no}: case '{case}' appears twice (first on line "
                             f"{first_line[case]})", "keep one row per case"))
            continue
        values = np.full(len(spec.diagnoses), np.nan, dtype=np.float32)
        for i, d in enumerate(spec.diagnoses):
            if d not in col_index:
                continue
            cell = row[col_index[d]].strip()
            if cell == "":
                continue
            if cell in ("0", "1", "0.0", "1.0"):
                values[i] = float(cell)
            else:
                problems.append((f"{path}, line {line_no}: '{d}' for case '{case}' is '{cell}'; "
                                 f"allowed are 0, 1 or empty (unknown)",
                                 "write 1 (present), 0 (absent) or leave the cell empty (unknown)"))
        table[case] = values
        first_line[case] = line_no
    return table, problems
