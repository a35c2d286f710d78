"""report.html: self-contained, escaped, every case listed, and it renders in a real (headless) browser."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from orthonet.inference.diagnoses_table import make_case_diagnoses
from orthonet.inference.report import CaseReport, write_report

DIAGNOSES = ["acl_tear", "effusion"]
NASTY = 'x<img src=q onerror="alert(1)">&y'


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.summary_cases, self.h2 = [], [], [], []
        self._in_summary = self._in_h2 = self._in_link = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.attrs.append((tag, a))
        if tag == "table" and a.get("class") == "summary":
            self._in_summary = True
        self._in_link = self._in_summary and tag == "a"
        self._in_h2 = tag == "h2"

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_summary = False
        if tag == "a":
            self._in_link = False
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        if self._in_link:
            self.summary_cases.append(data)
        if self._in_h2:
            self.h2.append(data)


def _overview(path: Path, color) -> None:
    img = np.zeros((150, 400, 3))
    img[:] = color
    mpimg.imsave(path, img)


def _cases(out: Path):
    _overview(out / "knee_001_overview.png", (1.0, 0.0, 0.0))
    _overview(out / f"{NASTY}_overview.png", (0.0, 0.0, 1.0))
    thresholds = {"acl_tear": 0.4, "effusion": 0.5}
    return [
        CaseReport("knee_001", make_case_diagnoses("knee_001", {"acl_tear": 0.91, "effusion": 0.12}, thresholds,
                                                    std={"acl_tear": 0.02, "effusion": 0.01}),
                   segmentation_file="knee_001_sagittal.nii.gz", views_used=["sagittal", "coronal", "axial"]),
        CaseReport("knee_002", make_case_diagnoses("knee_002", {"acl_tear": 0.42, "effusion": 0.7}, thresholds,
                                                    std={"acl_tear": 0.05, "effusion": 0.03}),
                   views_used=["sagittal", "coronal"], problems=["view axial missing"]),
        CaseReport(NASTY, make_case_diagnoses(NASTY, {"acl_tear": 0.1, "effusion": 0.9}, thresholds),
                   views_used=["sagittal"]),
        CaseReport("knee_004", None, problems=["no usable view: case skipped",
                                               "view sagittal: unreadable file — truncated"], skipped=True),
    ], thresholds


def test_report_lists_every_case_and_escapes_text(tmp_path):
    cases, thresholds = _cases(tmp_path)
    path = write_report(tmp_path, cases, DIAGNOSES, thresholds, meta={"model": "Trainer <multitask>"})
    text = path.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(text)
    assert parser.summary_cases == [c.case_id for c in cases]           # every case, in order, in the table
    assert parser.h2 == [c.case_id for c in cases]                      # and a section each
    assert "&lt;img src=q onerror=&quot;alert(1)&quot;&gt;&amp;y" in text      # the nasty id stayed text
    assert "Trainer &lt;multitask&gt;" in text
    srcs = [a["src"] for t, a in parser.attrs if t == "img"]
    assert srcs[0] == "knee_001_overview.png" and len(srcs) == 2        # relative paths to the PNGs only
    assert srcs[1].startswith("x%3Cimg")                                # (no injected <img src=q>)
    assert all(not s.startswith(("http", "/")) for s in srcs)
    assert not any(t in ("link", "script") for t in parser.tags)        # no external CSS/JS
    assert "http://" not in text and "https://" not in text
    assert text.count('class="review"') >= 2                            # knee_002 row (+ its diagnosis row)
    assert "view axial missing" in text and "not predicted" in text


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_report_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (run .ci/install_system_deps.sh to install it with apt-get)")
    cases, thresholds = _cases(tmp_path)
    path = write_report(tmp_path, cases, DIAGNOSES, thresholds)
    shot = tmp_path / "shot.png"
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--screenshot={shot}",
           "--window-size=1200,2000", path.resolve().as_uri()]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("headless chromium did not finish within 120 s on this machine")
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert shot.is_file() and shot.stat().st_size > 0, result.stderr[-2000:]
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (2000, 1200)
    assert img.std() > 0.05                                             # not a uniform page
    red = (img[..., 0] > 0.8) & (img[..., 1] < 0.2) & (img[..., 2] < 0.2)
    assert red.sum() > 20000                                            # the overview PNG was loaded and shown


def test_case_report_from_a_discovered_case(tmp_path):
    from orthonet.inference.input_discovery import InputCase
    from orthonet.inference.report import case_report
    usable = InputCase("k1", views={"sagittal": [tmp_path / "a.nii.gz"]}, problems=["view axial missing"])
    r = case_report(usable, make_case_diagnoses("k1", {"acl_tear": 0.3}, {}), extra_problems=["late failure"])
    assert r.views_used == ["sagittal"] and r.problems == ["view axial missing", "late failure"]
    assert not r.skipped
    assert case_report(InputCase("k2", problems=["no usable view: case skipped"])).skipped
