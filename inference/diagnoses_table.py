"""The prediction's ``diagnoses.csv`` / ``diagnoses.json``: one definition, used by the predictor and by evaluation.

``diagnoses.csv`` columns, in this order::

    case_id, then per diagnosis (in dataset.json order): {name}_prob, {name}[, {name}_std], then [review]

* ``{name}_prob``: predicted probability (6 decimals; empty if the case could not be scored for it).
* ``{name}``: 1 if ``prob >= threshold`` (the threshold chosen in cross-validation, 0.5 without one), else 0.
* ``{name}_std``: spread (standard deviation) of the probability over the ensemble's members; written only when
  the ensemble has several members.
* ``review``: 1 if any diagnosis's probability lies within the review margin of its threshold, else 0; the margin
  is ``max(REVIEW_MARGIN, that diagnosis's std)``, so an uncertain ensemble widens it. Written with ``_std``.

``diagnoses.json`` holds the same numbers plus the thresholds and the margin, keyed by case.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

from orthonet.errors import OrthoError
from orthonet.fileio import save_json, save_text

PathLike = Union[str, Path]

#: Minimum distance (probability units) from the threshold below which a case is flagged for review.
REVIEW_MARGIN = 0.05


@dataclass
class CaseDiagnoses:
    """One case's diagnosis predictions."""

    case_id: str
    probabilities: Dict[str, float]
    decisions: Dict[str, int]
    std: Dict[str, float] = field(default_factory=dict)
    review_flags: Dict[str, bool] = field(default_factory=dict)

    @property
    def review(self) -> bool:
        return any(self.review_flags.values())


def make_case_diagnoses(case_id: str, probabilities: Mapping[str, float], thresholds: Mapping[str, float],
                        std: Optional[Mapping[str, float]] = None, margin: float = REVIEW_MARGIN
                        ) -> CaseDiagnoses:
    """Decisions at the thresholds (0.5 where none is given) and review flags (see module docstring)."""
    std = dict(std or {})
    decisions, flags = {}, {}
    for name, p in probabilities.items():
        t = float(thresholds.get(name, 0.5))
        if p is None or math.isnan(p):
            continue
        decisions[name] = int(p >= t)
        width = max(margin, float(std.get(name, 0.0)))
        flags[name] = abs(p - t) < width
    return CaseDiagnoses(case_id, {k: float(v) for k, v in probabilities.items()}, decisions,
                         {k: float(v) for k, v in std.items()}, flags)


def _fmt(v: Optional[float]) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6f}"


def diagnoses_header(diagnoses: Sequence[str], with_std: bool) -> List[str]:
    header = ["case_id"]
    for d in diagnoses:
        header += [f"{d}_prob", d] + ([f"{d}_std"] if with_std else [])
    return header + (["review"] if with_std else [])


def write_diagnoses_csv(path: PathLike, rows: Sequence[CaseDiagnoses], diagnoses: Sequence[str],
                        with_std: Optional[bool] = None) -> None:
    """Write diagnoses.csv atomically (``with_std`` defaults to: any row carries a spread)."""
    if with_std is None:
        with_std = any(r.std for r in rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(diagnoses_header(diagnoses, with_std))
    for r in rows:
        line = [r.case_id]
        for d in diagnoses:
            line += [_fmt(r.probabilities.get(d)), str(r.decisions[d]) if d in r.decisions else ""]
            if with_std:
                line.append(_fmt(r.std.get(d)))
        if with_std:
            line.append(str(int(r.review)))
        w.writerow(line)
    save_text(buf.getvalue(), path)


def write_diagnoses_json(path: PathLike, rows: Sequence[CaseDiagnoses], diagnoses: Sequence[str],
                         thresholds: Mapping[str, float], margin: float = REVIEW_MARGIN) -> None:
    """Write diagnoses.json atomically: thresholds, margin and per case per diagnosis all numbers."""
    cases = {}
    for r in rows:
        cases[r.case_id] = {
            d: {"probability": r.probabilities.get(d), "positive": r.decisions.get(d),
                "threshold": float(thresholds.get(d, 0.5)), "std": r.std.get(d),
                "review": bool(r.review_flags.get(d, False))} for d in diagnoses}
        cases[r.case_id]["review"] = r.review
    save_json({"diagnoses": list(diagnoses), "thresholds": {d: float(thresholds.get(d, 0.5)) for d in diagnoses},
               "review_margin": margin, "cases": cases}, path)


def _cell_float(text: str, path: Path, line: int, column: str) -> float:
    text = text.strip()
    if text == "":
        return float("nan")
    try:
        return float(text)
    except ValueError:
        raise OrthoError(f"line {line}: column '{column}' holds '{text}', not a number", path,
                         fix="diagnoses.csv must be written by ortho_predict (see docs/inference.md)") from None


def read_diagnoses_csv(path: PathLike, diagnoses: Sequence[str]) -> Dict[str, CaseDiagnoses]:
    """Read a prediction diagnoses.csv. ``{name}_prob`` is required per diagnosis; the other columns optional
    (a missing ``{name}`` column means 'decide at 0.5')."""
    path = Path(path)
    if not path.is_file():
        raise OrthoError("prediction diagnoses.csv not found", path,
                         fix="run ortho_predict on a model with a diagnosis head, or pass the right -pred folder")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = (["case_id"] if "case_id" not in header else []) + [f"{d}_prob" for d in diagnoses
                                                                        if f"{d}_prob" not in header]
        if missing:
            raise OrthoError(f"diagnoses.csv lacks column(s) {missing}",
                             path, fix="the header must be case_id,{name}_prob,{name},... (docs/inference.md)")
        out: Dict[str, CaseDiagnoses] = {}
        for line, row in enumerate(reader, start=2):
            case = (row.get("case_id") or "").strip()
            if not case:
                continue
            probs, decisions, std, flags = {}, {}, {}, {}
            for d in diagnoses:
                p = _cell_float(row[f"{d}_prob"], path, line, f"{d}_prob")
                probs[d] = p
                if d in header and row[d].strip() != "":
                    decisions[d] = int(_cell_float(row[d], path, line, d) >= 0.5)
                elif not math.isnan(p):
                    decisions[d] = int(p >= 0.5)
                if f"{d}_std" in header:
                    std[d] = _cell_float(row[f"{d}_std"], path, line, f"{d}_std")
            if "review" in header and row["review"].strip() == "1":
                flags["any"] = True
            out[case] = CaseDiagnoses(case, probs, decisions, std, flags)
    return out
