"""``ortho_evaluate -ref REF -pred PRED -d 101``: segmentation and diagnosis metrics of a prediction folder.

Segmentation: Dice, IoU and HD95 (mm, reference spacing) per structure and case, from label maps named
``{CASE}_{segmentation_view}{ending}`` (or nnU-Net ``{CASE}{ending}``) in REF and PRED; prediction and reference must
be on the same grid (checked: a mismatch is an error naming the case). Diagnosis: AUC, average precision,
sensitivity and specificity per diagnosis (at the prediction's yes/no columns, else 0.5) and their macro means,
from the prediction's ``diagnoses.csv`` (:mod:`orthonet.inference.diagnoses_table`) against a reference CSV in the
dataset's diagnoses.csv format. Metric definitions live in :mod:`orthonet.metrics` (shared with training).

Writes ``summary.json`` (atomic; NaN/inf as null) plus ``roc_curves.png`` and ``dice_boxplot.png`` next to it.
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice, get_bbox_from_mask, pad_bbox

from orthonet.inference.diagnoses_table import CaseDiagnoses, read_diagnoses_csv
from orthonet.inference.input_discovery import split_ending
from orthonet import metrics
from orthonet.cli_utils import run_cli
from orthonet.dataset import DatasetSpec, load_dataset, parse_diagnoses
from orthonet.errors import OrthoError
from orthonet.fileio import atomic_path, save_json
from orthonet.imageio import Geometry, read_image
from orthonet.paths import raw_dataset_dir, resolve_dataset_name, results_dataset_dir

PathLike = Union[str, Path]


# ------------------------------------------------------------------------------------------------------------
# segmentation
# ------------------------------------------------------------------------------------------------------------
def _case_from_label_name(name: str, spec: DatasetSpec) -> Optional[str]:
    parts = split_ending(name)
    if parts is None:
        return None
    stem = parts[0]
    suffix = f"_{spec.segmentation_view}"
    if not spec.nnunet_format and stem.endswith(suffix):
        return stem[:-len(suffix)]
    return stem if spec.nnunet_format else None


def match_label_files(ref_dir: Path, pred_dir: Path, spec: DatasetSpec
                      ) -> Tuple[Dict[str, Tuple[Path, Path]], List[str]]:
    """{case: (ref, pred)} for every reference label map with a prediction of the same name (any image ending),
    and the cases whose prediction is missing."""
    pairs: Dict[str, Tuple[Path, Path]] = {}
    missing: List[str] = []
    pred_by_stem: Dict[str, Path] = {}
    for p in sorted(pred_dir.iterdir()) if pred_dir.is_dir() else []:
        parts = split_ending(p.name)
        if parts and p.is_file():
            pred_by_stem.setdefault(parts[0], p)
    for r in sorted(ref_dir.iterdir()):
        case = _case_from_label_name(r.name, spec) if r.is_file() else None
        if case is None:
            continue
        pred = pred_by_stem.get(split_ending(r.name)[0])
        if pred is None:
            missing.append(case)
        else:
            pairs[case] = (r, pred)
    return pairs, missing


def _labels_or_error(image: sitk.Image, path: Path, allowed: Sequence[int], what: str) -> np.ndarray:
    arr = sitk.GetArrayFromImage(image)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.mod(arr, 1) == 0):
            raise OrthoError(f"{what} label map holds non-integer values", path,
                             fix="label maps must store integer class values")
    values = np.unique(arr).astype(np.int64)
    bad = sorted(set(values.tolist()) - set(allowed))
    if bad:
        raise OrthoError(f"{what} label map holds values {bad[:10]} that dataset.json does not declare "
                         f"(allowed: {list(allowed)})", path, fix="check that -d names the right dataset")
    return arr.astype(np.int16)


def _hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 computed on the padded bounding box of both masks (exact, and much cheaper on large volumes)."""
    union = pred | ref
    if not union.any():
        return float("nan")
    bbox = pad_bbox(get_bbox_from_mask(union), 1, union.shape)
    sl = bounding_box_to_slice(bbox)
    return metrics.hd95(pred[sl], ref[sl], spacing)


