"""Cross-validation splits and label-fraction subsets.

Why a module of its own: splits decide which cases a model never sees, so they must be deterministic (same seed,
same folds, on any machine), stored once (``splits_final.json``, as nnU-Net) and balanced on the diagnoses — with
rare abnormalities a random split easily puts every positive case of a label into one fold, which makes that
fold's AUC undefined. ``label_fraction_subset`` answers "what do 10 % of the labels buy?" with nested subsets, so
the 10 % cases are also in the 20 % run and the curves compare like with like.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

from orthonet.errors import OrthoError
from orthonet.fileio import load_json, save_json

PathLike = Union[str, Path]
Split = Dict[str, List[str]]
SPLITS_FILE = "splits_final.json"
DEFAULT_SEED = 12345


# ------------------------------------------------------------------------------------------------------------
# stratification helpers
# ------------------------------------------------------------------------------------------------------------
def _label_matrix(case_ids: Sequence[str], diagnoses: Optional[Dict[str, np.ndarray]]) -> Optional[np.ndarray]:
    """(n_cases, n_labels) float matrix with NaN for unknown; None when there is nothing to stratify on."""
    if not diagnoses:
        return None
    lengths = {len(np.atleast_1d(v)) for v in diagnoses.values()}
    if len(lengths) != 1:
        raise OrthoError(f"diagnosis vectors have different lengths {sorted(lengths)}",
                         fix="every case needs one value (or NaN) per diagnosis")
    n_labels = lengths.pop()
    mat = np.full((len(case_ids), n_labels), np.nan)
    for i, c in enumerate(case_ids):
        if c in diagnoses:
            mat[i] = np.asarray(diagnoses[c], dtype=float)
    if np.all(np.isnan(mat)) or n_labels == 0:
        return None
    return mat


def _iterative_stratification(positives: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold index per row: Sechidis et al. (2011) iterative stratification for multi-label data.

    ``positives`` is a boolean (n, L) matrix (unknown counts as not positive). Labels are handled rarest first;
    each case carrying the current label goes to the fold that still wants most of that label (ties: the fold
    that wants most cases overall, then at random). Cases with no positive label fill the folds last, which keeps
    fold sizes within one case of each other.
    """
    n, n_labels = positives.shape
    fold_of = np.full(n, -1, dtype=int)
    desired_total = np.full(n_folds, n / n_folds)
    desired_label = np.tile(positives.sum(0) / n_folds, (n_folds, 1)).astype(float)  # (F, L)
    remaining = positives.copy()
    unassigned = np.ones(n, dtype=bool)
    order_noise = rng.random(n)

    def choose(candidates: np.ndarray) -> int:
        best = candidates[desired_total[candidates] == desired_total[candidates].max()]
        return int(best[rng.integers(len(best))]) if len(best) > 1 else int(best[0])

    while True:
        counts = remaining[unassigned].sum(0)
        active = np.where(counts > 0)[0]
        if len(active) == 0:
            break
        label = active[np.argmin(counts[active])]
        rows = np.where(unassigned & remaining[:, label])[0]
        rows = rows[np.argsort(order_noise[rows], kind="stable")]
        for r in rows:
            want = desired_label[:, label]
            cand = np.where(want == want.max())[0]
            f = choose(cand)
            fold_of[r] = f
            unassigned[r] = False
            desired_total[f] -= 1
            desired_label[f] -= positives[r]
    rest = np.where(unassigned)[0]
    rest = rest[np.argsort(order_noise[rest], kind="stable")]
    for r in rest:
        f = choose(np.arange(n_folds))
        fold_of[r] = f
        desired_total[f] -= 1
    return fold_of


def _rebalance_empty_folds(fold_of: np.ndarray, n_folds: int) -> np.ndarray:
    """Guarantee a non-empty validation set in every fold (possible when n >= n_folds)."""
    for f in range(n_folds):
        if not np.any(fold_of == f):
            sizes = np.bincount(fold_of, minlength=n_folds)
            donor = int(np.argmax(sizes))
            fold_of[np.where(fold_of == donor)[0][-1]] = f
    return fold_of


