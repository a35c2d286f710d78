"""``ortho_verify_dataset``: find every problem in a raw dataset, name its file and its fix, change nothing.

Why: a broken dataset should fail here, in seconds, with a list a person can work through — not hours later
inside preprocessing with a traceback. The checks follow docs/dataset_format.md; per-case voxel checks live in
:mod:`orthonet.verify_case` and run in parallel.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set

import numpy as np
from tqdm import tqdm

from orthonet.cli_utils import run_cli
from orthonet.dataset import (DIAGNOSES_FILES, LABEL_FOLDERS, SPLIT_FOLDERS, DatasetSpec, parse_dataset_json_detailed,
                              parse_diagnoses_detailed)
from orthonet.errors import OrthoError
from orthonet.paths import raw_dataset_dir
from orthonet.verify_case import CaseResult, CaseTask, check_case
from orthonet.verify_report import (KIND_CASE_IDS, KIND_CENTERS, KIND_DIAGNOSES, KIND_JSON, KIND_LABEL_VALUES,
                                    KIND_MISSING, KIND_NAMING, Problem, VerifyReport)

__all__ = ["verify_dataset", "VerifyReport", "Problem", "main", "cli"]

_DOC = "docs/dataset_format.md"
_MAX_LISTED = 10

Inventory = Dict[str, Dict[str, Dict[str, Dict[int, Path]]]]  # split -> case -> view -> channel -> path


def verify_dataset(dataset_dir: Path, num_processes: int = 1, progress: bool = True) -> VerifyReport:
    """Check a raw dataset folder and return every problem found (never raises for data problems).

    Reads every image once and writes nothing. ``num_processes`` > 1 checks cases in parallel worker processes.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise OrthoError("dataset folder not found", dataset_dir,
                         fix="check the path or the dataset id (and ORTHO_raw)")
    if int(num_processes) < 1:
        raise OrthoError(f"num_processes must be at least 1 (got {num_processes})", fix="pass -np 1 or more")
    report = VerifyReport(dataset_dir)
    spec = _check_dataset_json(dataset_dir, report)
    if spec is None:
        return report
    report.views = list(spec.views)
    inventory = _inventory_images(spec, report)
    _check_case_ids(spec, inventory, report)
    labels = _inventory_labels(spec, inventory, report)
    report.counts = {split: len(inventory[split]) for split in SPLIT_FOLDERS}
    report.counts["labelled"] = len(labels.get("Tr", {}))

    tasks = [CaseTask(spec, split, case, inventory[split][case], labels.get(split, {}).get(case))
             for split in SPLIT_FOLDERS for case in sorted(inventory[split])]
    label_values: Set[int] = set()
    for result in _run(tasks, num_processes, progress):
        report.problems.extend(result.problems)
        label_values |= result.label_values
    _check_label_coverage(spec, labels, label_values, report)
    _check_diagnoses(spec, inventory, report)
    _check_centers(spec, inventory, report)
    return report


def _run(tasks: List[CaseTask], num_processes: int, progress: bool) -> Iterable[CaseResult]:
    """Check cases in order, in this process or in a pool (a worker that dies raises instead of hanging)."""
    bar = tqdm(total=len(tasks), desc="verifying cases", unit="case", disable=not progress or not tasks)
    try:
        if num_processes <= 1 or len(tasks) <= 1:
            for task in tasks:
                yield check_case(task)
                bar.update()
        else:
            with ProcessPoolExecutor(min(num_processes, len(tasks)), mp_context=_mp_context()) as pool:
                try:
                    for result in pool.map(check_case, tasks, chunksize=1):
                        yield result
                        bar.update()
                except BrokenProcessPool as e:
                    raise OrthoError(f"a verification worker process died ({e})",
                                     fix="run again with -np 1 (and check free memory)") from None
    finally:
        bar.close()


