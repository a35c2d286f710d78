"""Steps several benchmarks share: parsing number lists, and generating + planning a synthetic dataset once."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import List, Sequence


def ints(text: str) -> List[int]:
    """'16,64,64' -> [16, 64, 64] (empty items ignored)."""
    return [int(v) for v in str(text).split(",") if v.strip()]


def synthetic_dataset(dataset_id: int, dataset_name: str, joint: str, n_train: int, n_unlabeled: int, seed: int,
                      size: str, configuration: str = "3d_fullres", plan_args: Sequence[str] = (),
                      n_test: int = 0) -> Path:
    """Generate ``$ORTHO_raw/<dataset_name>`` (``n_test`` test exams in imagesTs) and run
    ``ortho_plan_and_preprocess`` on it, each only when its output is missing (benchmarks rerun on the same data);
    returns the preprocessed dataset folder."""
    from orthonet.planners.cli import main as plan_main
    from orthonet.planners.plans import plans_path
    from orthonet.synthetic.writer import make_dataset

    raw = Path(os.environ["ORTHO_raw"]) / dataset_name
    pre = Path(os.environ["ORTHO_preprocessed"]) / dataset_name
    if not (raw / "dataset.json").is_file():
        t0 = time.time()
        make_dataset(raw, joint, n_train=n_train, n_test=n_test, n_unlabeled=n_unlabeled, seed=seed, size=size,
                     num_processes=2, progress=False)
        print(f"[data] {n_train}+{n_unlabeled} {joint} exams in {time.time() - t0:.0f} s", flush=True)
    if not plans_path(pre).is_file() or not any((pre / f"orthoPlans_{configuration}").glob("*.json")):
        t0 = time.time()
        code = plan_main(["-d", str(dataset_id), "-c", configuration, "-np", "2", "--no-progress", *plan_args])
        if code != 0:
            raise SystemExit(f"ortho_plan_and_preprocess failed with exit code {code}")
        print(f"[plan] planned and preprocessed in {time.time() - t0:.0f} s", flush=True)
    return pre