def evaluate_label_pair(ref_path: PathLike, pred_path: PathLike, spec: DatasetSpec, case: str
                        ) -> Dict[str, Dict[str, float]]:
    """{structure: {dice, iou, hd95_mm, n_ref, n_pred}} for one case; OrthoError if the grids differ."""
    ref_img, pred_img = read_image(ref_path), read_image(pred_path)
    diff = Geometry.of(ref_img).differences(Geometry.of(pred_img))
    if diff:
        raise OrthoError(f"case {case}: prediction is not on the reference grid ({'; '.join(diff)})", pred_path,
                         fix="predictions must be exported in the original image geometry (ortho_predict does "
                             "this); check that -ref and -pred belong to the same images")
    ref = _labels_or_error(ref_img, Path(ref_path), spec.label_values, "reference")
    pred = _labels_or_error(pred_img, Path(pred_path), [v for k, v in spec.labels.items() if k != "ignore"],
                            "predicted")
    values = [spec.labels[n] for n in spec.class_names[1:]]
    ignore = spec.ignore_label
    dice = metrics.dice_per_class(pred, ref, values, ignore)
    iou = metrics.iou_per_class(pred, ref, values, ignore)
    valid = ref != ignore if ignore is not None else np.ones(ref.shape, bool)
    spacing = Geometry.of(ref_img).array_spacing
    out = {}
    for name, v in zip(spec.class_names[1:], values):
        p, r = (pred == v) & valid, (ref == v) & valid
        out[name] = {"dice": dice[v], "iou": iou[v], "hd95_mm": _hd95(p, r, spacing),
                     "n_ref": int(r.sum()), "n_pred": int(p.sum())}
    return out


def aggregate_segmentation(per_case: Mapping[str, Mapping[str, Mapping[str, float]]], classes: Sequence[str]
                           ) -> Dict:
    """Means over cases per structure (NaN skipped; infinite HD95 — one mask empty — counted, not averaged)
    and the foreground mean over structures."""
    mean: Dict[str, Dict[str, float]] = {}
    for c in classes:
        rows = [per_case[k][c] for k in per_case]
        hd = np.array([r["hd95_mm"] for r in rows], float)
        mean[c] = {"dice": metrics.nanmean(r["dice"] for r in rows),
                   "iou": metrics.nanmean(r["iou"] for r in rows),
                   "hd95_mm": metrics.nanmean(hd[np.isfinite(hd)]),
                   "hd95_num_infinite": int(np.isinf(hd).sum()), "num_cases": len(rows)}
    fg = {k: metrics.nanmean(mean[c][k] for c in classes) for k in ("dice", "iou", "hd95_mm")}
    return {"mean": mean, "foreground_mean": fg}


def evaluate_segmentation(ref_dir: PathLike, pred_dir: PathLike, spec: DatasetSpec) -> Dict:
    """Per-case metrics for all matched label maps plus their aggregate (see :func:`aggregate_segmentation`)."""
    ref_dir, pred_dir = Path(ref_dir), Path(pred_dir)
    if not ref_dir.is_dir():
        raise OrthoError("reference folder not found", ref_dir, fix="pass the folder of reference label maps")
    pairs, missing = match_label_files(ref_dir, pred_dir, spec)
    if not pairs:
        raise OrthoError(f"no prediction matches a reference label map ({len(missing)} reference case(s), e.g. "
                         f"{missing[:3]})", pred_dir,
                         fix=f"predictions must be named like the references, e.g. "
                             f"{spec.label_name(missing[0]) if missing else 'CASE' + spec.file_ending}")
    per_case = {case: evaluate_label_pair(r, p, spec, case) for case, (r, p) in sorted(pairs.items())}
    classes = spec.class_names[1:]
    return {"classes": classes, "per_case": per_case, **aggregate_segmentation(per_case, classes),
            "missing_predictions": missing}


# ------------------------------------------------------------------------------------------------------------
# diagnosis
# ------------------------------------------------------------------------------------------------------------
def read_reference_diagnoses(csv_path: PathLike, spec: DatasetSpec) -> Dict[str, np.ndarray]:
    """case -> float array (0/1, NaN unknown) from any CSV in the dataset's diagnoses.csv format."""
    csv_path = Path(csv_path)
    table, problems = parse_diagnoses(spec, csv_path)
    if problems:
        raise OrthoError("reference diagnoses have problems:\n  - " + "\n  - ".join(problems), csv_path,
                         fix="the file must have the header case_id," + ",".join(spec.diagnoses))
    return table


