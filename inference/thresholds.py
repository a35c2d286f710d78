"""Decision thresholds from out-of-fold predictions, and the choice of the best configuration.

Why here and not in training: both decisions are made *after* cross-validation from its pooled out-of-fold
predictions (``ortho_find_best_configuration``) and only the predictor consumes them.

Ranking rule of :func:`select_best_configuration` (also in docs/inference.md):

* segmentation task: mean foreground Dice (higher is better);
* diagnosis task: macro AUC;
* multitask (the dataset has both): the mean of mean Dice and macro AUC.

The task is taken from the metrics the candidates report (both present in any candidate -> multitask). A
candidate lacking a metric its task needs, or whose score is NaN, is not eligible. Ties go to the name that sorts
first, so the choice is deterministic.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from orthonet import metrics
from orthonet.errors import OrthoError

DEFAULT_THRESHOLD = 0.5
SEG_KEY = "mean_dice"
DIAG_KEY = "macro_auc"


def choose_thresholds(oof_probs: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                      diagnoses: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Per diagnosis the threshold maximising Youden's J (sensitivity + specificity - 1) on out-of-fold data.

    ``oof_probs``: case -> probabilities (L,); ``labels``: case -> 0/1 with NaN for unknown. Only cases present
    in both are used. A diagnosis with a single known label value (or none) gets 0.5.
    """
    cases = sorted(set(oof_probs) & set(labels))
    if not cases:
        raise OrthoError("no case has both an out-of-fold prediction and a label; cannot choose thresholds",
                         fix="run the validation of every fold first (ortho_train ... --val)")
    probs = np.stack([np.asarray(oof_probs[c], float).ravel() for c in cases])
    y = np.stack([np.asarray(labels[c], float).ravel() for c in cases])
    if probs.shape != y.shape:
        raise ValueError(f"probabilities {probs.shape} and labels {y.shape} disagree in the number of diagnoses")
    names = list(diagnoses) if diagnoses is not None else [str(i) for i in range(y.shape[1])]
    if len(names) != y.shape[1]:
        raise ValueError(f"{len(names)} diagnosis names for {y.shape[1]} columns")
    out = {}
    for i, name in enumerate(names):
        t = metrics.youden_threshold(y[:, i], probs[:, i])
        out[name] = DEFAULT_THRESHOLD if math.isnan(t) else float(t)
    return out


def cv_metrics_from_summary(summary: Mapping) -> Dict[str, float]:
    """{'mean_dice': .., 'macro_auc': ..} from an evaluation summary (orthonet.inference.evaluate / validation
    summary.json layout); already-flat dicts pass through."""
    out: Dict[str, float] = {}
    for key in (SEG_KEY, DIAG_KEY):
        if key in summary and summary[key] is not None:
            out[key] = float(summary[key])
    seg = summary.get("segmentation") if isinstance(summary.get("segmentation"), Mapping) else None
    if seg and SEG_KEY not in out:
        fg = seg.get("foreground_mean", {})
        if fg.get("dice") is not None:
            out[SEG_KEY] = float(fg["dice"])
    diag = summary.get("diagnosis") if isinstance(summary.get("diagnosis"), Mapping) else None
    if diag and DIAG_KEY not in out:
        macro = diag.get("macro", {})
        if macro.get("auc") is not None:
            out[DIAG_KEY] = float(macro["auc"])
    return out


def infer_task(candidates: Mapping[str, Mapping]) -> str:
    """'multitask' when the candidates report both metrics, else 'seg' or 'diag' after what they report.

    (Candidates that each report only one of the two give 'multitask' and none is eligible: rank them per task
    with ``task='seg'`` and ``task='diag'`` instead.)"""
    flat = [cv_metrics_from_summary(m) for m in candidates.values()]
    has_seg = any(SEG_KEY in f for f in flat)
    has_diag = any(DIAG_KEY in f for f in flat)
    if has_seg and has_diag:
        return "multitask"
    return "diag" if has_diag else "seg"


def configuration_score(cv_metrics: Mapping, task: str) -> float:
    """The ranking score of one candidate for ``task`` (NaN when a needed metric is missing)."""
    flat = cv_metrics_from_summary(cv_metrics)
    needed = {"seg": [SEG_KEY], "diag": [DIAG_KEY], "multitask": [SEG_KEY, DIAG_KEY]}[task]
    values = [flat.get(k, float("nan")) for k in needed]
    return float("nan") if any(math.isnan(v) for v in values) else float(np.mean(values))


def rank_configurations(candidates: Mapping[str, Mapping], task: Optional[str] = None
                        ) -> List[Tuple[str, float]]:
    """Eligible candidates with their scores, best first (ties by name)."""
    task = task or infer_task(candidates)
    scored = [(name, configuration_score(m, task)) for name, m in candidates.items()]
    eligible = [(n, s) for n, s in scored if not math.isnan(s)]
    return sorted(eligible, key=lambda ns: (-ns[1], ns[0]))


def select_best_configuration(candidates: Mapping[str, Mapping], task: Optional[str] = None) -> str:
    """Name of the best candidate by the ranking rule in the module docstring."""
    if not candidates:
        raise OrthoError("no trained configuration to choose from",
                         fix="train all five folds of at least one configuration first")
    ranked = rank_configurations(candidates, task)
    if not ranked:
        task = task or infer_task(candidates)
        raise OrthoError(f"no candidate reports the metrics a '{task}' ranking needs "
                         f"({', '.join(sorted(candidates))})",
                         fix="run the cross-validation (validation of every fold) before choosing, or rank "
                             "segmentation and diagnosis models separately (task='seg' / task='diag')")
    return ranked[0][0]
