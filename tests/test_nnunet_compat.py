"""A plain nnU-Net v2 dataset goes through the whole pipeline unchanged: verify, plan, preprocess, train, predict
(output named like nnU-Net's, ``{CASE}.nii.gz``, in the input's geometry) and evaluate."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from tests.builders import write_tiny_nnunet_dataset


def test_nnunet_dataset_end_to_end(tmp_path, monkeypatch):
    for kind in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"ORTHO_{kind}", str(tmp_path / kind))
    torch.set_num_threads(1)
    root = write_tiny_nnunet_dataset(tmp_path / "raw" / "Dataset961_Plain", n_train=6, anisotropic=True)
    from orthonet.inference.cli import evaluate_cli, predict_cli
    from orthonet.verify import cli as verify_cli
    from orthonet.planners.cli import plan_and_preprocess_cli
    from orthonet.training.cli import train_cli
    assert verify_cli(["-d", "961"]) == 0
    assert plan_and_preprocess_cli(["-d", "961", "-np", "1"]) == 0
    plans = json.loads((tmp_path / "preprocessed" / "Dataset961_Plain" / "plans.json").read_text(encoding="utf-8"))
    assert list(plans["views"]) == ["image"]
    assert train_cli(["961", "3d_fullres", "0", "--epochs", "1", "--iterations-per-epoch", "3",
                      "--val-iterations", "1", "--num-workers", "0", "--device", "cpu"]) == 0
    fold = tmp_path / "results" / "Dataset961_Plain" / "SegTrainer__orthoPlans__3d_fullres" / "fold_0"
    assert json.loads((fold / "validation" / "summary.json").read_text(encoding="utf-8"))["segmentation"]["dice"].keys() == \
        {"bone", "cartilage"}
    # predict two training images as if they were new (nnU-Net naming in, nnU-Net naming out)
    inp = tmp_path / "in"
    inp.mkdir()
    for case in ("pat_000", "pat_001"):
        (inp / f"{case}_0000.nii.gz").write_bytes((root / "imagesTr" / f"{case}_0000.nii.gz").read_bytes())
    out = tmp_path / "out"
    assert predict_cli(["-i", str(inp), "-o", str(out), "-d", "961", "-f", "0", "--device", "cpu",
                        "--no-progress"]) == 0
    for case in ("pat_000", "pat_001"):
        pred = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        ref = sitk.ReadImage(str(root / "imagesTr" / f"{case}_0000.nii.gz"))
        assert pred.GetSize() == ref.GetSize()
        np.testing.assert_allclose(pred.GetSpacing(), ref.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(pred.GetOrigin(), ref.GetOrigin(), atol=1e-5)
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}
    assert evaluate_cli(["-ref", str(root / "labelsTr"), "-pred", str(out), "-d", "961"]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert sorted(summary["segmentation"]["per_case"]) == ["pat_000", "pat_001"]
    assert not list(Path(out).glob("*_image.nii.gz"))
    assert os.path.isfile(out / "report.html")
