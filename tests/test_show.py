"""ortho_show and the shared plotting helpers: PNG size, slice choice through physical space, pixel aspect."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from orthonet.dataset import load_dataset
from orthonet.imageio import Geometry
from orthonet.show import build_panels, cli, render_case
from orthonet.visualize import (ViewPanel, draw_view, label_centroid_mm, label_to_rgba, montage_size_px,
                                physical_to_index, render_montage, slice_axis)
from tests.builders import write_tiny_dataset, write_tiny_nnunet_dataset


def png_size(path: Path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def knee(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("show") / "Dataset101_Knee", n_train=2, n_test=1,
                              oblique=True, seed=7)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return write_tiny_nnunet_dataset(tmp_path_factory.mktemp("shownn") / "Dataset102_Plain", n_train=2,
                                     anisotropic=True)


def test_orthonet_case_png(knee, tmp_path):
    out = render_case(knee, "case001", tmp_path / "sub" / "case001.png")
    assert png_size(out) == montage_size_px(3, side_panel=True) == (1520, 480)
    assert out.stat().st_size > 10_000
    assert sorted(p.name for p in out.parent.iterdir()) == ["case001.png"]  # atomic: no temp files left


def test_nnunet_case_png(plain, tmp_path):
    out = render_case(plain, "pat_001", tmp_path / "pat.png")
    assert png_size(out) == montage_size_px(1, side_panel=False) == (400, 480)


def test_test_split_and_dpi(knee, tmp_path):
    out = render_case(knee, "test000", tmp_path / "t.png", split="Ts", slice_policy="middle", dpi=50)
    assert png_size(out) == (760, 240)


def test_cli_writes_png_and_rejects_unknown_case(knee, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ORTHO_raw", str(knee.parent))
    out = tmp_path / "case.png"
    assert cli(["-d", "101", "-c", "case000", "-o", str(out)]) == 0
    assert png_size(out) == (1520, 480)
    capsys.readouterr()
    assert cli(["-d", "101", "-c", "case999", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no case 'case999' in imagesTr/" in err and "case000, case001" in err
    assert not (tmp_path / "x.png").exists()
    assert cli(["-d", "101", "-c", "test000", "-o", str(tmp_path / "y.png")]) == 2
    assert "--split Ts" in capsys.readouterr().err


def test_all_views_cut_through_the_label_centroid(knee):
    spec = load_dataset(knee)
    panels = build_panels(spec, "case001", "Tr", "label_centroid")
    assert [p.name for p in panels] == ["sagittal (MR0)", "coronal (MR0)", "axial (MR0)"]
    assert panels[0].label is not None and panels[1].label is None and panels[2].label is None
    label, geom = spec.read_label("case001")
    centre = label_centroid_mm(label, geom)
    for panel in panels:
        axis, index = panel.resolved_axis(), panel.resolved_index()
        g = panel.geometry
        # the chosen slice is the one nearest to the centroid: within half a slice thickness of it
        offset = physical_to_index(g, centre)[axis] - index
        assert abs(offset) <= 0.5 + 1e-9
        assert g.array_spacing[axis] == max(g.array_spacing)  # the thick (acquired) slice direction


def test_slice_axis_and_pixel_aspect_follow_the_spacing():
    # a thick-slice stack stored with its slices along ITK x (numpy axis 2), and unequal in-plane spacing
    geom = Geometry((6, 40, 20), (4.0, 0.5, 1.0), (0.0, 0.0, 0.0))
    assert slice_axis(geom) == 2
    assert slice_axis(Geometry((20, 20, 8), (0.4, 0.4, 3.5), (0.0, 0.0, 0.0))) == 0
    assert slice_axis(Geometry((8, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))) == 0
    image = np.random.default_rng(0).normal(size=geom.array_shape).astype(np.float32)
    label = np.zeros(geom.array_shape, np.uint8)
    label[5:9, 4:10, 3] = 2
    fig = Figure(figsize=(4, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = draw_view(ax, ViewPanel("x", image, geom, label=label))
    assert shown == [2]
    # slice (z, y) of shape (20, 40): rows are 1.0 mm (ITK z), columns 0.5 mm (ITK y) -> 20 mm x 20 mm
    assert ax.get_xlim() == pytest.approx((0.0, 40 * 0.5))
    assert ax.get_ylim() == pytest.approx((20 * 1.0, 0.0))
    assert ax.get_aspect() == 1.0


def test_label_colours_and_transparent_background():
    rgba = label_to_rgba(np.array([[0, 1], [2, 1]]), alpha=0.4)
    assert rgba[0, 0, 3] == 0.0 and rgba[0, 1, 3] == pytest.approx(0.4)
    assert not np.allclose(rgba[0, 1, :3], rgba[1, 0, :3])
    np.testing.assert_allclose(rgba[0, 1], rgba[1, 1])


def test_prediction_style_montage_with_probability_saliency_and_bars(tmp_path):
    geom = Geometry((24, 20, 6), (0.5, 0.5, 3.0), (10.0, -5.0, 2.0))
    rng = np.random.default_rng(1)
    image = rng.normal(size=geom.array_shape).astype(np.float32)
    prob = rng.uniform(size=geom.array_shape).astype(np.float32)
    panels = [ViewPanel("sagittal", image, geom, label=(prob > 0.7).astype(np.uint8), probability=prob),
              ViewPanel("coronal", image[None], geom, saliency=prob * 3.0)]
    out = render_montage(panels, tmp_path / "o.png", title="pred", label_names={1: "tear"},
                         diagnoses={"acl_tear": 1.0, "pcl_tear": float("nan")},
                         probabilities={"acl_tear": 0.8, "pcl_tear": 0.1}, threshold={"acl_tear": 0.4,
                                                                                      "pcl_tear": 0.5})
    assert png_size(out) == montage_size_px(2, side_panel=True) == (1120, 480)
