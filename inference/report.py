"""``OUT/report.html``: one static page listing every predicted case, opened by double-click in any browser.

Why static and self-contained: radiologists open results on locked-down workstations without servers or internet.
The page has inline CSS only, no scripts and no external resources; pictures are the ``{CASE}_overview.png``
files next to it, referenced by relative path, so the folder can be copied or zipped as a whole. All text that
comes from data (case ids, file names, problem messages) is HTML-escaped.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Union
from urllib.parse import quote

from orthonet.inference.diagnoses_table import CaseDiagnoses
from orthonet.inference.input_discovery import InputCase
from orthonet.fileio import save_text

PathLike = Union[str, Path]


@dataclass
class CaseReport:
    """What the report shows for one case."""

    case_id: str
    diagnoses: Optional[CaseDiagnoses] = None
    overview_png: Optional[str] = None        # relative to the report; default: {case}_overview.png if present
    segmentation_file: Optional[str] = None   # relative path of the written label map, if any
    views_used: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    skipped: bool = False                     # not predicted (no usable view / error)


def case_report(case: InputCase, diagnoses: Optional[CaseDiagnoses] = None,
                segmentation_file: Optional[str] = None, extra_problems: Sequence[str] = ()) -> CaseReport:
    """The report entry of a discovered case (its views, problems and notes) plus what was predicted for it.

    ``extra_problems``: failures during prediction (e.g. a corrupt file found while reading pixels); a case
    with neither diagnoses nor a segmentation is shown as not predicted."""
    return CaseReport(case.case_id, diagnoses, segmentation_file=segmentation_file, views_used=list(case.views),
                      problems=list(case.problems) + list(extra_problems), notes=list(case.notes),
                      skipped=not case.usable or (diagnoses is None and segmentation_file is None))


_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px;color:#1d2329;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d7de}
.meta{color:#57606a;font-size:13px;margin-bottom:16px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f3f6} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.review td{background:#fff4c2} tr.skipped td{background:#f6f8fa;color:#57606a}
.yes{color:#b3261e;font-weight:600} .no{color:#1a7f37}
.flag{display:inline-block;padding:0 6px;border-radius:8px;background:#f2c94c;color:#3d2f00;font-size:12px}
.problems{color:#b3261e;margin:4px 0 8px 18px;padding:0} .notes{color:#57606a;margin:4px 0 8px 18px;padding:0}
img.overview{max-width:100%;border:1px solid #d0d7de}
.legend{font-size:12px;color:#57606a}
"""


_FLAG = '<span class="flag">review</span>'
_YES = '<span class="yes">yes</span>'
_NO = '<span class="no">no</span>'


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _anchor(index: int) -> str:
    return f"case-{index}"


def _fmt_prob(p: Optional[float]) -> str:
    return "–" if p is None or (isinstance(p, float) and math.isnan(p)) else f"{p:.3f}"


def _decision_cell(c: CaseDiagnoses, d: str) -> str:
    if d not in c.decisions:
        return "<td>–</td>"
    text = f"{_fmt_prob(c.probabilities.get(d))} {_YES if c.decisions[d] == 1 else _NO}"
    if c.std.get(d) is not None and not math.isnan(c.std[d]):
        text += f" ±{c.std[d]:.2f}"
    return f"<td class=\"num\">{text}</td>"


