"""Segmentation and diagnosis metrics shared by training (online validation) and evaluation.

Conventions (the same everywhere, so a number in progress.png means what it means in validation/summary.json):

* Segmentation: ``dice``/``iou`` are NaN when a class is absent from both prediction and reference (nothing to
  score; a mean over cases skips it with ``nanmean``). Voxels whose reference equals ``ignore`` (and negative
  reference values: padding outside the image) are excluded.
* ``hd95`` is the symmetric 95th-percentile Hausdorff distance in millimetres: the larger of the two directed
  95th percentiles of surface-to-surface distances (as MONAI's ``percentile=95``). Both masks empty -> NaN
  (undefined, like Dice); exactly one empty -> ``inf``.
* Diagnosis: labels may be NaN (unknown); those samples are dropped per label. ``roc_auc`` and
  ``average_precision`` are NaN when only one class is present among the known labels.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage


# ------------------------------------------------------------------------------------------------------------
# segmentation
# ------------------------------------------------------------------------------------------------------------
def _valid_mask(ref: np.ndarray, ignore: Optional[int]) -> np.ndarray:
    valid = ref >= 0
    if ignore is not None:
        valid &= ref != ignore
    return valid


def confusion_counts(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int], ignore: Optional[int] = None
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-label (tp, fp, fn) voxel counts; summing them over batches gives nnU-Net's online pseudo-Dice."""
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    valid = _valid_mask(ref, ignore)
    tp = np.zeros(len(labels), dtype=np.int64)
    fp = np.zeros(len(labels), dtype=np.int64)
    fn = np.zeros(len(labels), dtype=np.int64)
    for i, lab in enumerate(labels):
        p = (pred == lab) & valid
        r = (ref == lab) & valid
        tp[i] = np.count_nonzero(p & r)
        fp[i] = np.count_nonzero(p & ~r)
        fn[i] = np.count_nonzero(~p & r)
    return tp, fp, fn


def dice_from_counts(tp, fp, fn) -> np.ndarray:
    """2TP / (2TP + FP + FN), NaN where the denominator is 0 (class absent from both)."""
    tp, fp, fn = (np.asarray(a, dtype=float) for a in (tp, fp, fn))
    den = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), np.nan)


def dice_per_class(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int], ignore: Optional[int] = None
                   ) -> Dict[int, float]:
    """Dice per label value; NaN when the label is absent from both ``pred`` and ``ref``."""
    tp, fp, fn = confusion_counts(pred, ref, labels, ignore)
    return {int(lab): float(d) for lab, d in zip(labels, dice_from_counts(tp, fp, fn))}


def iou_per_class(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int], ignore: Optional[int] = None
                  ) -> Dict[int, float]:
    """Intersection over union per label value; NaN when the label is absent from both."""
    tp, fp, fn = confusion_counts(pred, ref, labels, ignore)
    den = (tp + fp + fn).astype(float)
    return {int(lab): (float(t / d) if d > 0 else float("nan")) for lab, t, d in zip(labels, tp, den)}


def dice(pred_mask: np.ndarray, ref_mask: np.ndarray) -> float:
    """Dice of two boolean masks (NaN when both are empty)."""
    return dice_per_class(np.asarray(pred_mask, bool).astype(np.int8), np.asarray(ref_mask, bool).astype(np.int8),
                          [1])[1]