def _mp_context():
    """fork where available (no re-import of __main__, works from notebooks and stdin), spawn elsewhere."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods and sys.platform != "darwin" else "spawn")


# ------------------------------------------------------------------------------------------------------------
# dataset.json
# ------------------------------------------------------------------------------------------------------------
def _check_dataset_json(root: Path, report: VerifyReport) -> Optional[DatasetSpec]:
    spec, errors, warnings = parse_dataset_json_detailed(root)
    if spec is None:
        for e in errors:
            text = _relative(e, root)
            message, _, fix = text.partition("\n  fix: ")
            if message.startswith("dataset.json: "):
                message = message[len("dataset.json: "):]
            report.error(KIND_JSON, "dataset.json", message, fix or f"write a dataset.json as in {_DOC}")
        return None
    for e in errors:
        report.error(KIND_JSON, "dataset.json", e, f"edit dataset.json ({_DOC} describes every key)")
    for w in warnings:
        report.warning(KIND_JSON, "dataset.json", w, f"remove or rename the key ({_DOC} lists the known keys)")
    return spec


def _relative(text: str, root: Path) -> str:
    return text.replace(str(root) + os.sep, "").replace(str(root), ".")


# ------------------------------------------------------------------------------------------------------------
# file inventory
# ------------------------------------------------------------------------------------------------------------
def _naming_hint(spec: DatasetSpec) -> str:
    if spec.nnunet_format:
        return f"{{CASE}}_{{CHANNEL:04d}}{spec.file_ending} (nnU-Net naming)"
    return f"{{CASE}}_{{VIEW}}_{{CHANNEL:04d}}{spec.file_ending} with VIEW one of {spec.views}"


def _visible_entries(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _inventory_images(spec: DatasetSpec, report: VerifyReport) -> Inventory:
    """Map every image file to (split, case, view, channel); report misnamed files and missing views/channels."""
    inventory: Inventory = {split: {} for split in SPLIT_FOLDERS}
    for split, folder_name in SPLIT_FOLDERS.items():
        folder = spec.root / folder_name
        if not folder.is_dir():
            if split == "Tr":
                report.error(KIND_MISSING, folder_name + "/", "the training image folder is missing",
                             f"create {folder_name}/ with files named {_naming_hint(spec)}")
            continue
        for entry in _visible_entries(folder):
            rel = f"{folder_name}/{entry.name}"
            if entry.is_dir():
                report.warning(KIND_NAMING, rel + "/", "sub-folders are ignored", "move the files up or remove it")
                continue
            parsed = spec.parse_image_name(entry.name)
            if parsed is None:
                why = (f"does not end with file_ending '{spec.file_ending}'" if not entry.name.endswith(spec.file_ending)
                       else "does not follow the naming")
                report.warning(KIND_NAMING, rel, f"{why}; the file is ignored",
                               f"rename it to {_naming_hint(spec)}, or remove it")
                continue
            case, view, channel = parsed
            if channel >= spec.num_channels(view):
                report.warning(KIND_NAMING, rel, f"channel {channel} is not declared in 'channel_names' "
                               f"(view '{view}' has {spec.num_channels(view)}); the file is ignored",
                               "declare the channel in dataset.json 'channel_names' or remove the file")
                continue
            inventory[split].setdefault(case, {}).setdefault(view, {})[channel] = entry
        for case, views in sorted(inventory[split].items()):
            for view in spec.views:
                have = views.get(view, {})
                missing = [c for c in range(spec.num_channels(view)) if c not in have]
                for c in missing:
                    name = spec.image_name(case, view, c)
                    what = (f"view '{view}'" if not have else f"channel {c} ({spec.channels(view)[c]}) of view "
                            f"'{view}'")
                    report.error(KIND_MISSING, f"{folder_name}/{name}",
                                 f"missing: case '{case}' has no {what}",
                                 f"add {name}, or move all files of case '{case}' out of {folder_name}/")
    return inventory


def _check_case_ids(spec: DatasetSpec, inventory: Inventory, report: VerifyReport) -> None:
    where: Dict[str, List[str]] = defaultdict(list)
    for split, cases in inventory.items():
        for case in cases:
            where[case].append(SPLIT_FOLDERS[split])
    for case, folders in sorted(where.items()):
        if len(folders) > 1:
            report.error(KIND_CASE_IDS, f"{folders[1]}/", f"case id '{case}' is used in {' and '.join(folders)}",
                         "case ids must be unique across imagesTr, imagesUnlabeled and imagesTs: rename one")
    n_train = len(inventory["Tr"])
    if n_train != spec.num_training:
        report.error(KIND_CASE_IDS, "dataset.json", f"'numTraining' is {spec.num_training} but imagesTr/ holds "
                     f"{n_train} case{'s' * (n_train != 1)}", f"set \"numTraining\": {n_train} (or add the missing "
                     "cases)")
    if n_train == 0 and (spec.root / SPLIT_FOLDERS["Tr"]).is_dir():
        report.error(KIND_CASE_IDS, "imagesTr/", "no training cases found",
                     f"add images named {_naming_hint(spec)}")
    for key, split in (("numUnlabeled", "Unlabeled"), ("numTest", "Ts")):
        declared, found = spec.raw.get(key), len(inventory[split])
        if isinstance(declared, int) and not isinstance(declared, bool) and declared != found:
            report.error(KIND_CASE_IDS, "dataset.json", f"'{key}' is {declared} but {SPLIT_FOLDERS[split]}/ holds "
                         f"{found} case{'s' * (found != 1)}", f"set \"{key}\": {found} (or remove the key)")


def _inventory_labels(spec: DatasetSpec, inventory: Inventory, report: VerifyReport) -> Dict[str, Dict[str, Path]]:
    """split -> case -> label file of the segmentation view; report orphans and misnamed label files."""
    labels: Dict[str, Dict[str, Path]] = {}
    for split, folder_name in LABEL_FOLDERS.items():
        folder = spec.root / folder_name
        if not folder.is_dir():
            continue
        found: Dict[str, Path] = {}
        image_folder = SPLIT_FOLDERS[split]
        for entry in _visible_entries(folder):
            rel = f"{folder_name}/{entry.name}"
            if entry.is_dir():
                report.warning(KIND_NAMING, rel + "/", "sub-folders are ignored", "move the files up or remove it")
                continue
            parsed = spec.parse_label_name(entry.name)
            if parsed is None:
                pattern = (f"{{CASE}}{spec.file_ending}" if spec.nnunet_format
                           else f"{{CASE}}_{spec.segmentation_view or '{VIEW}'}{spec.file_ending}")
                report.warning(KIND_NAMING, rel, "does not follow the label naming; the file is ignored",
                               f"rename it to {pattern}, or remove it")
                continue
            case, view = parsed
            if spec.segmentation_view is None:
                report.warning(KIND_NAMING, rel, "dataset.json has no 'segmentation_view', so labels are ignored",
                               "set 'segmentation_view' (and 'labels') in dataset.json, or remove the label")
                continue
            if view != spec.segmentation_view:
                report.warning(KIND_NAMING, rel, f"label for view '{view}', but the segmentation view is "
                               f"'{spec.segmentation_view}'; the file is ignored",
                               f"labels must be drawn on the {spec.segmentation_view} grid: resample it there and "
                               f"name it {case}_{spec.segmentation_view}{spec.file_ending}")
                continue
            if case not in inventory[split]:
                other = [SPLIT_FOLDERS[s] for s in SPLIT_FOLDERS if case in inventory[s]]
                hint = f" (the case is in {other[0]}/)" if other else ""
                report.error(KIND_MISSING, rel, f"label for case '{case}', which has no images in "
                             f"{image_folder}/{hint}", "rename it to match its case's images, or remove it")
                continue
            found[case] = entry
        labels[split] = found
    if spec.nnunet_format and spec.has_segmentation:
        unlabelled = sorted(set(inventory["Tr"]) - set(labels.get("Tr", {})))
        if unlabelled:
            report.warning(KIND_MISSING, "labelsTr/", f"{len(unlabelled)} training case(s) have no label: "
                           f"{_listing(unlabelled)}; segmentation training skips them",
                           f"add labelsTr/{{CASE}}{spec.file_ending} for each")
    return labels


def _check_label_coverage(spec: DatasetSpec, labels: Dict[str, Dict[str, Path]], seen: Set[int],
                          report: VerifyReport) -> None:
    if not spec.has_segmentation:
        return
    if not labels.get("Tr"):
        report.warning(KIND_MISSING, "labelsTr/", "no training case has a label; segmentation cannot be trained",
                       f"add labelsTr/{{CASE}}_{spec.segmentation_view}{spec.file_ending} files, or make the "
                       "dataset diagnosis-only by declaring only \"background\": 0 in 'labels'")
        return
    never = [name for name, value in spec.labels.items() if value not in seen and name not in ("background", "ignore")]
    if never:
        report.warning(KIND_LABEL_VALUES, "labelsTr/", f"declared structures never appear in any label: {never}",
                       "check the label export, or remove them from dataset.json 'labels'")


# ------------------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------------------
def _check_diagnoses(spec: DatasetSpec, inventory: Inventory, report: VerifyReport) -> None:
    root = spec.root
    for split, file_name in DIAGNOSES_FILES.items():
        path = root / file_name
        if not spec.diagnoses:
            if path.is_file():
                report.warning(KIND_DIAGNOSES, file_name, "dataset.json declares no 'diagnoses'; the table is "
                               "ignored", "list the abnormality names in dataset.json 'diagnoses'")
            continue
        if split != "Tr" and not path.is_file():
            continue  # test ground truth is optional
        table, problems = parse_diagnoses_detailed(spec, path)
        for message, fix in problems:
            report.error(KIND_DIAGNOSES, file_name, _strip_file_prefix(_relative(message, root), file_name), fix)
        cases = inventory[split]
        unknown = sorted(set(table) - set(cases))
        for case in unknown:
            other = [s for s in SPLIT_FOLDERS if s != split and case in inventory[s]]
            if other:
                hint = (f"the case is in {SPLIT_FOLDERS[other[0]]}/"
                        + (f"; its diagnoses belong in {DIAGNOSES_FILES[other[0]]}" if other[0] in DIAGNOSES_FILES
                           else "; unlabeled cases have no diagnoses"))
            else:
                hint = f"no such case in {SPLIT_FOLDERS[split]}/"
            report.error(KIND_DIAGNOSES, file_name, f"unknown case id '{case}' ({hint})",
                         "correct the case id or delete the row")
        if split == "Tr" and table:
            no_row = sorted(set(cases) - set(table))
            if no_row:
                report.warning(KIND_DIAGNOSES, file_name, f"{len(no_row)} training case(s) have no row: "
                               f"{_listing(no_row)}; their diagnoses are treated as unknown",
                               "add a row per case (empty cells mean unknown)")
            _check_diagnosis_columns(spec, [table[c] for c in cases if c in table], file_name, report)


def _check_diagnosis_columns(spec: DatasetSpec, rows: list, file_name: str, report: VerifyReport) -> None:
    if not rows:
        return
    values = np.stack(rows)
    for i, name in enumerate(spec.diagnoses):
        known = values[:, i][~np.isnan(values[:, i])]
        if known.size == 0:
            report.warning(KIND_DIAGNOSES, file_name, f"'{name}' is unknown for every case",
                           "fill in 0/1 values, or remove the diagnosis from dataset.json")
        elif known.min() == known.max():
            report.warning(KIND_DIAGNOSES, file_name, f"'{name}' is {int(known[0])} for every case with a value; "
                           "it cannot be learned or evaluated", "add cases of both kinds")


def _check_centers(spec: DatasetSpec, inventory: Inventory, report: VerifyReport) -> None:
    path = spec.centers_csv
    if not path.is_file():
        return
    name = path.name
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        report.error(KIND_CENTERS, name, f"unreadable CSV ({e})", "save it as UTF-8 text with columns case_id,center")
        return
    header = [h.strip() for h in rows[0]] if rows else []
    if "case_id" not in header or "center" not in header:
        report.error(KIND_CENTERS, name, f"the header must contain 'case_id' and 'center' (found {header})",
                     "write the header 'case_id,center'")
        return
    ic, ik = header.index("case_id"), header.index("center")
    known = {c for cases in inventory.values() for c in cases}
    seen: Dict[str, int] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= max(ic, ik):
            report.error(KIND_CENTERS, name, f"line {line_no}: too few cells", "write 'case_id,center' per row")
            continue
        case, center = row[ic].strip(), row[ik].strip()
        if case in seen:
            report.error(KIND_CENTERS, name, f"line {line_no}: case '{case}' appears twice (first on line "
                         f"{seen[case]})", "keep one row per case")
            continue
        seen[case] = line_no
        if case not in known:
            report.error(KIND_CENTERS, name, f"line {line_no}: unknown case id '{case}' (no images in any split)",
                         "correct the case id or delete the row")
        if not center:
            report.error(KIND_CENTERS, name, f"line {line_no}: case '{case}' has an empty center",
                         "fill in the center name")
    missing = sorted(known - set(seen))
    if missing:
        report.warning(KIND_CENTERS, name, f"{len(missing)} case(s) have no center: {_listing(missing)}",
                       "add a row per case (the center drives per-center evaluation and harmonisation)")


def _strip_file_prefix(message: str, file_name: str) -> str:
    for prefix in (f"{file_name}: ", f"{file_name}, "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------
def default_num_processes() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class _DeprecatedSpelling(argparse.Action):
    """A hidden old spelling of an option (``--num_processes``): stores like the new one, says which to use.

    Why: every other command spells long options with hyphens; scripts written for the underscore spelling keep
    working.
    """

    def __init__(self, option_strings, dest, new_spelling: str, store_true: bool = False, **kwargs):
        self.new_spelling, self.store_true = new_spelling, store_true
        super().__init__(option_strings, dest, nargs=0 if store_true else None, default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated, use {self.new_spelling}", file=sys.stderr)
        setattr(namespace, self.dest, True if self.store_true else values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ortho_verify_dataset",
                                     description="Check a raw dataset and report every problem with its file and "
                                                 "fix. Never modifies the dataset. Exit code 1 on any error.")
    parser.add_argument("-d", "--dataset", required=True, help="dataset id (101) or folder name (Dataset101_Knee)")
    parser.add_argument("-np", "--num-processes", type=int, default=default_num_processes(),
                        help="worker processes for the per-case checks (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    # the old underscore spellings: hidden, deprecated aliases
    parser.add_argument("--num_processes", dest="num_processes", type=int, action=_DeprecatedSpelling,
                        new_spelling="--num-processes")
    parser.add_argument("--no_progress", dest="no_progress", action=_DeprecatedSpelling,
                        new_spelling="--no-progress", store_true=True)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    dataset_dir = raw_dataset_dir(args.dataset)
    report = verify_dataset(dataset_dir, num_processes=args.num_processes, progress=not args.no_progress)
    print(report.format())
    return 0 if report.ok else 1


cli = run_cli(main)
