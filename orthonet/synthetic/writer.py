"""Write a complete synthetic dataset folder in the orthonet format.

Why a temporary sibling folder: a run that is killed halfway must never leave a half dataset under the real name
(a later `ortho_plan_and_preprocess` would silently use it). Cases are written into ``.DatasetXXX_Name.partial-*``
and the folder is renamed into place only when everything, CSVs and dataset.json included, is written.

Each case's random stream comes from (seed, split, index within split) alone, so adding cases never changes earlier
ones and the result does not depend on the number of worker processes.
"""
from __future__ import annotations

import csv
import io
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm import tqdm

from orthonet.errors import OrthoError
from orthonet.fileio import save_json, save_text
from orthonet.imageio import write_array
from orthonet.paths import dataset_id_from_name
from orthonet.synthetic.acquisition import resolve_preset
from orthonet.synthetic.case import SEGMENTATION_VIEW, VIEWS, generate_case
from orthonet.synthetic.intensities import center_profile
from orthonet.synthetic.joints import get_joint

PathLike = Union[str, Path]
FILE_ENDING = ".nii.gz"
CHANNEL_NAME = "PD_FS"
#: split -> (image folder, label folder or None, code used in the case seed)
SPLITS = {"Tr": ("imagesTr", "labelsTr", 0), "Ts": ("imagesTs", "labelsTs", 1),
          "Unlabeled": ("imagesUnlabeled", None, 2)}
#: Files beyond the core format that the generator writes (ground truth of the test split, provenance).
EXTRA_FILES = ("labelsTs/", "diagnosesTs.csv", "synthetic.json", "make_synthetic.log")


def case_id(joint: str, split: str, index: int) -> str:
    """Case id: ``knee_000`` (training), ``knee_test_000`` (test), ``knee_unl_000`` (unlabeled)."""
    prefix = {"Tr": joint, "Ts": f"{joint}_test", "Unlabeled": f"{joint}_unl"}[split]
    return f"{prefix}_{index:03d}"