def iou(pred_mask: np.ndarray, ref_mask: np.ndarray) -> float:
    """Intersection over union of two boolean masks (NaN when both are empty)."""
    return iou_per_class(np.asarray(pred_mask, bool).astype(np.int8), np.asarray(ref_mask, bool).astype(np.int8),
                         [1])[1]


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face neighbour outside it (the image border counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float]
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of pred to the reference surface, and vice versa."""
    pred_mask = np.asarray(pred_mask, bool)
    ref_mask = np.asarray(ref_mask, bool)
    if pred_mask.shape != ref_mask.shape:
        raise ValueError(f"mask shapes differ: {pred_mask.shape} vs {ref_mask.shape}")
    if len(spacing) != pred_mask.ndim:
        raise ValueError(f"spacing has {len(spacing)} entries for a {pred_mask.ndim}-D mask")
    sp = np.asarray(spacing, dtype=float)
    ps, rs = _surface(pred_mask), _surface(ref_mask)
    d_to_ref = ndimage.distance_transform_edt(~rs, sampling=sp)
    d_to_pred = ndimage.distance_transform_edt(~ps, sampling=sp)
    return d_to_ref[ps], d_to_pred[rs]


def hd95(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float], percentile: float = 95.0
         ) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (see module docstring for empty masks)."""
    p_any = bool(np.any(pred_mask))
    r_any = bool(np.any(ref_mask))
    if not p_any and not r_any:
        return float("nan")
    if p_any != r_any:
        return float("inf")
    a, b = surface_distances(pred_mask, ref_mask, spacing)
    return float(max(np.percentile(a, percentile), np.percentile(b, percentile)))


# ------------------------------------------------------------------------------------------------------------
# diagnosis (binary, NaN-label aware)
# ------------------------------------------------------------------------------------------------------------
def _known(y, score) -> Tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=float).ravel()
    s = np.asarray(score, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    keep = ~np.isnan(y) & ~np.isnan(s)
    return (y[keep] > 0.5), s[keep]


def roc_auc(y, score) -> float:
    """Area under the ROC curve (scikit-learn; ties count one half); NaN with one class only or no known label."""
    yb, s = _known(y, score)
    if yb.all() or not yb.any():
        return float("nan")
    from sklearn.metrics import roc_auc_score   # imported here: scikit-learn takes about a second to import
    return float(roc_auc_score(yb, s))


def average_precision(y, score) -> float:
    """Average precision (scikit-learn's step-wise definition, tied scores one threshold). NaN without positives
    or without negatives."""
    yb, s = _known(y, score)
    if yb.all() or not yb.any():
        return float("nan")
    from sklearn.metrics import average_precision_score
    return float(average_precision_score(yb, s))


def sensitivity_specificity(y, pred) -> Tuple[float, float]:
    """(sensitivity, specificity) of binary predictions; NaN where there are no positives / no negatives."""
    yb, p = _known(y, pred)
    p = p > 0.5
    pos, neg = yb.sum(), (~yb).sum()
    sens = float((p & yb).sum() / pos) if pos else float("nan")
    spec = float((~p & ~yb).sum() / neg) if neg else float("nan")
    return sens, spec


def youden_threshold(y, score) -> float:
    """Score threshold t maximising sensitivity + specificity - 1 for the rule ``score >= t``.

    Candidates are the distinct observed scores; among equally good ones the highest threshold is returned (the
    more specific rule). NaN when one class is absent.
    """
    yb, s = _known(y, score)
    if yb.all() or not yb.any():
        return float("nan")
    from sklearn.metrics import roc_curve
    fpr, tpr, thresholds = roc_curve(yb, s, drop_intermediate=False)   # thresholds decreasing, the first is +inf
    j = (tpr - fpr)[1:]
    return float(thresholds[1:][int(np.argmax(j >= j.max() - 1e-12))])     # the highest of the best thresholds


def per_label(metric, y: np.ndarray, scores: np.ndarray, names: Optional[Sequence[str]] = None
              ) -> Tuple[Dict[str, float], float]:
    """Apply a binary metric to each column of (n, L) ``y``/``scores``; returns ({name: value}, NaN-mean)."""
    y = np.asarray(y, dtype=float)
    scores = np.asarray(scores, dtype=float)
    if y.ndim != 2 or y.shape != scores.shape:
        raise ValueError(f"labels {y.shape} and scores {scores.shape} must both be (n_samples, n_labels)")
    names = list(names) if names is not None else [str(i) for i in range(y.shape[1])]
    values = {n: metric(y[:, i], scores[:, i]) for i, n in enumerate(names)}
    finite = [v for v in values.values() if not np.isnan(v)]
    return values, (float(np.mean(finite)) if finite else float("nan"))


def nanmean(values: Iterable[float]) -> float:
    """Mean ignoring NaN; NaN if nothing is left (no RuntimeWarning)."""
    v = np.asarray(list(values), dtype=float)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")
