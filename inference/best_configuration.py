"""``ortho_find_best_configuration -d 101 [-c ...] [-tr ...] [-p ...] [-f 0 1 2 3 4]``.

For every trained model folder (``{Trainer}__{plans}__{config}[__scratch]``; label-fraction runs ``__lf*`` are
studies, not deployment candidates, and are skipped) that has a validation of every requested fold:

1. **Cross-validation results**: the folds' ``validation/summary.json`` per-case Dice are pooled (mean per
   structure over all out-of-fold cases, then the mean over structures); the folds' ``validation/diagnoses.csv``
   out-of-fold probabilities are pooled and scored against the dataset's ``diagnoses.csv`` (AUC per diagnosis,
   macro mean). Pooling (instead of averaging per-fold numbers) weighs every case once, as nnU-Net does.
2. **Best model per task** (:func:`orthonet.inference.thresholds.rank_configurations`): segmentation by mean Dice,
   diagnosis by macro AUC. One multitask model may win both; otherwise the segmentation comes from one model and
   the diagnoses from another.
3. **Thresholds**: per diagnosis, Youden's J on the pooled out-of-fold probabilities of the diagnosis model
   (:func:`orthonet.inference.thresholds.choose_thresholds`; 0.5 where a diagnosis has one class only).
4. Writes ``$ORTHO_results/DatasetXXX/inference_instructions.json`` (model folders, folds, roles, thresholds,
   cross-validation metrics of every candidate), which ``ortho_predict`` reads when no model is named, and prints
   the predict command.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from orthonet.inference.diagnoses_table import read_diagnoses_csv
from orthonet.inference.model_selection import INSTRUCTIONS_FILE, available_folds
from orthonet.inference.thresholds import DIAG_KEY, SEG_KEY, choose_thresholds, rank_configurations
from orthonet import metrics
from orthonet.cli_utils import run_cli
from orthonet.dataset import DatasetSpec, parse_dataset_json, parse_diagnoses
from orthonet.errors import OrthoError
from orthonet.fileio import load_json, save_json
from orthonet.paths import preprocessed_root, raw_root, resolve_dataset_name, results_root

DEFAULT_FOLDS = ("0", "1", "2", "3", "4")


@dataclass
class CrossValidation:
    """One candidate's pooled out-of-fold results."""

    name: str
    folder: Path
    folds: List[str]
    task: str
    dice: Dict[str, float] = field(default_factory=dict)       # structure -> mean Dice over OOF cases
    auc: Dict[str, float] = field(default_factory=dict)        # diagnosis -> pooled AUC
    oof_probabilities: Dict[str, np.ndarray] = field(default_factory=dict)
    num_seg_cases: int = 0
    num_diag_cases: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def metrics(self) -> Dict[str, float]:
        out = {}
        if self.dice:
            out[SEG_KEY] = metrics.nanmean(self.dice.values())
        if self.auc:
            out[DIAG_KEY] = metrics.nanmean(self.auc.values())
        return out

    def to_dict(self) -> Dict:
        return {"folder": self.name, "task": self.task, "folds": self.folds, "metrics": _finite(self.metrics),
                "dice": _finite(self.dice), "auc": _finite(self.auc), "num_segmentation_cases": self.num_seg_cases,
                "num_diagnosis_cases": self.num_diag_cases, "notes": self.notes}


def _finite(d: Mapping[str, float]) -> Dict[str, Optional[float]]:
    return {k: (float(v) if v is not None and math.isfinite(v) else None) for k, v in d.items()}


# ------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------
def training_labels(dataset_name: str, spec: DatasetSpec) -> Dict[str, np.ndarray]:
    """The training diagnoses (0/1, NaN unknown) from the raw dataset or its preprocessed copy."""
    for folder in (raw_root() / dataset_name, preprocessed_root() / dataset_name):
        s, _ = parse_dataset_json(folder)
        if s is not None and s.diagnoses_csv.is_file():
            table, problems = parse_diagnoses(s)
            if problems:
                raise OrthoError("diagnoses.csv has problems: " + "; ".join(str(p) for p in problems[:3]),
                                 s.diagnoses_csv, fix="run ortho_verify_dataset and fix the listed rows")
            return table
    raise OrthoError(f"the training diagnoses.csv of {dataset_name} is not here (looked in the raw and "
                     "preprocessed dataset folders); thresholds need the labels of the out-of-fold cases",
                     raw_root() / dataset_name / "diagnoses.csv", fix="set ORTHO_raw to the raw dataset")