# ------------------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------------------
def make_splits(case_ids: Iterable[str], diagnoses: Optional[Dict[str, np.ndarray]] = None, n_folds: int = 5,
                seed: int = DEFAULT_SEED) -> List[Split]:
    """Deterministic ``n_folds``-fold cross-validation, stratified on the diagnoses when there are any.

    ``diagnoses`` maps case -> vector of 0/1 with NaN for unknown (cases missing from it are still placed). The
    result does not depend on the order of ``case_ids``. Fewer cases than folds is an error; with few cases per
    fold the folds still differ by at most one case in size.
    """
    cases = sorted(set(case_ids))
    if n_folds < 2:
        raise OrthoError(f"cross-validation needs at least 2 folds (got {n_folds})")
    if len(cases) < n_folds:
        raise OrthoError(f"{len(cases)} training case(s) cannot be split into {n_folds} folds",
                         fix="add training cases, use fewer folds, or train on fold 'all'")
    rng = np.random.default_rng(seed)
    labels = _label_matrix(cases, diagnoses)
    if labels is None:
        perm = rng.permutation(len(cases))
        fold_of = np.empty(len(cases), dtype=int)
        for i, chunk in enumerate(np.array_split(perm, n_folds)):
            fold_of[chunk] = i
    else:
        positives = np.nan_to_num(labels, nan=0.0) > 0.5
        fold_of = _iterative_stratification(positives, n_folds, rng)
    fold_of = _rebalance_empty_folds(fold_of, n_folds)
    splits = []
    for f in range(n_folds):
        val = [c for c, k in zip(cases, fold_of) if k == f]
        train = [c for c, k in zip(cases, fold_of) if k != f]
        splits.append({"train": train, "val": val})
    return splits


def _validate_splits(raw, path: Path) -> List[Split]:
    ok = isinstance(raw, list) and len(raw) > 0 and all(
        isinstance(s, dict) and isinstance(s.get("train"), list) and isinstance(s.get("val"), list) for s in raw)
    if not ok:
        raise OrthoError("splits file must be a list of {\"train\": [...], \"val\": [...]} objects", path,
                         fix="delete it to have orthonet create new splits, or repair it")
    return [{"train": [str(c) for c in s["train"]], "val": [str(c) for c in s["val"]]} for s in raw]


def load_or_create_splits(preprocessed_dataset_dir: PathLike, case_ids: Iterable[str],
                          diagnoses: Optional[Dict[str, np.ndarray]] = None, n_folds: int = 5,
                          seed: int = DEFAULT_SEED) -> List[Split]:
    """Read ``splits_final.json`` from the preprocessed dataset folder, or create and store it (atomically).

    An existing file wins, even if the cases changed (users edit it to define their own folds). Cases it lists
    that no longer exist are dropped with a warning; new cases it does not list are not used (also warned).
    """
    path = Path(preprocessed_dataset_dir) / SPLITS_FILE
    cases = sorted(set(case_ids))
    if not path.is_file():
        splits = make_splits(cases, diagnoses, n_folds=n_folds, seed=seed)
        save_json(splits, path)
        return splits
    splits = _validate_splits(load_json(path, "splits file"), path)
    present = set(cases)
    listed = set()
    for s in splits:
        listed.update(s["train"])
        listed.update(s["val"])
    gone = sorted(listed - present)
    if gone:
        warnings.warn(f"{path} lists {len(gone)} case(s) that are no longer in the preprocessed data; they are "
                      f"skipped: {', '.join(gone[:10])}{' ...' if len(gone) > 10 else ''}", stacklevel=2)
        splits = [{"train": [c for c in s["train"] if c in present], "val": [c for c in s["val"] if c in present]}
                  for s in splits]
    new = sorted(present - listed)
    if new:
        warnings.warn(f"{len(new)} case(s) are not in {path} and will not be used: "
                      f"{', '.join(new[:10])}{' ...' if len(new) > 10 else ''} (delete the file to re-split)",
                      stacklevel=2)
    return splits