def case_seed(seed: int, split: str, index: int) -> int:
    """The seed of one case, from the dataset seed, its split and its index within the split."""
    state = np.random.SeedSequence([int(seed), SPLITS[split][2], int(index)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) | (int(state[1] & 0x7FFFFFFF) << 32)


def _case_tasks(joint: str, n_train: int, n_test: int, n_unlabeled: int, seed: int, n_centers: int) -> List[Dict]:
    tasks = []
    for split, n in (("Tr", n_train), ("Ts", n_test), ("Unlabeled", n_unlabeled)):
        for i in range(n):
            tasks.append({"case_id": case_id(joint, split, i), "split": split, "index": i,
                          "seed": case_seed(seed, split, i), "center": i % n_centers})
    return tasks


def _write_case(args: Tuple[Dict, str, str, Dict, str]) -> Dict:
    """Generate one case and write its files under ``root`` (a worker: top-level and picklable)."""
    task, joint, size, overrides, root = args
    t0 = time.perf_counter()
    case = generate_case(joint, task["seed"], size=size, center=task["center"], **overrides)
    gen_s = time.perf_counter() - t0
    images_dir, labels_dir, _ = SPLITS[task["split"]]
    for view in VIEWS:
        data = case.views[view]
        write_array(data.image.astype(np.int16), data.geometry,
                    Path(root) / images_dir / f"{task['case_id']}_{view}_0000{FILE_ENDING}")
    if labels_dir is not None:
        data = case.views[SEGMENTATION_VIEW]
        write_array(data.labels, data.geometry,
                    Path(root) / labels_dir / f"{task['case_id']}_{SEGMENTATION_VIEW}{FILE_ENDING}")
    params = {k: v for k, v in case.params.items() if k != "center_profile"}
    return dict(task, center_name=case.center_name, diagnosis=case.diagnosis.tolist(), params=params,
                shapes={v: list(case.views[v].image.shape) for v in VIEWS}, generate_s=round(gen_s, 3),
                total_s=round(time.perf_counter() - t0, 3))


def _csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def make_dataset(out_dir: PathLike, joint: str = "knee", n_train: int = 20, n_test: int = 5, n_unlabeled: int = 0,
                 seed: int = 0, size: str = "default", n_centers: int = 2, *, num_processes: int = 1,
                 overwrite: bool = False, progress: bool = True, **overrides) -> Path:
    """Write a complete synthetic dataset at ``out_dir`` (a ``DatasetXXX_Name`` folder) and return its path.

    Besides the core format (dataset.json, imagesTr/labelsTr, diagnoses.csv, centers.csv, imagesTs,
    imagesUnlabeled) it writes the test split's ground truth (``labelsTs/``, ``diagnosesTs.csv``), the generator's
    provenance (``synthetic.json``: parameters, per-case seed, centre, anatomy) and ``make_synthetic.log``.
    ``overrides`` adjust the size preset (``in_plane_mm``, ``slice_mm``, ``pv_samples``, ``fov_scale``)."""
    out_dir = Path(out_dir).expanduser().resolve()
    dataset_id_from_name(out_dir.name)       # raises OrthoError unless named DatasetXXX_Name
    model = get_joint(joint)
    preset = resolve_preset(size, **overrides)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for what, n in (("training", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        if int(n) < 0:
            raise OrthoError(f"the number of {what} cases must be >= 0 (got {n})")
    if n_train + n_test + n_unlabeled == 0:
        raise OrthoError("nothing to generate: 0 training, test and unlabeled cases",
                         fix="ask for at least one case, e.g. --train 20")
    if int(n_centers) < 1:
        raise OrthoError(f"the number of centres must be >= 1 (got {n_centers})")
    if out_dir.exists() and not overwrite:
        raise OrthoError("dataset folder already exists", out_dir,
                         fix="pass --overwrite (overwrite=True) to replace it, or choose another dataset id")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tasks = _case_tasks(model.name, n_train, n_test, n_unlabeled, seed, n_centers)
    log: List[str] = [f"ortho_make_synthetic: joint={model.name} seed={seed} size={preset.name} "
                      f"({preset.in_plane_mm} mm in-plane, {preset.slice_mm} mm slices, {preset.pv_samples} "
                      f"partial-volume samples) centres={n_centers} train={n_train} test={n_test} "
                      f"unlabeled={n_unlabeled}"]
    t0 = time.perf_counter()
    try:
        for split, (images_dir, labels_dir, _) in SPLITS.items():
            (tmp / images_dir).mkdir(parents=True)
            if labels_dir:
                (tmp / labels_dir).mkdir()
        work = [(t, model.name, size, overrides, str(tmp)) for t in tasks]
        results = _run(work, num_processes, progress, f"{model.dataset_name}: generating cases")
        results.sort(key=lambda r: (SPLITS[r["split"]][2], r["index"]))
        for r in results:
            log.append(f"{r['case_id']} split={r['split']} seed={r['seed']} centre={r['center_name']} "
                       f"diagnoses={''.join(map(str, r['diagnosis']))} generate={r['generate_s']}s "
                       f"total={r['total_s']}s")
        _write_tables(tmp, model, results, n_centers)
        _write_meta(tmp, model, preset, results, seed, size, n_centers, overrides, n_train, n_test, n_unlabeled)
        log.append(f"done: {len(results)} cases in {time.perf_counter() - t0:.1f} s")
        save_text("\n".join(log) + "\n", tmp / "make_synthetic.log")
        _swap_into_place(tmp, out_dir, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _run(work: List, num_processes: int, progress: bool, desc: str) -> List[Dict]:
    bar = tqdm(total=len(work), desc=desc, unit="case", disable=not progress)
    results = []
    try:
        if num_processes <= 1 or len(work) <= 1:
            for item in work:
                results.append(_write_case(item))
                bar.update()
        else:
            with multiprocessing.get_context().Pool(min(num_processes, len(work))) as pool:
                for r in pool.imap_unordered(_write_case, work):
                    results.append(r)
                    bar.update()
    finally:
        bar.close()
    return results


def _write_tables(root: Path, model, results: List[Dict], n_centers: int) -> None:
    header = ["case_id"] + list(model.diagnoses)
    for split, name in (("Tr", "diagnoses.csv"), ("Ts", "diagnosesTs.csv")):
        rows = [[r["case_id"]] + [str(v) for v in r["diagnosis"]] for r in results if r["split"] == split]
        if split == "Tr" or rows:
            save_text(_csv_text(header, rows), root / name)
    save_text(_csv_text(["case_id", "center"], [[r["case_id"], r["center_name"]] for r in results]),
              root / "centers.csv")
    if not any(r["split"] == "Ts" for r in results):
        shutil.rmtree(root / "labelsTs", ignore_errors=True)


def _write_meta(root: Path, model, preset, results: List[Dict], seed: int, size: str, n_centers: int,
                overrides: Dict, n_train: int, n_test: int, n_unlabeled: int) -> None:
    centers = [center_profile(i) for i in range(n_centers)]
    dataset = {
        "name": model.dataset_name,
        "description": f"{model.description}. Generated by orthonet.synthetic (joint={model.name}, seed={seed}, "
                       f"size={size}); test ground truth in labelsTs/ and diagnosesTs.csv.",
        "reference": "orthonet ortho_make_synthetic",
        "licence": "CC0-1.0 (synthetic data)",
        "joint": model.name,
        "views": list(VIEWS),
        "segmentation_view": SEGMENTATION_VIEW,
        "channel_names": {"0": CHANNEL_NAME},
        "labels": model.label_dict(),
        "diagnoses": list(model.diagnoses),
        "file_ending": FILE_ENDING,
        "numTraining": int(n_train),
        "numTest": int(n_test),
        "numUnlabeled": int(n_unlabeled),
        "centers": [c.name for c in centers],
    }
    save_json(dataset, root / "dataset.json")
    meta = {
        "generator": "orthonet.synthetic",
        "joint": model.name,
        "seed": int(seed),
        "size": size,
        "acquisition": {"in_plane_mm": preset.in_plane_mm, "slice_mm": preset.slice_mm,
                        "pv_samples": preset.pv_samples, "fov_scale": preset.fov_scale,
                        "label_rule": "label of the phantom at each thick slice's centre plane"},
        "overrides": overrides,
        "centers": [c.as_dict() for c in centers],
        "prevalence": dict(model.prevalence),
        "extra_files": list(EXTRA_FILES),
        "cases": {r["case_id"]: {"split": r["split"], "index": r["index"], "seed": r["seed"],
                                 "center": r["center_name"],
                                 "diagnoses": dict(zip(model.diagnoses, r["diagnosis"])),
                                 "shapes": r["shapes"], "anatomy": r["params"]} for r in results},
    }
    save_json(meta, root / "synthetic.json")


def _swap_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished folder onto ``out_dir``; an old dataset is moved aside first and deleted after."""
    old: Optional[Path] = None
    if out_dir.exists():
        if not overwrite:
            raise OrthoError("dataset folder appeared while generating", out_dir,
                             fix="pass --overwrite to replace it")
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