def diagnosis_metrics(reference: Mapping[str, np.ndarray], predictions: Mapping[str, CaseDiagnoses],
                      diagnoses: Sequence[str], cases: Sequence[str]) -> Dict:
    """Per diagnosis AUC, AP, sensitivity, specificity (+ counts) over ``cases``, and their macro means."""
    per: Dict[str, Dict] = {}
    for i, d in enumerate(diagnoses):
        y = np.array([reference[c][i] for c in cases], float)
        p = np.array([predictions[c].probabilities.get(d, np.nan) for c in cases], float)
        yes = np.array([predictions[c].decisions.get(d, np.nan) for c in cases], float)
        sens, spec = metrics.sensitivity_specificity(y, yes)
        known = ~np.isnan(y) & ~np.isnan(p)
        per[d] = {"auc": metrics.roc_auc(y, p), "average_precision": metrics.average_precision(y, p),
                  "sensitivity": sens, "specificity": spec, "n_positive": int((y[known] > 0.5).sum()),
                  "n_negative": int((y[known] <= 0.5).sum()), "n_unknown": int((~known).sum())}
    macro = {k: metrics.nanmean(per[d][k] for d in diagnoses)
             for k in ("auc", "average_precision", "sensitivity", "specificity")}
    return {"per_diagnosis": per, "macro": macro, "num_cases": len(cases)}


def evaluate_diagnoses(reference: Mapping[str, np.ndarray], predictions: Mapping[str, CaseDiagnoses],
                       diagnoses: Sequence[str]) -> Dict:
    cases = sorted(set(reference) & set(predictions))
    if not cases:
        raise OrthoError("no case appears in both the reference diagnoses and the prediction's diagnoses.csv",
                         fix="check that -ref/--diagnoses-ref and -pred belong to the same cases")
    out = diagnosis_metrics(reference, predictions, diagnoses, cases)
    out["missing_predictions"] = sorted(set(reference) - set(predictions))
    out["cases"] = cases
    return out


# ------------------------------------------------------------------------------------------------------------
# centres, figures, summary
# ------------------------------------------------------------------------------------------------------------
def read_centers_csv(path: PathLike) -> Dict[str, str]:
    """case id -> centre name from a CSV with the columns case_id,center."""
    path = Path(path)
    if not path.is_file():
        raise OrthoError("centers CSV not found", path, fix="pass a CSV with the columns case_id,center")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if rows and ("case_id" not in rows[0] or "center" not in rows[0]):
        raise OrthoError("centers CSV must have the columns case_id,center", path)
    return {r["case_id"].strip(): r["center"].strip() for r in rows}


def per_center_breakdown(centers: Mapping[str, str], seg: Optional[Dict], diag: Optional[Dict],
                         reference: Optional[Mapping[str, np.ndarray]],
                         predictions: Optional[Mapping[str, CaseDiagnoses]], diagnoses: Sequence[str]) -> Dict:
    """The segmentation and diagnosis aggregates recomputed on each centre's cases (unlisted: 'unknown')."""
    cases = set(seg["per_case"]) if seg else set()
    if diag:
        cases |= set(diag["cases"])
    groups: Dict[str, List[str]] = {}
    for c in sorted(cases):
        groups.setdefault(centers.get(c, "unknown"), []).append(c)
    out = {}
    for center, members in sorted(groups.items()):
        entry: Dict = {"num_cases": len(members), "cases": members}
        if seg:
            sub = {c: seg["per_case"][c] for c in members if c in seg["per_case"]}
            if sub:
                entry["segmentation"] = aggregate_segmentation(sub, seg["classes"])
        if diag:
            sub_cases = [c for c in members if c in diag["cases"]]
            if sub_cases:
                entry["diagnosis"] = diagnosis_metrics(reference, predictions, diagnoses, sub_cases)
        out[center] = entry
    return out