def model_task(folder: Path, folds: Sequence[str]) -> Optional[str]:
    """The task recorded by ortho_train in a fold's run_config.json (None if no fold has one)."""
    for f in folds:
        path = folder / f"fold_{f}" / "run_config.json"
        if path.is_file():
            task = (load_json(path).get("model_config") or {}).get("task")
            if task:
                return str(task)
    return None


def parse_model_folder_name(name: str) -> Optional[Dict[str, str]]:
    """``{'trainer', 'plans', 'configuration', 'suffix'}`` for ``Trainer__plans__config[__...]``."""
    parts = name.split("__")
    if len(parts) < 3 or parts[0] == "Pretrain":
        return None
    return {"trainer": parts[0], "plans": parts[1], "configuration": parts[2], "suffix": "__".join(parts[3:])}


def candidate_folders(results_dir: Path, configurations: Optional[Sequence[str]] = None,
                      trainers: Optional[Sequence[str]] = None, plans: Optional[Sequence[str]] = None
                      ) -> List[Path]:
    out = []
    for sub in sorted(results_dir.iterdir()) if results_dir.is_dir() else []:
        info = parse_model_folder_name(sub.name) if sub.is_dir() else None
        if info is None or info["suffix"].startswith("lf") or "__lf" in sub.name:
            continue
        if configurations and info["configuration"] not in configurations:
            continue
        if trainers and info["trainer"] not in trainers and sub.name not in trainers:
            continue
        if plans and info["plans"] not in plans:
            continue
        out.append(sub)
    return out


# ------------------------------------------------------------------------------------------------------------
# cross-validation
# ------------------------------------------------------------------------------------------------------------
def aggregate_cross_validation(folder: Path, folds: Sequence[str], spec: DatasetSpec,
                               labels: Optional[Mapping[str, np.ndarray]]) -> CrossValidation:
    """Pool the folds' validation results of one model folder (OrthoError when a fold was not validated)."""
    missing = [f for f in folds if not (folder / f"fold_{f}" / "validation" / "summary.json").is_file()]
    if missing:
        raise OrthoError(f"{folder.name}: fold(s) {', '.join(missing)} have no validation/summary.json",
                         folder, fix="train (or validate with ortho_train ... --val) every fold first")
    task = model_task(folder, folds) or "unknown"
    cv = CrossValidation(folder.name, folder, list(folds), task)
    per_case_dice: Dict[str, Dict[str, Optional[float]]] = {}
    oof: Dict[str, np.ndarray] = {}
    for f in folds:
        vdir = folder / f"fold_{f}" / "validation"
        summary = load_json(vdir / "summary.json", "validation summary")
        for case, dice in ((summary.get("segmentation") or {}).get("per_case") or {}).items():
            per_case_dice[case] = dice
        if "diagnosis" in summary:
            csv_path = vdir / "diagnoses.csv"
            if not csv_path.is_file():
                cv.notes.append(f"fold {f}: validation/diagnoses.csv missing; diagnosis not scored")
                oof = {}
                break
            for case, row in read_diagnoses_csv(csv_path, spec.diagnoses).items():
                oof[case] = np.array([row.probabilities.get(d, np.nan) for d in spec.diagnoses], float)
    if per_case_dice:
        structures = spec.class_names[1:]
        cv.dice = {s: metrics.nanmean((d.get(s) if d.get(s) is not None else np.nan)
                                      for d in per_case_dice.values()) for s in structures}
        cv.num_seg_cases = len(per_case_dice)
    if oof and labels is not None:
        cases = sorted(c for c in oof if c in labels)
        cv.oof_probabilities = {c: oof[c] for c in cases}
        cv.num_diag_cases = len(cases)
        if cases:
            probs = np.stack([oof[c] for c in cases])
            y = np.stack([np.asarray(labels[c], float) for c in cases])
            cv.auc = {d: metrics.roc_auc(y[:, i], probs[:, i]) for i, d in enumerate(spec.diagnoses)}
        unlabelled = sorted(set(oof) - set(labels))
        if unlabelled:
            cv.notes.append(f"{len(unlabelled)} out-of-fold case(s) without diagnosis labels ignored")
    return cv


