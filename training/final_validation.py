"""Full-volume validation of a fold's held-out cases, exactly as ``ortho_predict`` would predict them.

Writes ``fold_k/validation/``: one segmentation per case in its original geometry, ``diagnoses.csv`` with the
out-of-fold probabilities (what ``ortho_find_best_configuration`` picks thresholds from) and ``summary.json`` with
Dice per structure and AUC / AP per diagnosis.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict

import numpy as np
from tqdm import tqdm

from orthonet.inference.diagnoses_table import make_case_diagnoses, write_diagnoses_csv
from orthonet.inference.predict_core import LoadedModel, predict_preprocessed_case
from orthonet.dataset import parse_dataset_json
from orthonet.fileio import save_json
from orthonet.imageio import Geometry, read_array, write_image
from orthonet.metrics import average_precision, dice_per_class, nanmean, roc_auc
from orthonet.paths import raw_root
from orthonet.preprocessing.export import probabilities_to_image, restore_original_geometry
from orthonet.training.model_factory import has_diagnosis, has_segmentation

if TYPE_CHECKING:  # pragma: no cover
    from orthonet.training.trainers.base import BaseTrainer


def _reference_label(trainer: "BaseTrainer", case: str, props: Dict, seg_preprocessed) -> np.ndarray:
    """The raw label map when the raw dataset is here (exact), else the preprocessed one restored."""
    spec, _ = parse_dataset_json(raw_root() / trainer.opts.dataset_name)
    if spec is not None and spec.label_path(case).is_file():
        arr, geom = read_array(spec.label_path(case), dtype=np.int16)
        if not Geometry.from_dict(props["original_geometry"]).differences(geom):
            return arr
    return restore_original_geometry(np.asarray(seg_preprocessed), props, is_probabilities=False)


def run_final_validation(trainer: "BaseTrainer") -> Dict:
    cfg = trainer.model_cfg
    out_dir = trainer.output_dir / "validation"
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer.model.eval()
    loaded = LoadedModel(trainer.model, cfg, trainer.plans, trainer.output_dir, trainer.device)
    class_names = trainer.spec.class_names
    labels = list(range(1, len(class_names)))
    per_case_dice: Dict[str, Dict[str, float]] = {}
    diag_rows, probs, refs = [], [], []
    for case in tqdm(trainer.val_cases, desc="final validation", disable=not trainer.is_main):
        data = {v: trainer.store.open(case, v, with_seg=False).data[:] for v in cfg.views
                if trainer.store.has_view(case, v)}
        props = {v: trainer.store.properties(case, v) for v in data}
        result = predict_preprocessed_case([loaded], data, properties_by_view=props)
        if has_segmentation(cfg) and result["seg_probabilities"] is not None:
            arrays = trainer.store.open(case, cfg.segmentation_view, with_seg=True)
            image = probabilities_to_image(result["seg_probabilities"].numpy(), arrays.properties)
            write_image(image, out_dir / f"{case}_{cfg.segmentation_view}.nii.gz")
            if arrays.seg is not None:
                import SimpleITK as sitk
                pred = sitk.GetArrayFromImage(image)
                ref = _reference_label(trainer, case, arrays.properties, arrays.seg[:])
                dice = dice_per_class(pred, ref, labels, ignore=trainer.spec.ignore_label)
                per_case_dice[case] = {n: (None if not np.isfinite(dice[lab]) else float(dice[lab]))
                                       for n, lab in zip(class_names[1:], labels)}
        if has_diagnosis(cfg) and result["diag_probabilities"] is not None:
            p = result["diag_probabilities"].mean(0)
            diag_rows.append(make_case_diagnoses(case, dict(zip(trainer.spec.diagnoses, p.tolist())), {}))
            probs.append(p)
            refs.append(trainer.diagnoses.get(case, np.full(len(p), np.nan)))
    summary: Dict = {"fold": str(trainer.opts.fold), "cases": list(trainer.val_cases),
                     "trainer": type(trainer).__name__, "configuration": cfg.configuration}
    if per_case_dice:
        mean_per_class = {n: nanmean(v[n] for v in per_case_dice.values() if v[n] is not None)
                          for n in class_names[1:]}
        summary["segmentation"] = {"mean_dice": nanmean(mean_per_class.values()), "dice": mean_per_class,
                                   "per_case": per_case_dice}
    if probs:
        P, Y = np.stack(probs), np.stack(refs)
        auc = {d: roc_auc(Y[:, i], P[:, i]) for i, d in enumerate(trainer.spec.diagnoses)}
        ap = {d: average_precision(Y[:, i], P[:, i]) for i, d in enumerate(trainer.spec.diagnoses)}
        summary["diagnosis"] = {"macro_auc": nanmean(auc.values()), "macro_ap": nanmean(ap.values()),
                                "auc": auc, "ap": ap}
        write_diagnoses_csv(out_dir / "diagnoses.csv", diag_rows, trainer.spec.diagnoses)
    save_json(_finite(summary), out_dir / "summary.json")
    trainer.log(_summary_line(summary))
    return summary


def _finite(obj):
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _summary_line(summary: Dict) -> str:
    text = f"final validation ({len(summary['cases'])} cases)"
    if "segmentation" in summary:
        text += f", mean Dice {summary['segmentation']['mean_dice']:.4f}"
    if "diagnosis" in summary:
        text += f", macro AUC {summary['diagnosis']['macro_auc']:.4f}"
    return text