def get_fold(splits: List[Split], fold: Union[int, str]) -> Tuple[List[str], List[str]]:
    """(train, val) case lists for ``fold``; ``'all'`` trains and validates on every case (as nnU-Net)."""
    if str(fold) == "all":
        everything = sorted(set(splits[0]["train"]) | set(splits[0]["val"]))
        return everything, list(everything)
    try:
        k = int(fold)
    except (TypeError, ValueError):
        raise OrthoError(f"fold must be an integer or 'all' (got {fold!r})") from None
    if not 0 <= k < len(splits):
        raise OrthoError(f"fold {k} does not exist: splits_final.json has {len(splits)} folds (0-{len(splits) - 1})",
                         fix="pick an existing fold or 'all'")
    return list(splits[k]["train"]), list(splits[k]["val"])


def label_fraction_subset(train_cases: Sequence[str], fraction: float,
                          diagnoses: Optional[Dict[str, np.ndarray]] = None,
                          seg_labelled: Optional[Iterable[str]] = None, seed: int = DEFAULT_SEED) -> List[str]:
    """The training cases whose labels are kept when only ``fraction`` of them may be used.

    Only cases that carry a label (a segmentation in ``seg_labelled`` or any known diagnosis) are candidates; the
    result holds ``max(1, round(fraction * n_candidates))`` of them. The cases are ranked once per seed by a greedy
    stratified ordering — each next case is the one that keeps the running label counts (every diagnosis and
    "has segmentation") closest to their proportional targets, ties broken by seeded random priority — and the
    subset is a prefix of that ranking. Hence subsets are nested: for one seed the 10 % subset lies inside the
    20 % subset. Returned sorted; every other training case is to be treated as unlabeled.
    """
    if not (0.0 < float(fraction) <= 1.0):
        raise OrthoError(f"label fraction must be in (0, 1] (got {fraction})", fix="e.g. --label-fraction 0.1")
    cases = sorted(set(train_cases))
    seg_set: Set[str] = set(seg_labelled or [])
    labels = _label_matrix(cases, diagnoses)
    known = np.zeros(len(cases), dtype=bool) if labels is None else ~np.all(np.isnan(labels), axis=1)
    has_seg = np.array([c in seg_set for c in cases], dtype=bool)
    candidates = np.where(known | has_seg)[0]
    if len(candidates) == 0:
        return []
    features = [has_seg[candidates, None].astype(float)]
    if labels is not None:
        features.append(np.nan_to_num(labels[candidates], nan=0.0))
    feats = np.concatenate(features, axis=1)  # (m, K)
    feats = feats[:, feats.sum(0) > 0]
    m = len(candidates)
    k = min(m, max(1, int(round(float(fraction) * m))))
    if k == m or feats.shape[1] == 0:
        priority = np.random.default_rng(seed).permutation(m)
        chosen = candidates[priority[:k]]
        return sorted(cases[i] for i in chosen)
    prevalence = feats.mean(0)
    weights = 1.0 / np.maximum(prevalence, 1.0 / m)  # rare labels count as much as common ones
    noise = np.random.default_rng(seed).random(m)
    taken = np.zeros(m, dtype=bool)
    counts = np.zeros(feats.shape[1])
    order: List[int] = []
    for step in range(1, k + 1):
        target = step * prevalence
        dev = ((counts[None, :] + feats - target[None, :]) ** 2 * weights[None, :]).sum(1)
        dev[taken] = np.inf
        best = np.where(dev <= dev.min() + 1e-12)[0]
        pick = int(best[np.argmin(noise[best])])
        taken[pick] = True
        counts += feats[pick]
        order.append(pick)
    return sorted(cases[candidates[i]] for i in order)