def collect_candidates(dataset_name: str, spec: DatasetSpec, folds: Sequence[str],
                       configurations: Optional[Sequence[str]] = None, trainers: Optional[Sequence[str]] = None,
                       plans: Optional[Sequence[str]] = None) -> Tuple[List[CrossValidation], List[str]]:
    """Every eligible candidate's cross-validation, plus notes on the folders that were skipped."""
    results_dir = results_root() / dataset_name
    labels = training_labels(dataset_name, spec) if spec.diagnoses else None
    found, skipped = [], []
    for folder in candidate_folders(results_dir, configurations, trainers, plans):
        try:
            found.append(aggregate_cross_validation(folder, folds, spec, labels))
        except OrthoError as e:
            skipped.append(f"{folder.name} skipped: {e.message}")
    if not found:
        have = ", ".join(f"{p.name} (folds {', '.join(available_folds(p)) or 'none'})"
                         for p in candidate_folders(results_dir)) or "none"
        raise OrthoError(f"no trained model of {dataset_name} has a validation of fold(s) {', '.join(folds)} "
                         f"(models: {have})" + "".join(f"\n  {s}" for s in skipped), results_dir,
                         fix="train those folds (ortho_train DATASET CONFIG FOLD) or pass the folds you have "
                             "with -f")
    return found, skipped


# ------------------------------------------------------------------------------------------------------------
# choosing
# ------------------------------------------------------------------------------------------------------------
def find_best_configuration(dataset: str, folds: Sequence[str] = DEFAULT_FOLDS,
                            configurations: Optional[Sequence[str]] = None, trainers: Optional[Sequence[str]] = None,
                            plans: Optional[Sequence[str]] = None, write: bool = True) -> Dict:
    """Choose the models and thresholds; returns (and with ``write`` saves) the inference instructions."""
    name = resolve_dataset_name(dataset)
    folds = [str(f) for f in folds]
    if "all" in folds:
        raise OrthoError("fold 'all' has no held-out cases: it cannot be cross-validated",
                         fix="pass the cross-validation folds, e.g. -f 0 1 2 3 4")
    spec = _dataset_spec(name)
    candidates, skipped = collect_candidates(name, spec, folds, configurations, trainers, plans)
    by_name = {c.name: c for c in candidates}
    chosen: Dict[str, Optional[str]] = {"seg": None, "diag": None}
    for role, needed in (("seg", spec.has_segmentation), ("diag", bool(spec.diagnoses))):
        if needed:
            ranked = rank_configurations({c.name: c.metrics for c in candidates}, task=role)
            chosen[role] = ranked[0][0] if ranked else None
    if chosen["seg"] is None and chosen["diag"] is None:
        raise OrthoError(f"no candidate of {name} reports cross-validation metrics ("
                         f"{', '.join(by_name)})", results_root() / name,
                         fix="rerun the final validation of each fold (ortho_train ... --val)")
    models: List[Dict] = []
    for role in ("seg", "diag"):
        folder = chosen[role]
        if folder is None:
            continue
        existing = next((m for m in models if m["folder"] == folder), None)
        if existing:
            existing["roles"].append(role)
        else:
            c = by_name[folder]
            models.append({"folder": folder, "folds": c.folds, "task": c.task, "roles": [role],
                           "cv_metrics": _finite(c.metrics)})
    thresholds: Dict[str, float] = {}
    num_oof = 0
    if chosen["diag"] is not None:
        c = by_name[chosen["diag"]]
        labels = training_labels(name, spec)
        thresholds = choose_thresholds(c.oof_probabilities, labels, spec.diagnoses)
        num_oof = c.num_diag_cases
    instructions = {
        "dataset_name": name, "written_by": "ortho_find_best_configuration", "folds": folds,
        "models": models, "thresholds": thresholds,
        "threshold_method": f"Youden's J on {num_oof} pooled out-of-fold case(s) (0.5 where a diagnosis has one "
                            f"class only)" if chosen["diag"] else None,
        "ranking": {"seg": "mean foreground Dice (pooled out-of-fold)", "diag": "macro AUC (pooled out-of-fold)"},
        "candidates": [c.to_dict() for c in candidates], "skipped": skipped,
    }
    instructions["predict_command"] = predict_command(name, models)
    if write:
        save_json(instructions, results_root() / name / INSTRUCTIONS_FILE)
    return instructions


