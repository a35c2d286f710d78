"""What ``ortho_verify_dataset`` found: every problem, with its file and its fix.

Why a report object instead of exceptions: a user with a broken dataset wants the whole list at once, grouped so
that 200 missing files read as one block, not 200 separate runs of the checker.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

ERROR = "error"
WARNING = "warning"

# Kinds of problem, in the order the report prints them.
KIND_JSON = "dataset.json"
KIND_NAMING = "file naming"
KIND_MISSING = "missing files"
KIND_CASE_IDS = "case ids and counts"
KIND_UNREADABLE = "unreadable or truncated files"
KIND_IMAGE = "image content"
KIND_IMAGE_GEOMETRY = "image geometry"
KIND_LABEL_GEOMETRY = "label geometry"
KIND_LABEL_VALUES = "label values"
KIND_DIAGNOSES = "diagnoses tables"
KIND_CENTERS = "centers.csv"
KIND_ORDER = [KIND_JSON, KIND_NAMING, KIND_MISSING, KIND_CASE_IDS, KIND_UNREADABLE, KIND_IMAGE, KIND_IMAGE_GEOMETRY,
              KIND_LABEL_GEOMETRY, KIND_LABEL_VALUES, KIND_DIAGNOSES, KIND_CENTERS]


@dataclass(frozen=True)
class Problem:
    """One finding. ``file`` is relative to the dataset folder (``dataset.json``, ``imagesTr/x_axial_0000.nii.gz``)."""

    severity: str
    kind: str
    file: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}\n    fix: {self.fix}"


@dataclass
class VerifyReport:
    """All problems found in one dataset; ``ok`` means no errors (warnings are allowed)."""

    dataset_dir: Path
    problems: List[Problem] = field(default_factory=list)
    counts: Dict[str, int] = field(default_factory=dict)  # "Tr", "Ts", "Unlabeled", "labelled" -> cases
    views: List[str] = field(default_factory=list)

    def add(self, severity: str, kind: str, file: str, message: str, fix: str) -> None:
        self.problems.append(Problem(severity, kind, file, message, fix))

    def error(self, kind: str, file: str, message: str, fix: str) -> None:
        self.add(ERROR, kind, file, message, fix)

    def warning(self, kind: str, file: str, message: str, fix: str) -> None:
        self.add(WARNING, kind, file, message, fix)

    @property
    def errors(self) -> List[str]:
        return [str(p) for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> List[str]:
        return [str(p) for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not any(p.severity == ERROR for p in self.problems)

    def summary(self) -> str:
        n_err, n_warn = len(self.errors), len(self.warnings)
        cases = ", ".join(f"{self.counts.get(k, 0)} {name}" for k, name in
                          (("Tr", "training"), ("labelled", "labelled"), ("Ts", "test"), ("Unlabeled", "unlabeled")))
        verdict = "OK" if self.ok else "FAILED"
        return (f"{Path(self.dataset_dir).name}: {verdict} - {n_err} error{'s' * (n_err != 1)}, {n_warn} "
                f"warning{'s' * (n_warn != 1)} ({cases} cases; views {', '.join(self.views) or '?'})")

    def format(self) -> str:
        """The full report: errors then warnings, each grouped by kind, then the summary line."""
        lines: List[str] = []
        for severity, title in ((ERROR, "ERRORS"), (WARNING, "WARNINGS")):
            chosen = [p for p in self.problems if p.severity == severity]
            if not chosen:
                continue
            lines.append(f"{title} ({len(chosen)})")
            kinds = sorted({p.kind for p in chosen},
                           key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER))
            for kind in kinds:
                group = [p for p in chosen if p.kind == kind]
                lines.append(f"  [{kind}] ({len(group)})")
                for p in group:
                    lines.append(f"    {p.file}: {p.message}")
                    lines.append(f"        fix: {p.fix}")
            lines.append("")
        lines.append(self.summary())
        return "\n".join(lines)
