"""The demo's two-row table: 10 % labels, from scratch vs from the pretrained encoders, with what is noise.

Why its own module: the demo must state the method's claim in its own output *and* say plainly which differences
a handful of test exams cannot tell apart. That needs a paired case bootstrap of two ``ortho_evaluate``
summaries of the same test exams, and a data-driven choice of the structures that are resolvable at the demo's
image size (at the ``tiny`` preset the menisci and ligaments are partial-volume specks whose Dice is noise).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from orthonet import metrics
from orthonet.dataset import DatasetSpec, parse_diagnoses
from orthonet.inference.diagnoses_table import read_diagnoses_csv

#: A structure counts as resolvable when its median size over the test label maps is at least this many voxels.
MIN_RESOLVABLE_VOXELS = 200


def resolvable_structures(spec: DatasetSpec, cases: Sequence[str], min_voxels: int = MIN_RESOLVABLE_VOXELS
                          ) -> List[str]:
    """Foreground structures whose median voxel count in the test label maps (segmentation view) reaches
    ``min_voxels``; the ignore label is not a structure."""
    counts: Dict[str, List[int]] = {name: [] for name, value in spec.labels.items()
                                    if value != 0 and value != spec.ignore_label}
    for case in cases:
        arr = sitk.GetArrayViewFromImage(sitk.ReadImage(str(spec.label_path(case, "Ts"))))
        for name in counts:
            counts[name].append(int((arr == spec.labels[name]).sum()))
    return [n for n, c in counts.items() if c and float(np.median(c)) >= min_voxels]


def _mean_dice(per_case: Mapping[str, Mapping[str, Mapping[str, float]]], cases: Sequence[str],
               structures: Sequence[str]) -> np.ndarray:
    return np.array([np.nanmean([per_case[c][s]["dice"] for s in structures]) for c in cases], float)


def _macro_auc(y: np.ndarray, p: np.ndarray) -> float:
    return metrics.nanmean(metrics.roc_auc(y[:, d], p[:, d]) for d in range(y.shape[1]))


def compare_runs(spec: DatasetSpec, summaries: Mapping[str, Dict], prediction_dirs: Mapping[str, Path],
                 reference_csv: Optional[Path], structures: Sequence[str], n_boot: int = 2000, seed: int = 0
                 ) -> Dict:
    """Point values per run and the paired bootstrap 95 % interval of (second run - first run) for the mean Dice
    over ``structures`` and the macro AUC, over the test exams both runs predicted."""
    names = list(summaries)
    out: Dict = {"runs": {n: {} for n in names}, "structures": list(structures)}
    rng = np.random.default_rng(seed)
    seg = [summaries[n].get("segmentation") for n in names]
    if all(seg) and structures:
        cases = sorted(set.intersection(*(set(s["per_case"]) for s in seg)))
        dice = [_mean_dice(s["per_case"], cases, structures) for s in seg]
        for n, d in zip(names, dice):
            out["runs"][n]["dice"] = float(np.nanmean(d))
        boots = [np.nanmean(dice[1][b] - dice[0][b]) for b in (rng.integers(0, len(cases), len(cases))
                                                                 for _ in range(n_boot))]
        out["dice_difference"] = _interval(float(np.nanmean(dice[1] - dice[0])), boots)
        out["n_seg_cases"] = len(cases)
    if spec.diagnoses and reference_csv is not None and reference_csv.is_file():
        reference, problems = parse_diagnoses(spec, reference_csv)   # the dataset's own file: already verified
        preds = [read_diagnoses_csv(Path(prediction_dirs[n]) / "diagnoses.csv", spec.diagnoses) for n in names]
        cases = sorted(set(reference).intersection(*(set(p) for p in preds)))
        if cases and not problems:
            y = np.stack([reference[c] for c in cases]).astype(float)
            probs = [np.array([[p[c].probabilities.get(d, np.nan) for d in spec.diagnoses] for c in cases], float)
                     for p in preds]
            for n, p in zip(names, probs):
                out["runs"][n]["auc"] = _macro_auc(y, p)
            boots = []
            for _ in range(n_boot):
                b = rng.integers(0, len(cases), len(cases))
                boots.append(_macro_auc(y[b], probs[1][b]) - _macro_auc(y[b], probs[0][b]))
            out["auc_difference"] = _interval(out["runs"][names[1]]["auc"] - out["runs"][names[0]]["auc"], boots)
            out["n_diag_cases"] = len(cases)
    return out


def _interval(point: float, boots: Sequence[float]) -> Dict:
    values = np.asarray([b for b in boots if np.isfinite(b)], float)
    lo, hi = (np.percentile(values, [2.5, 97.5]) if values.size else (np.nan, np.nan))
    return {"mean": float(point), "ci": [float(lo), float(hi)], "within_noise": bool(not values.size or lo <= 0 <= hi)}


def format_comparison(result: Dict, labels: Mapping[str, str], fraction: float) -> str:
    """The table and one plain sentence per metric: which difference the test exams resolve."""
    names = list(result["runs"])
    structures = ", ".join(result["structures"]) or "none"
    lines = [f"{'labels':<8} {'initialisation':<34} {'Dice':>6} {'macro AUC':>10}"]
    for n in names:
        r = result["runs"][n]
        dice = f"{r['dice']:.3f}" if "dice" in r else "n/a"
        auc = f"{r['auc']:.3f}" if r.get("auc") is not None and np.isfinite(r["auc"]) else "n/a"
        lines.append(f"{fraction:<8.0%} {labels[n]:<34} {dice:>6} {auc:>10}")
    lines.append(f"Dice: mean over the structures resolvable at this image size ({structures}).")
    for key, what, n_key in (("dice_difference", "Dice", "n_seg_cases"), ("auc_difference", "macro AUC",
                                                                         "n_diag_cases")):
        d = result.get(key)
        if not d:
            continue
        verdict = "within noise: these test exams cannot tell the two apart" if d["within_noise"] else \
            ("pretrained better, beyond noise" if d["mean"] > 0 else "scratch better, beyond noise")
        lines.append(f"{what} difference (pretrained - scratch) {d['mean']:+.3f}, 95 % CI [{d['ci'][0]:+.3f}, "
                     f"{d['ci'][1]:+.3f}] over {result[n_key]} test exams (paired bootstrap): {verdict}.")
    return "\n".join(lines)