def _dataset_spec(name: str) -> DatasetSpec:
    from orthonet.inference.model_selection import find_dataset_spec
    return find_dataset_spec(name)


def predict_command(dataset_name: str, models: Sequence[Mapping]) -> Dict[str, str]:
    """The command that uses the instructions, and (for a single model) its explicit equivalent."""
    out = {"default": f"ortho_predict -d {dataset_name} -i INPUT_FOLDER -o OUTPUT_FOLDER"}
    if len(models) == 1:
        m = models[0]
        info = parse_model_folder_name(m["folder"])
        folds = " ".join(m["folds"])
        if info and not info["suffix"]:
            out["explicit"] = (f"ortho_predict -d {dataset_name} -i INPUT_FOLDER -o OUTPUT_FOLDER -c "
                               f"{info['configuration']} -tr {info['trainer']} -p {info['plans']} -f {folds}")
        else:
            out["explicit"] = (f"ortho_predict -d {dataset_name} -i INPUT_FOLDER -o OUTPUT_FOLDER -tr "
                               f"{m['folder']} -f {folds}")
    return out


def format_instructions(instructions: Dict) -> str:
    lines = [f"cross-validation of {instructions['dataset_name']} (folds {', '.join(instructions['folds'])}):"]
    for c in instructions["candidates"]:
        m = c["metrics"]
        bits = []
        if m.get(SEG_KEY) is not None:
            bits.append(f"mean Dice {m[SEG_KEY]:.4f} ({c['num_segmentation_cases']} cases)")
        if m.get(DIAG_KEY) is not None:
            bits.append(f"macro AUC {m[DIAG_KEY]:.4f} ({c['num_diagnosis_cases']} cases)")
        lines.append(f"  {c['folder']:<48} {', '.join(bits) or 'no metrics'}")
    for s in instructions["skipped"]:
        lines.append(f"  ({s})")
    for m in instructions["models"]:
        lines.append(f"best for {' and '.join({'seg': 'segmentation', 'diag': 'diagnosis'}[r] for r in m['roles'])}"
                     f": {m['folder']} (folds {', '.join(m['folds'])})")
    if instructions["thresholds"]:
        lines.append(f"thresholds ({instructions['threshold_method']}): " +
                     ", ".join(f"{d} {t:.4f}" for d, t in instructions["thresholds"].items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ortho_find_best_configuration", description=(
        "Aggregate the folds' validation into cross-validation results, choose the best model per task and "
        "per-diagnosis thresholds (Youden's J on out-of-fold predictions), write inference_instructions.json "
        "for ortho_predict and print the predict command."))
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    p.add_argument("-c", "--configurations", nargs="+", default=None, help="only these configurations")
    p.add_argument("-tr", "--trainers", nargs="+", default=None, help="only these trainers (or model folders)")
    p.add_argument("-p", "--plans", nargs="+", default=None, help="only these plans names")
    p.add_argument("-f", "--folds", nargs="+", default=list(DEFAULT_FOLDS),
                   help="cross-validation folds that must all be validated (default 0 1 2 3 4)")
    p.add_argument("--no-write", action="store_true", help="print the choice without writing the instructions")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    instructions = find_best_configuration(args.dataset, args.folds, args.configurations, args.trainers,
                                           args.plans, write=not args.no_write)
    print(format_instructions(instructions))
    if not args.no_write:
        print(f"written: {results_root() / instructions['dataset_name'] / INSTRUCTIONS_FILE}")
    print("predict with (ortho_predict reads the instructions when no model is named):")
    print(f"  {instructions['predict_command']['default']}")
    if "explicit" in instructions["predict_command"]:
        print("same model named explicitly (thresholds are still taken from the instructions):")
        print(f"  {instructions['predict_command']['explicit']}")
    return 0


find_best_configuration_cli = run_cli(main)