def _summary_table(cases: Sequence[CaseReport], diagnoses: Sequence[str]) -> str:
    head = "".join(f"<th>{_e(d)}</th>" for d in diagnoses)
    rows = []
    for i, c in enumerate(cases):
        review = bool(c.diagnoses and c.diagnoses.review)
        cls = "skipped" if c.skipped else ("review" if review else "")
        cells = [f"<td><a href=\"#{_anchor(i)}\">{_e(c.case_id)}</a></td>",
                 f"<td>{_e(', '.join(c.views_used)) or '–'}</td>"]
        for d in diagnoses:
            cells.append(_decision_cell(c.diagnoses, d) if c.diagnoses else "<td>–</td>")
        cells.append(f"<td>{_FLAG if review else ''}</td>")
        probs = "; ".join(c.problems)
        cells.append(f"<td class=\"problems-cell\">{_e(probs) if probs else ''}</td>")
        rows.append(f"<tr class=\"{cls}\">{''.join(cells)}</tr>")
    return (f"<table class=\"summary\"><thead><tr><th>case</th><th>views</th>{head}<th>review</th>"
            f"<th>problems</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _case_section(index: int, c: CaseReport, diagnoses: Sequence[str], thresholds: Mapping[str, float],
                  out_dir: Path) -> str:
    parts = [f"<h2 id=\"{_anchor(index)}\">{_e(c.case_id)}</h2>"]
    if c.skipped:
        parts.append("<p><strong>not predicted</strong></p>")
    if c.problems:
        parts.append("<ul class=\"problems\">" + "".join(f"<li>{_e(p)}</li>" for p in c.problems) + "</ul>")
    if c.notes:
        parts.append("<ul class=\"notes\">" + "".join(f"<li>{_e(n)}</li>" for n in c.notes) + "</ul>")
    if c.segmentation_file:
        parts.append(f"<p>segmentation: <a href=\"{_e(quote(c.segmentation_file))}\">"
                     f"{_e(c.segmentation_file)}</a></p>")
    png = c.overview_png or (f"{c.case_id}_overview.png" if (out_dir / f"{c.case_id}_overview.png").is_file()
                             else None)
    if png:
        parts.append(f"<img class=\"overview\" src=\"{_e(quote(png))}\" alt=\"overview of {_e(c.case_id)}\">")
    if c.diagnoses and diagnoses:
        rows = []
        for d in diagnoses:
            p = c.diagnoses.probabilities.get(d)
            dec = c.diagnoses.decisions.get(d)
            std = c.diagnoses.std.get(d)
            flag = c.diagnoses.review_flags.get(d, False)
            rows.append(
                f"<tr class=\"{'review' if flag else ''}\"><td>{_e(d)}</td><td class=\"num\">{_fmt_prob(p)}</td>"
                f"<td class=\"num\">{_fmt_prob(thresholds.get(d))}</td>"
                f"<td>{'' if dec is None else (_YES if dec else _NO)}"
                f"</td><td class=\"num\">{_fmt_prob(std) if std is not None else '–'}</td>"
                f"<td>{_FLAG if flag else ''}</td></tr>")
        parts.append("<table class=\"diagnoses\"><thead><tr><th>diagnosis</th><th>probability</th>"
                     "<th>threshold</th><th>finding</th><th>ensemble std</th><th>review</th></tr></thead>"
                     f"<tbody>{''.join(rows)}</tbody></table>")
    return "<section class=\"case\">" + "".join(parts) + "</section>"


def render_report(cases: Sequence[CaseReport], diagnoses: Sequence[str] = (), thresholds: Mapping[str, float]
                  = None, title: str = "orthonet prediction report", meta: Optional[Mapping[str, str]] = None,
                  out_dir: PathLike = ".") -> str:
    """The report's HTML text (see :func:`write_report`)."""
    thresholds = dict(thresholds or {})
    out_dir = Path(out_dir)
    meta_items = dict(meta or {})
    meta_items.setdefault("cases", str(len(cases)))  # no timestamp by default: same inputs, same bytes
    meta_html = " · ".join(f"{_e(k)}: {_e(v)}" for k, v in meta_items.items())
    n_review = sum(1 for c in cases if c.diagnoses and c.diagnoses.review)
    n_problem = sum(1 for c in cases if c.problems)
    legend = (f"<p class=\"legend\">{n_review} case(s) flagged for review (a probability within the review "
              f"margin of its threshold); {n_problem} case(s) with problems. Research use only; not a medical "
              f"device.</p>")
    body = [f"<h1>{_e(title)}</h1>", f"<div class=\"meta\">{meta_html}</div>", legend,
            _summary_table(cases, diagnoses)]
    body += [_case_section(i, c, diagnoses, thresholds, out_dir) for i, c in enumerate(cases)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(out_dir: PathLike, cases: Sequence[CaseReport], diagnoses: Sequence[str] = (),
                 thresholds: Optional[Mapping[str, float]] = None, title: str = "orthonet prediction report",
                 meta: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``out_dir/report.html`` atomically and return its path."""
    out_dir = Path(out_dir)
    path = out_dir / "report.html"
    save_text(render_report(cases, diagnoses, thresholds, title, meta, out_dir), path)
    return path