def roc_points(y: np.ndarray, score: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC curve, one point per distinct score, for plotting."""
    keep = ~np.isnan(y) & ~np.isnan(score)
    y, score = y[keep] > 0.5, score[keep]
    order = np.argsort(-score, kind="mergesort")
    y, score = y[order], score[order]
    last = np.r_[np.where(np.diff(score) != 0)[0], y.size - 1]
    tps, fps = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fps / max(1, (~y).sum())], np.r_[0.0, tps / max(1, y.sum())]


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def plot_roc_curves(path: PathLike, reference: Mapping[str, np.ndarray], predictions: Mapping[str, CaseDiagnoses],
                    diagnoses: Sequence[str], cases: Sequence[str], per_diagnosis: Mapping[str, Dict]) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 6))
    ax = fig.subplots()
    for i, d in enumerate(diagnoses):
        y = np.array([reference[c][i] for c in cases], float)
        p = np.array([predictions[c].probabilities.get(d, np.nan) for c in cases], float)
        auc = per_diagnosis[d]["auc"]
        if math.isnan(auc):
            continue
        fpr, tpr = roc_points(y, p)
        ax.plot(fpr, tpr, label=f"{d} (AUC {auc:.2f})")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title(f"ROC curves ({len(cases)} cases)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, Path(path))


def plot_dice_boxplot(path: PathLike, per_case: Mapping[str, Mapping[str, Mapping[str, float]]],
                      classes: Sequence[str]) -> None:
    from matplotlib.figure import Figure
    data = [[v for v in (per_case[c][k]["dice"] for c in per_case) if not math.isnan(v)] for k in classes]
    fig = Figure(figsize=(max(5, 0.7 * len(classes) + 2), 4.5))
    ax = fig.subplots()
    ax.boxplot([d if d else [np.nan] for d in data], showmeans=True)
    ax.set_xticks(range(1, len(classes) + 1), classes, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("Dice")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Dice per structure ({len(per_case)} cases)")
    fig.tight_layout()
    _save_figure(fig, Path(path))


def _json_safe(obj):
    """NaN/inf -> None, recursively (summary.json must be strict JSON)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def default_diagnoses_reference(ref: Path) -> Optional[Path]:
    """The reference CSV that belongs to a label folder: labelsTs -> diagnosesTs.csv, labelsTr -> diagnoses.csv."""
    if ref.suffix.lower() == ".csv":
        return ref
    candidates = {"labelsTs": "diagnosesTs.csv", "labelsTr": "diagnoses.csv"}
    name = candidates.get(ref.name)
    if name and (ref.parent / name).is_file():
        return ref.parent / name
    return None


def _segmentation_part(ref: Path, pred: Path, spec: DatasetSpec, notes: List[str]) -> Optional[Dict]:
    """Segmentation metrics, or None (with a note) when there is nothing to compare."""
    if not (spec.has_segmentation and ref.is_dir()):
        return None
    if not match_label_files(ref, pred, spec)[0] and (pred / "diagnoses.csv").is_file():
        notes.append("no predicted label map matches the references: segmentation not evaluated")
        return None
    return evaluate_segmentation(ref, pred, spec)  # raises with the naming hint when nothing matches


def _diagnosis_part(ref: Path, pred: Path, spec: DatasetSpec, diagnoses_ref: Optional[PathLike],
                    notes: List[str], segmentation_done: bool):
    """(metrics, reference table, predictions), or Nones (with a note) when diagnoses cannot be evaluated."""
    if not spec.diagnoses:
        return None, None, None
    ref_csv = Path(diagnoses_ref) if diagnoses_ref else default_diagnoses_reference(ref)
    if ref_csv is None:
        notes.append("no reference diagnoses found: diagnoses not evaluated (pass --diagnoses-ref)")
        return None, None, None
    if diagnoses_ref is None and segmentation_done and not (pred / "diagnoses.csv").is_file():
        notes.append(f"{pred / 'diagnoses.csv'} not found: diagnoses not evaluated")
        return None, None, None
    reference = read_reference_diagnoses(ref_csv, spec)
    predictions = read_diagnoses_csv(pred / "diagnoses.csv", spec.diagnoses)
    diag = evaluate_diagnoses(reference, predictions, spec.diagnoses)
    diag["reference_csv"] = str(ref_csv)
    return diag, reference, predictions


def evaluate(ref: PathLike, pred: PathLike, spec: DatasetSpec, output: Optional[PathLike] = None,
             diagnoses_ref: Optional[PathLike] = None, centers: Optional[PathLike] = None,
             plots: bool = True) -> Dict:
    """Evaluate PRED against REF, write summary.json (+ figures) and return the summary dict (NaN kept)."""
    ref, pred = Path(ref), Path(pred)
    output = Path(output) if output else pred / "summary.json"
    summary: Dict = {"dataset": spec.name, "reference": str(ref), "prediction": str(pred)}
    notes: List[str] = []
    seg = _segmentation_part(ref, pred, spec, notes)
    diag, reference, predictions = _diagnosis_part(ref, pred, spec, diagnoses_ref, notes, seg is not None)
    if seg is None and diag is None:
        raise OrthoError("nothing to evaluate: no reference label maps and no reference diagnoses"
                         + (f" ({'; '.join(notes)})" if notes else ""), ref,
                         fix="pass -ref labelsTs (segmentation) and/or --diagnoses-ref diagnosesTs.csv")
    if seg is not None:
        summary["segmentation"] = seg
    if diag is not None:
        summary["diagnosis"] = diag
    centers_path = Path(centers) if centers else (spec.centers_csv if spec.centers_csv.is_file() else None)
    if centers_path is not None:
        summary["per_center"] = per_center_breakdown(read_centers_csv(centers_path), seg, diag, reference,
                                                     predictions, spec.diagnoses)
        summary["centers_csv"] = str(centers_path)
    figures = {}
    if plots and diag is not None:
        plot_roc_curves(output.parent / "roc_curves.png", reference, predictions, spec.diagnoses, diag["cases"],
                        diag["per_diagnosis"])
        figures["roc_curves"] = "roc_curves.png"
    if plots and seg is not None:
        plot_dice_boxplot(output.parent / "dice_boxplot.png", seg["per_case"], seg["classes"])
        figures["dice_boxplot"] = "dice_boxplot.png"
    summary["figures"] = figures
    summary["notes"] = notes
    save_json(_json_safe(summary), output)
    return summary


def format_summary(summary: Dict) -> str:
    """A short plain-text table for the console."""
    lines = []
    seg = summary.get("segmentation")
    if seg:
        lines.append(f"segmentation ({len(seg['per_case'])} cases):  structure  Dice  IoU  HD95[mm]")
        for c, m in seg["mean"].items():
            lines.append(f"  {c:<28} {m['dice']:.3f}  {m['iou']:.3f}  {m['hd95_mm']:.2f}")
        fg = seg["foreground_mean"]
        lines.append(f"  {'mean':<28} {fg['dice']:.3f}  {fg['iou']:.3f}  {fg['hd95_mm']:.2f}")
        if seg["missing_predictions"]:
            lines.append(f"  missing predictions: {', '.join(seg['missing_predictions'])}")
    diag = summary.get("diagnosis")
    if diag:
        lines.append(f"diagnosis ({diag['num_cases']} cases):  AUC  AP  sens  spec")
        for d, m in list(diag["per_diagnosis"].items()) + [("macro mean", diag["macro"])]:
            lines.append(f"  {d:<28} {m['auc']:.3f}  {m['average_precision']:.3f}  {m['sensitivity']:.3f}  "
                         f"{m['specificity']:.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------
def load_spec_for_evaluation(dataset: str) -> DatasetSpec:
    """dataset.json from the raw dataset, else the copy next to any trained model in the results folder."""
    name = resolve_dataset_name(dataset)
    raw = raw_dataset_dir(name)
    if (raw / "dataset.json").is_file():
        return load_dataset(raw)
    results = results_dataset_dir(name)
    for candidate in sorted(results.glob("*/dataset.json")) if results.is_dir() else []:
        return load_dataset(candidate.parent)
    raise OrthoError(f"no dataset.json for {name} (looked in {raw} and {results}/*/)",
                     fix="set ORTHO_raw / ORTHO_results to where the dataset and models are")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ortho_evaluate", description=(
        "Evaluate predictions: Dice/IoU/HD95 per structure, AUC/AP/sensitivity/specificity per diagnosis, "
        "per-centre breakdown; writes summary.json, roc_curves.png and dice_boxplot.png."))
    p.add_argument("-ref", required=True, help="folder of reference label maps (e.g. the dataset's labelsTs), or "
                                               "a reference diagnoses CSV for diagnosis-only datasets")
    p.add_argument("-pred", required=True, help="ortho_predict output folder (label maps and diagnoses.csv)")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name (for labels and diagnoses)")
    p.add_argument("-o", "--output", default=None, help="summary.json path (default: PRED/summary.json)")
    p.add_argument("--diagnoses-ref", default=None, help="reference diagnoses CSV (default: diagnosesTs.csv "
                                                         "next to a labelsTs REF, diagnoses.csv next to labelsTr)")
    p.add_argument("--centers", default=None, help="centers CSV (case_id,center); default: the dataset's "
                                                   "centers.csv when it exists")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    return p


def evaluate_main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    spec = load_spec_for_evaluation(args.dataset)
    summary = evaluate(args.ref, args.pred, spec, args.output, args.diagnoses_ref, args.centers,
                       plots=not args.no_plots)
    print(format_summary(summary))
    for note in summary["notes"]:
        print(f"note: {note}")
    out = Path(args.output) if args.output else Path(args.pred) / "summary.json"
    print(f"summary: {out}")
    for name in summary["figures"].values():
        print(f"figure: {out.parent / name}")
    return 0


evaluate_cli = run_cli(evaluate_main)
