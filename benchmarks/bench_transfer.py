"""Benchmark: knee -> ankle and shoulder transfer of whole-exam diagnosis features, knee vs own joint vs scratch.

What it measures (issue 11 item 3): do the knee's diffusion-pretrained view encoders carry over to other joints?
The mission claims that the knee's features transfer to the ankle (4 conditions) and the shoulder (7). Here a
target joint is planned from the knee's plans exactly as a user does the transfer, and its diagnoses are probed
with the knee's encoders, with encoders pretrained on the target joint's own images, and with random encoders.

1. Knee source: the per-view ``encoder.pt`` files of a planned, pretrained knee dataset. By default the work folder
   of ``bench_whole_exam_diagnosis.py`` (``--knee-work``, ``Dataset992_KneeWholeExam``, plan
   ``-gpu_memory_target 1 --base-features 16``, pretraining where ``--pretrained auto`` finds it). When that knee
   or its encoders are missing they are made with that benchmark's own functions (``--knee-n`` labelled +
   ``--knee-unlabeled`` unlabeled knees, ``--pretrain-*``), so a later whole-exam run reuses them.
2. Targets: ``orthonet.synthetic`` ankles and shoulders (``--n-train`` labelled + ``--n-unlabeled`` unlabeled
   exams, ``--size``), planned by the real ``ortho_plan_and_preprocess -d TARGET --plans-from KNEE [--view-map
   ...]``: views matched by the plane each series is (the shoulder's oblique scapular-plane stacks count as the plane
   they are closest to), the knee's networks kept, the patch clipped to the target's images. The knee's
   preprocessed and results folders are linked into ``WORK`` so the knee and the targets resolve in one
   ``ORTHO_*`` environment, as on a user's machine.
3. Encoders, three rows per target, the same model (``--task diag``, ``diagnosis_input='whole'``, diffusion
   features at t) and the same seed for its random initialisation:
   - knee-transfer: the knee's ``encoder.pt`` per view, resolved by :func:`orthonet.training.pretrained.find_pretrained`
     through the plans' view map (``--pretrained <the knee's Pretrain__ folder>``; before own-joint pretraining
     exists the recipe's ``--pretrained auto`` is resolved too and must name the same files) and loaded by
     ``ortho_train``'s own per-view loader (network hash, source view, every tensor checked). Every view must load;
     anything else stops the benchmark.
   - own joint: one denoiser per view pretrained on the target's own labelled + unlabeled images (no labels read),
     the knee's steps and patch (its ``pretraining.json``; batch ``--pretrain-batch``; ``--own-pretrain-steps``
     overrides the steps, ``--skip-own-pretrain`` drops the row), loaded the same way (``--pretrained auto`` of the
     target, which finds its own encoders first).
   - scratch: the encoders at their random initialisation.
4. Frozen-probe diagnosis exactly as ``bench_whole_exam_diagnosis.py`` (its functions are imported): every exam's
   whole-volume encoder features computed once, the attention-MIL head trained on them with the trainer's loss,
   ``--folds``-fold CV stratified per label, at 100 % and ``--fraction`` of each training fold's labels
   (``--subsets`` random subsets, averaged).
5. Out-of-fold probabilities give per-condition AUC with case-bootstrap 95 % intervals, macro AUC / AP with
   intervals, and paired bootstraps of knee-transfer minus scratch (the target: >= +0.05 macro AUC at 10 % labels on
   both joints), own joint minus scratch and knee-transfer minus own joint.
6. Dice of the segmentation view (optional, ``--seg-iterations N``): the real ``ortho_train --task seg`` on fold 0,
   knee-pretrained vs own vs scratch, N iterations each, validation Dice of the held-out fold, with case-bootstrap
   95 % intervals of each row's mean Dice and of the paired differences (the same case resamples for every row of a
   label fraction). ``--seg-only`` runs (or, where ``WORK/seg/<joint>/<row>`` holds a finished run, only reads) the
   Dice rows without the diagnosis part and writes ``WORK/seg_results.json``. Off by default: a
   segmentation run long enough to mean something is far beyond a 2-core CPU budget at the ``default`` size, and the
   section says so when it was not measured.

Usage::

    python benchmarks/bench_transfer.py                 # full run, writes the 'transfer' section of docs/benchmarks.md
    python benchmarks/bench_transfer.py --quick --work /tmp/tq --knee-work /tmp/tq_knee   # smoke run, no docs
    # Dice rows only, 10 % labels: once WORK holds the data (a first run made it), knee and scratch side by side
    # on one core each, then one run that trains nothing new and tabulates both
    S="--seg-only --joints shoulder --seg-iterations 300 --seg-trainer SegTrainerPyramid --seg-fractions 0.1"
    python benchmarks/bench_transfer.py $S --threads 1 --seg-encoders knee &
    python benchmarks/bench_transfer.py $S --threads 1 --seg-encoders scratch; wait
    python benchmarks/bench_transfer.py $S --skip-own-pretrain

Results: ``WORK/results.json`` and the ``transfer`` section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import bench_whole_exam_diagnosis as wx  # noqa: E402 (after the path setup)
from benchmarks.common import ints, synthetic_dataset  # noqa: E402

CONFIG = wx.CONFIG
KNEE_WORK = "/tmp/orthonet_bench_whole_exam"
#: target joint -> (dataset id, dataset folder name); ids kept clear of the other benchmarks' (101, 992)
TARGETS = {"ankle": (993, "Dataset993_AnkleTransfer"), "shoulder": (994, "Dataset994_ShoulderTransfer")}
ENCODERS = ("knee", "own", "scratch")
ENCODER_LABEL = {"knee": "knee-transfer", "own": "own joint", "scratch": "scratch"}
TARGET_GAIN = 0.05
#: the paired comparisons of every benchmark row (AUC and Dice): key suffix -> label
PAIRS = (("knee", "scratch"), ("own", "scratch"), ("knee", "own"))
DIFFERENCE_LABEL = {f"{a}_minus_{b}": f"{ENCODER_LABEL[a]} minus {ENCODER_LABEL[b]}" for a, b in PAIRS}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=None, help="working folder of the targets (default /tmp/orthonet_bench_transfer; "
                   "--quick: /tmp/orthonet_bench_transfer_quick)")
    p.add_argument("--knee-work", default=None,
                   help=f"work folder of the knee source (its raw/, preprocessed/, results/; default {KNEE_WORK}, "
                        "the whole-exam benchmark's; --quick: WORK/knee_source)")
    p.add_argument("--knee-dataset", default=wx.DATASET_NAME, help="the knee dataset folder name in --knee-work")
    p.add_argument("--knee-n", type=int, default=120, help="labelled knees, only when the knee must be generated")
    p.add_argument("--knee-unlabeled", type=int, default=40, help="unlabeled knees, only when generated")
    p.add_argument("--knee-size", default="default", help="size preset of a generated knee")
    p.add_argument("--knee-plan-args", default="-gpu_memory_target 1 --base-features 16",
                   help="ortho_plan_and_preprocess arguments of a generated knee (the whole-exam benchmark's)")
    p.add_argument("--joints", default="ankle,shoulder", help="target joints, comma separated")
    p.add_argument("--n-train", type=int, default=80, help="labelled exams per target joint")
    p.add_argument("--n-unlabeled", type=int, default=20, help="unlabeled exams per target (own pretraining only)")
    p.add_argument("--size", default="default", help="synthetic size preset of the targets")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (knee and targets) and model seed")
    p.add_argument("--view-map", nargs="*", default=[], metavar="JOINT:TARGET=SOURCE",
                   help="passed to --plans-from as --view-map TARGET=SOURCE for that joint (default: none, the "
                        "views match by the plane each series is)")
    p.add_argument("--pretrain-steps", type=int, default=400, help="knee pretraining steps per view, if generated")
    p.add_argument("--pretrain-patch", default="16,64,64",
                   help="pretraining patch of a generated knee (and of the own-joint rows when the knee's record is "
                        "missing)")
    p.add_argument("--pretrain-batch", type=int, default=2)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--own-pretrain-steps", type=int, default=None,
                   help="own-joint pretraining steps per view (default: the knee's)")
    p.add_argument("--skip-own-pretrain", action="store_true", help="no own-joint row")
    p.add_argument("--levels", default="-2,-1", help="encoder levels the diagnosis reads (as the whole-exam one)")
    p.add_argument("--pooling", default="mil", help="pooling of the whole-exam head, comma separated")
    p.add_argument("--folds", type=int, default=5,
                   help="stratified CV folds over the labelled exams (the features are computed once, so 5 folds cost "
                        "only head training: about 0.3 s a step on 2 cores)")
    p.add_argument("--fraction", type=float, default=0.1, help="label fraction of the low-label rows")
    p.add_argument("--subsets", type=int, default=2, help="random label subsets per fold at --fraction")
    p.add_argument("--head-steps", type=int, default=100,
                   help="optimizer steps of the diagnosis head (100: the whole-exam section's run)")
    p.add_argument("--head-epochs", type=float, default=0,
                   help="at least this many passes over the training exams (as the whole-exam benchmark's option)")
    p.add_argument("--head-batch", type=int, default=8, help="exams per head step")
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals")
    p.add_argument("--seg-iterations", type=int, default=0,
                   help="if > 0: train ortho_train --task seg on fold 0 for this many iterations per encoder row "
                        "and label fraction and report validation Dice (slow on CPU; default off)")
    p.add_argument("--seg-trainer", default="SegTrainer", help="trainer of the Dice rows")
    p.add_argument("--seg-only", action="store_true",
                   help="only the Dice rows (needs --seg-iterations): no diagnosis rows, no own-joint pretraining "
                        "(the own row uses WORK's own encoders when they exist), results in WORK/seg_results.json, "
                        "docs untouched. Runs already in WORK/seg/<joint>/<row> are read, not retrained. Only the "
                        "knee views the targets' segmentation views take their encoder from are pretrained")
    p.add_argument("--seg-fractions", default=None, metavar="F,F",
                   help="label fractions of the Dice rows (default: 1.0 and --fraction)")
    p.add_argument("--seg-encoders", default=",".join(ENCODERS), metavar="ROW,ROW",
                   help=f"encoder rows of the Dice rows, from {','.join(ENCODERS)} (own only where it exists). "
                        "Once WORK has the data, a knee and a scratch process can train at the same time (knee "
                        "and own share ortho_train's output folder: not those two); a last run without "
                        "--seg-encoders reads the finished rows, trains only what is missing and tabulates them all")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default 2; --quick: 1). Use 1 when another job shares the cores: at load "
                        "4-5 on 2 cores the quick run took 6.8 min with 2 threads and 46 s with 1")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (tiny size, few exams and steps, --no-write)")
    p.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_unlabeled, args.size = 10, 2, "tiny"
        args.knee_n, args.knee_unlabeled, args.knee_size = 8, 2, "tiny"
        args.pretrain_steps, args.head_steps, args.folds, args.subsets, args.bootstrap = 4, 5, 2, 1, 50
        args.fraction, args.no_write = 0.5, True
    args.threads = args.threads or (1 if args.quick else 2)
    args.work = args.work or ("/tmp/orthonet_bench_transfer_quick" if args.quick else "/tmp/orthonet_bench_transfer")
    args.knee_work = args.knee_work or (str(Path(args.work) / "knee_source") if args.quick else KNEE_WORK)
    args.joint_list = [j.strip().lower() for j in args.joints.split(",") if j.strip()]
    unknown = [j for j in args.joint_list if j not in TARGETS]
    if unknown or not args.joint_list:
        p.error(f"--joints: unknown {unknown}; choose from {sorted(TARGETS)}")
    args.view_maps = parse_joint_view_maps(args.view_map, args.joint_list)
    if args.seg_only and args.seg_iterations <= 0:
        p.error("--seg-only needs --seg-iterations N (N > 0)")
    try:
        args.seg_fraction_list = ([float(f) for f in args.seg_fractions.split(",") if f.strip()]
                                  if args.seg_fractions else [1.0, args.fraction])
    except ValueError:
        p.error(f"--seg-fractions: {args.seg_fractions!r} is not a comma-separated list of numbers, e.g. 0.1,1.0")
    if not args.seg_fraction_list or any(not 0 < f <= 1 for f in args.seg_fraction_list):
        p.error(f"--seg-fractions: {args.seg_fractions!r}: each fraction must be in (0, 1]")
    if len({f for f in args.seg_fraction_list if f < 1}) > 1:
        p.error(f"--seg-fractions: {args.seg_fractions!r}: at most one fraction below 1 (the low-label rows)")
    args.seg_encoder_list = [e.strip().lower() for e in args.seg_encoders.split(",") if e.strip()]
    bad = [e for e in args.seg_encoder_list if e not in ENCODERS]
    if bad or not args.seg_encoder_list:
        p.error(f"--seg-encoders: unknown {bad}; choose from {','.join(ENCODERS)}")
    return args


def parse_joint_view_maps(items: Sequence[str], joints: Sequence[str]) -> Dict[str, List[str]]:
    """``['shoulder:sagittal=sagittal', ...]`` -> ``{'shoulder': ['sagittal=sagittal']}`` (the ``--view-map``
    arguments of that joint's ``--plans-from``); an entry without a known joint or ``=`` is an error."""
    out: Dict[str, List[str]] = {j: [] for j in joints}
    for item in items or []:
        joint, sep, mapping = str(item).partition(":")
        joint = joint.strip().lower()
        target, _, source = mapping.partition("=")
        if not sep or "=" not in mapping or not target.strip() or not source.strip():
            raise SystemExit(f"--view-map entry '{item}' is not JOINT:TARGET=SOURCE (e.g. shoulder:sagittal=sagittal)")
        if joint not in out:
            raise SystemExit(f"--view-map entry '{item}' names joint '{joint}', which is not in --joints "
                             f"{list(joints)}")
        out[joint].append(mapping.strip())
    return out


# ------------------------------------------------------------------------------------------------------------
# environment: the knee's work folder and the targets' in one ORTHO_* setup
# ------------------------------------------------------------------------------------------------------------
def set_env(root: Path) -> None:
    for key, sub in (("ORTHO_raw", "raw"), ("ORTHO_preprocessed", "preprocessed"), ("ORTHO_results", "results")):
        os.environ[key] = str(root / sub)
        (root / sub).mkdir(parents=True, exist_ok=True)


def link_into(link: Path, target: Path) -> None:
    """``link`` -> ``target`` (a symlink); an existing link is repointed, a real folder there is an error."""
    target.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        if link.resolve() == target.resolve():
            return
        link.unlink()
    elif link.exists():
        raise SystemExit(f"{link} exists and is not a link to the knee's {target}: move it away or use another --work")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve(), target_is_directory=True)


def knee_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """The whole-exam benchmark's arguments (its parser's defaults, so options it gains later keep their defaults)
    for its ``pretrain`` on the knee."""
    ns = wx.parse_args(["--work", str(args.knee_work)])
    ns.pretrain_steps, ns.pretrain_patch = args.pretrain_steps, args.pretrain_patch
    ns.pretrain_batch, ns.pretrain_lr, ns.skip_pretrain = args.pretrain_batch, args.pretrain_lr, True
    return ns


def prepare_knee(args: argparse.Namespace, views: Optional[Sequence[str]] = None) -> Tuple[Path, Dict, Dict]:
    """The knee's preprocessed folder, plans and pretraining record; generated where missing, and its ``views``
    (default: all) pretrained where they have no ``encoder.pt``.

    Runs with ``ORTHO_*`` pointing at ``--knee-work``."""
    from orthonet.planners.plans import load_plans, plans_path
    from orthonet.paths import dataset_id_from_name

    knee_work = Path(args.knee_work)
    set_env(knee_work)
    pre = knee_work / "preprocessed" / args.knee_dataset
    if not plans_path(pre).is_file():
        print(f"[knee] no plans in {pre}: generating {args.knee_n}+{args.knee_unlabeled} `{args.knee_size}` knees",
              flush=True)
        pre = synthetic_dataset(dataset_id_from_name(args.knee_dataset), args.knee_dataset, "knee", args.knee_n,
                                args.knee_unlabeled, args.seed, args.knee_size, CONFIG,
                                shlex.split(args.knee_plan_args))
    plans = load_plans(pre)
    pretrain_knee_views(args, pre, plans, list(plans["views"]) if views is None else views)
    record = knee_work / "pretraining.json"
    return pre, plans, (json.loads(record.read_text()) if record.is_file() else {})


def pretrain_knee_views(args: argparse.Namespace, pre: Path, plans: Dict, views: Sequence[str]) -> None:
    """Pretrain those of the knee's ``views`` that have no ``encoder.pt`` yet (the whole-exam benchmark's
    ``pretrain``, record in ``--knee-work``/pretraining.json). The encoders are found through ``ORTHO_results``:
    the knee's own, or WORK's link to it."""
    from orthonet.training.pretrained import pretrain_view_dir
    folders = {v: pretrain_view_dir(plans["dataset_name"], plans["plans_name"], CONFIG, v) for v in views}
    missing = [v for v, folder in folders.items() if not (folder / "encoder.pt").is_file()]
    if missing:
        print(f"[knee] pretraining the views without encoder.pt: {missing}", flush=True)
        wx.pretrain(knee_namespace(args), pre, dict(plans, views={v: plans["views"][v] for v in missing}))


def knee_pretraining_summary(plans: Dict, record: Dict, default_patch: str) -> Dict:
    """Steps / patch / batch of the knee's encoders: its pretraining.json where present, else the encoder files."""
    from orthonet.training.pretrained import load_encoder_file, pretrain_view_dir
    per_view = {}
    for v in plans["views"]:
        path = pretrain_view_dir(plans["dataset_name"], plans["plans_name"], CONFIG, v) / "encoder.pt"
        payload = load_encoder_file(path)
        rec = record.get(v) or {}
        per_view[v] = {"file": str(path), "steps": int(rec.get("steps") or payload.get("steps") or 0),
                       "patch": rec.get("patch"), "patches_per_s": rec.get("patches_per_s"),
                       "loss_first20": rec.get("loss_first20"), "loss_last20": rec.get("loss_last20")}
    steps = max(s["steps"] for s in per_view.values())
    # each view's record holds the requested patch clipped to that view's planned one: their per-axis maximum is
    # the request (the target's views clip it to their own planned patches again)
    patches = [s["patch"] for s in per_view.values() if s["patch"]]
    patch = ",".join(str(max(p[a] for p in patches)) for a in range(len(patches[0]))) if patches else default_patch
    return {"per_view": per_view, "steps": steps, "patch": patch}


def prepare_target(args: argparse.Namespace, joint: str, knee_name: str) -> Tuple[Path, Dict]:
    """Generate the target joint and run ``ortho_plan_and_preprocess -d TARGET --plans-from KNEE [--view-map ...]``
    (``ORTHO_*`` at ``WORK``, the knee linked in); returns (preprocessed folder, plans)."""
    from orthonet.planners.plans import load_plans
    dataset_id, name = TARGETS[joint]
    plan_args = ["--plans-from", knee_name]
    if args.view_maps.get(joint):
        plan_args += ["--view-map", *args.view_maps[joint]]
    pre = synthetic_dataset(dataset_id, name, joint, args.n_train, args.n_unlabeled, args.seed, args.size, CONFIG,
                            plan_args)
    plans = load_plans(pre)
    origin = (plans.get("transferred_from") or {}).get("dataset_name")
    if origin != knee_name:
        raise SystemExit(f"{pre}: its plans were not transferred from {knee_name} (transferred_from: {origin}); "
                         f"delete {pre} or use another --work")
    return pre, plans


# ------------------------------------------------------------------------------------------------------------
# encoders: find and load them as ortho_train does, every view or nothing
# ------------------------------------------------------------------------------------------------------------
class _TrainerView:
    """The attributes ``BaseTrainer._load_view_weights`` (ortho_train's per-view loader) reads: plans,
    configuration, no decoder loading, and its log."""

    load_pretrained_decoder = False

    def __init__(self, plans: Dict):
        self.plans = plans
        self.opts = SimpleNamespace(configuration=CONFIG)
        self.model_cfg = SimpleNamespace(segmentation_view=None)

    @staticmethod
    def log(message: str) -> None:
        print(f"[load] {message}", flush=True)


def check_complete(source, views: Sequence[str], what: str) -> None:
    """Stop unless ``source`` (a :class:`PretrainedSource`) has a file for every view."""
    have = sorted(getattr(source, "files", {}) or {})
    missing = [v for v in views if v not in have]
    if source is None or missing:
        raise SystemExit(f"{what}: no pretrained encoder for view(s) {missing or list(views)} "
                         f"(found: {have or 'none'}); the transfer would silently train those from scratch")


def load_encoders(model, plans: Dict, pretrained: str, expected_dataset: str) -> Dict[str, Dict]:
    """Resolve ``--pretrained pretrained`` with :func:`find_pretrained` (the plans' view map honoured) and load each
    view's file with ortho_train's loader; every view of the model must load from ``expected_dataset``. Returns the
    per-view record (file, source view, dataset, tensors)."""
    from orthonet.training.pretrained import find_pretrained
    from orthonet.training.trainers.base import BaseTrainer

    views = list(plans["views"])
    source = find_pretrained(pretrained, plans, CONFIG, views)
    check_complete(source, views, f"--pretrained {pretrained}")
    loader = _TrainerView(plans)
    record = {}
    for view in views:
        _, entry = BaseTrainer._load_view_weights(loader, model, view, Path(source.files[view]),
                                                  source.expected_views.get(view, view))
        if entry["pretrained_dataset"] != expected_dataset:
            raise SystemExit(f"view '{view}' loaded {entry['file']} from {entry['pretrained_dataset']}, "
                             f"expected an encoder of {expected_dataset}")
        record[view] = entry
    return record


def same_files(a, b) -> bool:
    """Two PretrainedSource name the same file per view."""
    fa = {v: str(Path(p).resolve()) for v, p in (getattr(a, "files", None) or {}).items()}
    fb = {v: str(Path(p).resolve()) for v, p in (getattr(b, "files", None) or {}).items()}
    return bool(fa) and fa == fb


def own_pretrain(args: argparse.Namespace, joint: str, pre: Path, plans: Dict, steps: int, patch: str,
                 batch: int) -> Dict:
    """One denoiser per view on the target's own images (the whole-exam benchmark's ``pretrain``, the knee's steps
    and patch); reused when every view's encoder.pt has ``steps`` steps, else every view is pretrained afresh."""
    from orthonet.training.pretrained import load_encoder_file, pretrain_view_dir
    ns = wx.parse_args(["--work", str(Path(args.work) / joint)])
    ns.pretrain_steps, ns.pretrain_patch, ns.pretrain_batch, ns.pretrain_lr = steps, patch, batch, args.pretrain_lr
    files = [pretrain_view_dir(plans["dataset_name"], plans["plans_name"], CONFIG, v) / "encoder.pt"
             for v in plans["views"]]
    ns.skip_pretrain = all(f.is_file() and int(load_encoder_file(f).get("steps") or 0) == steps for f in files)
    Path(ns.work).mkdir(parents=True, exist_ok=True)
    return wx.pretrain(ns, pre, plans)


# ------------------------------------------------------------------------------------------------------------
# one target joint
# ------------------------------------------------------------------------------------------------------------
def head_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """The whole-exam benchmark's arguments for its train_head / cross_validate, with this run's head settings."""
    ns = wx.parse_args([])
    ns.head_steps, ns.head_batch, ns.head_lr = args.head_steps, args.head_batch, args.head_lr
    ns.head_epochs = args.head_epochs
    return ns


def read_labels(name: str) -> Tuple[List[str], np.ndarray, List[str]]:
    from orthonet.dataset import load_dataset
    spec = load_dataset(Path(os.environ["ORTHO_raw"]) / name)
    diagnoses = spec.read_diagnoses("Tr")
    cases = sorted(diagnoses)
    return cases, np.stack([diagnoses[c] for c in cases]).astype(np.float64), list(spec.diagnoses)


def paired(boots: Dict[str, List[float]], rows: Dict[str, Dict], a: str, b: str) -> Optional[Dict]:
    """Point difference of macro AUC a - b and its paired-bootstrap 95 % interval (the same case resamples)."""
    if a not in boots or b not in boots:
        return None
    d = np.asarray(boots[a]) - np.asarray(boots[b])
    return {"mean": float(rows[a]["macro_auc"] - rows[b]["macro_auc"]), "ci": wx.ci(d)}


def case_mean_dice(summary: Dict, where: str = "summary.json") -> Dict[str, float]:
    """Each validation case's Dice averaged over the structures (the trainer's summary ``per_case``), the unit the
    Dice intervals resample: the cases, not the structures, are the independent draws."""
    per_case = (summary.get("segmentation") or {}).get("per_case") or {}
    if not per_case:
        raise SystemExit(f"{where}: no per-case Dice (segmentation.per_case); rerun that validation")
    out = {}
    for case, dice in per_case.items():
        values = [float(v) for v in dice.values() if v is not None and not math.isnan(float(v))]
        if not values:
            raise SystemExit(f"{where}: case {case} has no Dice value")
        out[case] = float(np.mean(values))
    return out


def dice_intervals(per_case: Dict[str, Dict[str, float]], n_boot: int, seed: int = 0) -> Dict[str, Dict]:
    """Mean Dice with a case-bootstrap 95 % interval per run (key ``<fraction tag>_<encoder>``) and the paired
    differences knee - scratch, own - scratch, knee - own per fraction tag: one set of case resamples per tag, so a
    difference's interval is paired. Runs of one tag must have validated the same cases."""
    out: Dict[str, Dict] = {"rows": {}, "differences": {}}
    tags = sorted({k.split("_", 1)[0] for k in per_case})
    rng = np.random.default_rng(seed)
    for tag in tags:
        keys = [k for k in per_case if k.split("_", 1)[0] == tag]
        cases = sorted(per_case[keys[0]])
        for k in keys:
            if sorted(per_case[k]) != cases:
                raise SystemExit(f"Dice rows {keys[0]} and {k} validated different cases; a paired interval needs "
                                 "the same fold (rerun both on fold 0 of the same splits)")
        values = {k: np.array([per_case[k][c] for c in cases]) for k in keys}
        idx = rng.integers(0, len(cases), size=(n_boot, len(cases)))
        boots = {k: v[idx].mean(axis=1) for k, v in values.items()}
        for k in keys:
            out["rows"][k] = {"mean_dice": float(values[k].mean()), "ci": wx.ci(boots[k]), "cases": len(cases)}
        for a, b in PAIRS:
            ka, kb = f"{tag}_{a}", f"{tag}_{b}"
            if ka in values and kb in values:
                out["differences"][f"{tag}_{a}_minus_{b}"] = {"mean": float(values[ka].mean() - values[kb].mean()),
                                                              "ci": wx.ci(boots[ka] - boots[kb])}
    return out


def run_joint(args: argparse.Namespace, joint: str, knee_plans: Dict, knee_pre_info: Dict) -> Dict:
    from orthonet.training.pretrained import find_pretrained, pretrain_dir

    t_joint = time.time()
    timings: Dict[str, float] = {}
    t0 = time.time()
    pre, plans = prepare_target(args, joint, knee_plans["dataset_name"])
    timings["data_and_plan_s"] = time.time() - t0
    name = plans["dataset_name"]
    views = list(plans["views"])
    cases, labels, names = read_labels(name)
    folds = wx.stratified_folds(labels, args.folds, seed=args.seed)
    low_n = int(np.mean([max(2, round(args.fraction * (len(cases) - len(f)))) for f in folds]))
    transfer = plans["transferred_from"]
    patches = {v: {"knee": knee_plans["views"][transfer["views"][v]]["configurations"][CONFIG]["patch_size"],
                   "target": plans["views"][v]["configurations"][CONFIG]["patch_size"]} for v in views}
    print(f"[{joint}] {name}: {len(cases)} labelled exams, {len(names)} conditions, views "
          + ", ".join(f"{v} <- {transfer['views'][v]} ({transfer['view_matching'][v]})" for v in views), flush=True)

    knee_dir = pretrain_dir(knee_plans["dataset_name"], knee_plans["plans_name"], CONFIG)
    own_dir = pretrain_dir(name, plans["plans_name"], CONFIG)
    # the recipe's `ortho_train TARGET ... --pretrained auto` must find the knee's files before own pretraining exists
    auto_check = None
    if not any((own_dir / v / "encoder.pt").is_file() for v in views):
        auto = find_pretrained("auto", plans, CONFIG, views)
        explicit = find_pretrained(str(knee_dir), plans, CONFIG, views)
        check_complete(auto, views, "--pretrained auto on the transferred plans")
        if not same_files(auto, explicit):
            raise SystemExit(f"--pretrained auto resolved {auto.files}, the knee's folder {explicit.files}")
        auto_check = "`--pretrained auto` resolved the same knee files (checked before own-joint pretraining)"

    encoders = [e for e in ENCODERS if not (e == "own" and args.skip_own_pretrain)]
    hargs = head_namespace(args)
    rows, boots, loaded, own_stats, shapes = {}, {}, {}, {}, None
    for enc in encoders:
        if enc == "own":
            t0 = time.time()
            own_stats = own_pretrain(args, joint, pre, plans, args.own_pretrain_steps or knee_pre_info["steps"],
                                     knee_pre_info["patch"], args.pretrain_batch)
            timings["own_pretrain_s"] = time.time() - t0
        model = wx.build_diag_model(plans, pre, "whole", False, ints(args.levels), args.pooling.split(","),
                                    seed=args.seed)
        n_out = model.diagnosis.n_diagnoses if hasattr(model.diagnosis, "n_diagnoses") else None
        if n_out is not None and n_out != len(names):
            raise SystemExit(f"model has {n_out} diagnosis outputs, {name} has {len(names)} conditions")
        if enc == "knee":
            loaded[enc] = load_encoders(model, plans, str(knee_dir), knee_plans["dataset_name"])
        elif enc == "own":
            loaded[enc] = load_encoders(model, plans, "auto", name)
        model.eval()
        t0 = time.time()
        feats = wx.cache_features(model, plans, pre, cases, "whole")
        timings[f"features_{enc}_s"] = time.time() - t0
        print(f"[{joint}] features {enc}: {len(cases)} exams in {timings[f'features_{enc}_s']:.0f} s", flush=True)
        if shapes is None:
            shapes = {v: [int(round(np.mean([e[v][1][0].shape[a + 1] * s for e in feats]))) for a, s in
                          enumerate(wx.stride_of(model, v, 0))] for v in views}
        for frac, tag in ((1.0, "100"), (args.fraction, "low")):
            t0 = time.time()
            preds = wx.cross_validate(model, feats, labels, folds, frac, args.subsets, hargs)
            s = wx.summarise(preds, labels, args.bootstrap)
            key = f"{tag}_{enc}"
            boots[key] = s.pop("_macro_auc_boot")
            rows[key] = {"labels": "100 %" if frac >= 1 else f"{frac:.0%}", "encoders": ENCODER_LABEL[enc], **s}
            timings[f"cv_{key}_s"] = time.time() - t0
            print(f"[{joint}] cv {key}: macro AUC {s['macro_auc']:.3f} {np.round(s['macro_auc_ci'], 3).tolist()} "
                  f"({timings[f'cv_{key}_s']:.0f} s)", flush=True)
        del feats, model
    diffs = {}
    for tag in ("low", "100"):
        for a, b in PAIRS:
            d = paired(boots, rows, f"{tag}_{a}", f"{tag}_{b}")
            if d:
                diffs[f"{tag}_{a}_minus_{b}"] = d
    seg = seg_rows(args, joint, plans, str(knee_dir), encoders) if args.seg_iterations > 0 else None
    timings["total_s"] = time.time() - t_joint
    return {"dataset": name, "n_train": len(cases), "n_unlabeled": args.n_unlabeled, "conditions": names,
            "views": {v: {"source_view": transfer["views"][v], "why": transfer["view_matching"][v],
                          "knee_patch": patches[v]["knee"], "target_patch": patches[v]["target"]} for v in views},
            "shapes": shapes, "low_label_exams": low_n, "auto_check": auto_check, "loaded": loaded,
            "own_pretraining": own_stats, "rows": rows, "differences": diffs, "segmentation": seg,
            "timings": {k: round(v, 1) for k, v in timings.items()}}


def seg_source_view(plans: Dict) -> str:
    """The knee view whose encoder a transferred target's segmentation view loads (``--plans-from`` view map)."""
    view = plans.get("segmentation_view")
    if not view:
        raise SystemExit(f"{plans['dataset_name']}: its plans name no segmentation_view, so it has no Dice rows")
    return ((plans.get("transferred_from") or {}).get("views") or {}).get(view, view)


def seg_rows(args: argparse.Namespace, joint: str, plans: Dict, knee_dir: str, encoders: Sequence[str]) -> Dict:
    """Optional Dice rows: the real ``ortho_train TARGET 3d_fullres 0 --task seg`` per encoder row and label
    fraction, ``--seg-iterations`` iterations, validation Dice of fold 0's held-out exams (the trainer's final
    full-volume validation). Each run's folder is moved to ``WORK/seg/<joint>/<row>_<fraction>`` (knee and own rows
    would otherwise share ortho_train's folder name)."""
    from orthonet.training.cli import train_main
    from orthonet.training.options import model_dir, model_folder_name

    pretrained = {"knee": knee_dir, "own": "auto", "scratch": "none"}
    iters = int(args.seg_iterations)
    per_epoch = min(iters, 25)
    epochs = max(1, math.ceil(iters / per_epoch))
    out = {"trainer": args.seg_trainer, "iterations": epochs * per_epoch, "epochs": epochs, "runs": {}}
    for frac in args.seg_fraction_list:
        for enc in [e for e in encoders if e in args.seg_encoder_list]:
            key = f"{'100' if frac >= 1 else 'low'}_{enc}"
            dest = Path(args.work) / "seg" / joint / key
            summary_file = dest / "fold_0" / "validation" / "summary.json"
            t0, trained = time.time(), not summary_file.is_file()
            if trained:
                folder = model_dir(plans["dataset_name"], model_folder_name(args.seg_trainer, plans["plans_name"],
                                                                            CONFIG, frac, pretrained[enc]))
                if folder.exists():
                    shutil.rmtree(folder)
                argv = [plans["dataset_name"], CONFIG, "0", "-tr", args.seg_trainer, "--task", "seg",
                        "--pretrained", pretrained[enc], "--label-fraction", str(frac), "--epochs", str(epochs),
                        "--iterations-per-epoch", str(per_epoch), "--val-iterations", "1", "--device", "cpu",
                        "--num-workers", "0", "--seed", str(args.seed)]
                print(f"[{joint}] seg {key}: ortho_train {' '.join(argv)}", flush=True)
                code = train_main(argv)
                if code not in (0, None):
                    raise SystemExit(f"ortho_train failed with exit code {code}: {argv}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.exists():
                    shutil.rmtree(dest)
                shutil.move(str(folder), str(dest))
            summary = json.loads(summary_file.read_text())
            run = json.loads((dest / "fold_0" / "run_config.json").read_text())
            start = run.get("pretrained_report") or run.get("pretrained") or {}
            if enc != "scratch" and (not isinstance(start, dict) or start.get("start") != "pretrained"
                                     or start.get("scratch_views")):
                raise SystemExit(f"{dest}: the {ENCODER_LABEL[enc]} segmentation run did not start from pretrained "
                                 f"encoders in every view: {start}")
            out["runs"][key] = {"labels": "100 %" if frac >= 1 else f"{frac:.0%}", "encoders": ENCODER_LABEL[enc],
                                "mean_dice": (summary.get("segmentation") or {}).get("mean_dice"),
                                "val_cases": len(summary.get("cases") or []),
                                "labelled": len(run.get("labelled_training_cases") or []),
                                "start": start, "seed": run.get("seed"),
                                "per_case": case_mean_dice(summary, str(summary_file)),
                                # a finished run read from WORK has no time of this run to report
                                "minutes": round((time.time() - t0) / 60, 2) if trained else None}
            print(f"[{joint}] seg {key}: mean Dice {out['runs'][key]['mean_dice']}", flush=True)
    out.update(dice_intervals({k: r["per_case"] for k, r in out["runs"].items()}, args.bootstrap, args.seed))
    return out


# ------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------
def verdict(joints: Dict[str, Dict], fraction: float, gain: float = TARGET_GAIN) -> List[str]:
    """The issue's target per joint and for both: at the low label fraction knee-transfer >= scratch + gain."""
    out, oks = [], []
    for joint, res in joints.items():
        d = (res.get("differences") or {}).get("low_knee_minus_scratch")
        if not d:
            out.append(f"- {joint}: knee-transfer or scratch row missing — not measured.")
            oks.append(False)
            continue
        ok = d["mean"] >= gain
        oks.append(ok)
        rows = res["rows"]
        out.append(f"- Target {joint}, {fraction:.0%} labels, knee-transfer >= scratch + {gain:.2f} macro AUC: "
                   f"{rows['low_knee']['macro_auc']:.3f} vs {rows['low_scratch']['macro_auc']:.3f}, difference "
                   f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] — {'met' if ok else 'not met'}.")
    if len(joints) > 1:
        out.append(f"- Target on both joints: {'met' if oks and all(oks) else 'not met'}.")
    return out


def fmt_ci(value: float, interval: Sequence[float], digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def joint_table(res: Dict) -> List[str]:
    names = res["conditions"]
    lines = ["| labels | encoders | macro AUC [95 % CI] | macro AP [95 % CI] | " + " | ".join(names) + " |",
             "|" + "---|" * (4 + len(names))]
    for tag in ("100", "low"):
        for enc in ENCODERS:
            r = res["rows"].get(f"{tag}_{enc}")
            if not r:
                continue
            per = " | ".join(fmt_ci(a, c, 2) for a, c in zip(r["auc"], r["auc_ci"]))
            lines.append(f"| {r['labels']} | {r['encoders']} | {fmt_ci(r['macro_auc'], r['macro_auc_ci'])} | "
                         f"{fmt_ci(r['macro_ap'], r['macro_ap_ci'])} | {per} |")
    return lines


def seg_text(results: Dict) -> List[str]:
    segs = {j: r["segmentation"] for j, r in results["joints"].items() if r.get("segmentation")}
    if not segs:
        n_runs = sum(2 * len({k.split("_", 1)[1] for k in r["rows"]}) for r in results["joints"].values())
        return ["Dice of the segmentation view: **not measured** in this run. The diagnosis rows above train only a "
                "head on features computed once per exam; a Dice comparison needs one real `ortho_train --task seg` "
                f"run per joint, encoder row and label fraction ({n_runs} runs), each long enough to separate "
                "initialisations: the label-efficiency section needed 1000 iterations on small knees, and there a "
                "3000-step denoiser helped segmentation nowhere and only a 9000-step one with the pyramid head did, "
                f"while the knee encoders here have {results['knee']['pretraining']['steps']} steps. That is beyond "
                "this "
                "CPU budget at the `default` size and would not be informative with these encoders. "
                "`--seg-iterations N` adds the rows (ortho_train --task seg, fold 0, validation Dice)."]
    return dice_table(segs, results.get("bootstrap"))


def dice_table(segs: Dict[str, Dict], n_boot: Optional[int]) -> List[str]:
    """The Dice rows of each joint: mean Dice with its case-bootstrap interval, then the paired differences."""
    out = ["Dice of the segmentation view (`ortho_train --task seg`, fold 0, full-volume validation Dice of its "
           "held-out exams; 95 % intervals from " + (f"{n_boot} " if n_boot else "") + "case-bootstrap resamples, "
           "paired between the rows of one label fraction):", "",
           "| joint | labels | encoders | iterations | mean Dice [95 % CI] | minutes |", "|---|---|---|---|---|---|"]
    for joint, s in segs.items():
        for key, r in s["runs"].items():
            iv = (s.get("rows") or {}).get(key)
            if iv:
                dice = fmt_ci(iv["mean_dice"], iv["ci"])
            else:
                dice = "n/a" if r["mean_dice"] is None else f"{r['mean_dice']:.3f}"
            minutes = "read" if r["minutes"] is None else f"{r['minutes']:.1f}"
            out.append(f"| {joint} | {r['labels']} ({r['labelled']} exams) | {r['encoders']} | {s['iterations']} | "
                       f"{dice} | {minutes} |")
    out.append("")
    for joint, s in segs.items():
        for tag in ("low", "100"):
            parts = [f"{DIFFERENCE_LABEL[k]} {fmt_ci(d['mean'], d['ci'])}" for k in DIFFERENCE_LABEL
                     if (d := (s.get("differences") or {}).get(f"{tag}_{k}"))]
            if parts:
                lab = "100 %" if tag == "100" else next(r["labels"] for k, r in s["runs"].items()
                                                        if k.startswith("low_"))
                out.append(f"Paired mean-Dice differences, {joint}, {lab} labels: " + "; ".join(parts) + ".")
    s = next(iter(segs.values()))
    out += ["", f"Each run: {s['iterations']} iteration(s) of `{s['trainer']}` from `--pretrained <knee Pretrain__ "
                "folder> | auto | none` (ortho_train loads the encoder and, where shapes match, the decoder). One "
                "training run per row: the intervals cover the choice of validation exams, not the run-to-run "
                "spread of training."]
    return out


def markdown(results: Dict, command: str) -> str:
    knee = results["knee"]
    kp = knee["pretraining"]
    pre_line = "; ".join(f"{v} {s['steps']} steps" + (f", {s['patches_per_s']} patches/s" if s.get("patches_per_s")
                                                       else "") for v, s in kp["per_view"].items())
    text = [
        "## Transfer: knee encoders on ankle and shoulder diagnoses (`bench_transfer.py`)",
        "",
        f"{results['date']}, {results['machine']}. Command: `{command}` (total {results['wall_min']:.0f} min).",
        "",
        f"Knee source: {knee['dataset']} ({knee['n_exams']} exams at the `{knee['size']}` size, plan "
        f"`{knee['plan_args']}`), one diffusion denoiser per view, patch {kp['patch']}: {pre_line}. Each target is "
        f"planned with `ortho_plan_and_preprocess -d TARGET --plans-from {knee['dataset']}` (the knee's networks, "
        "the target's spacing, patch clipped to the target's images).",
        "",
        "Targets: synthetic " + " and ".join(f"{j}s ({len(r['conditions'])} conditions)"
                                             for j, r in results["joints"].items())
        + f", {results['n_train']} labelled + "
        f"{results['n_unlabeled']} unlabeled exams each at the `{results['size']}` size. Diagnosis exactly as the "
        f"whole-exam section: the `--task diag` model with frozen encoders, diffusion features at t = "
        f"{results['feature_t']} of levels {results['levels']} over the whole volume of every view, the "
        f"`{results['pooling']}` head trained max({results['head_steps']}, {results.get('head_epochs', 0):g} epochs) "
        f"AdamW steps of {results['head_batch']} exams; "
        f"{results['folds']}-fold stratified CV, every exam predicted once out of fold, 95 % intervals from "
        f"{results['bootstrap']} case-bootstrap resamples (paired between rows). Low-label rows: "
        f"{results['fraction']:.0%} of each training fold's labels, {results['subsets']} random subsets per fold, "
        "averaged.",
        "",
        "Rows: **knee-transfer** = the knee's `encoder.pt` per view, found through the plans' view map and loaded by "
        "ortho_train's loader (every view checked); **own joint** = a denoiser per view pretrained on the target's "
        "own labelled + unlabeled images (no labels read) with the knee's steps and patch; **scratch** = the same "
        "model, encoders at their random initialisation (same seed).",
        "",
    ]
    for joint, res in results["joints"].items():
        vm = ", ".join(f"{v} <- knee {x['source_view']} ({x['why']}; patch {x['knee_patch']} -> {x['target_patch']})"
                       for v, x in res["views"].items())
        own = res.get("own_pretraining") or {}
        own_line = "; ".join(f"{v} {s['steps']} steps, {s['wall_s'] / 60:.1f} min, loss {s['loss_first20']:.3f} -> "
                             f"{s['loss_last20']:.3f}" for v, s in own.items() if isinstance(s, dict) and "wall_s" in s)
        text += [f"### {joint.capitalize()} ({res['dataset']}, {res['n_train']} labelled exams, low-label rows "
                 f"{res['low_label_exams']} exams)", "",
                 f"Views: {vm}. Mean preprocessed shape: {res['shapes']}."
                 + (f" {res['auto_check']}." if res.get("auto_check") else "")
                 + (f" Own-joint pretraining: {own_line}." if own_line else ""), "",
                 *joint_table(res), ""]
        for tag, lab in (("low", f"{results['fraction']:.0%}"), ("100", "100 %")):
            parts = [f"{DIFFERENCE_LABEL[k]} {fmt_ci(d['mean'], d['ci'])}" for k in DIFFERENCE_LABEL
                     if (d := res["differences"].get(f"{tag}_{k}"))]
            if parts:
                text.append(f"Paired macro AUC differences at {lab} labels: " + "; ".join(parts) + ".")
                text.append("")
    text += seg_text(results) + [""] + results.get("verdict", [])
    return "\n".join(text)


def seg_only(args: argparse.Namespace, knee_pre: Path, knee_plans: Dict, t_start: float) -> int:
    """``--seg-only``: the Dice rows of every joint (knee, scratch, and own where WORK has the target's own
    encoders; the rows ``--seg-encoders`` / ``--seg-fractions`` select, a finished one read instead of retrained),
    printed and written to WORK/seg_results.json; the docs section is left alone. Only the knee views the targets'
    segmentation views map to are pretrained: a segmentation run loads no other."""
    from orthonet.fileio import save_json
    from orthonet.training.pretrained import pretrain_dir
    knee_dir = pretrain_dir(knee_plans["dataset_name"], knee_plans["plans_name"], CONFIG)
    targets = {joint: prepare_target(args, joint, knee_plans["dataset_name"])[1] for joint in args.joint_list}
    if "knee" in args.seg_encoder_list:
        needed = sorted({seg_source_view(plans) for plans in targets.values()})
        pretrain_knee_views(args, knee_pre, knee_plans, needed)
    segs = {}
    for joint, plans in targets.items():
        own_dir = pretrain_dir(plans["dataset_name"], plans["plans_name"], CONFIG)
        has_own = all((own_dir / v / "encoder.pt").is_file() for v in plans["views"])
        encoders = [e for e in ENCODERS if e != "own" or (has_own and not args.skip_own_pretrain)]
        segs[joint] = seg_rows(args, joint, plans, str(knee_dir), encoders)
    out = {"date": _dt.date.today().isoformat(), "bootstrap": args.bootstrap, "segmentation": segs,
           "wall_min": (time.time() - t_start) / 60}
    path = Path(args.work) / "seg_results.json"
    save_json(out, path)
    print("\n".join(dice_table(segs, args.bootstrap)), flush=True)
    print(f"[done] {out['wall_min']:.1f} min; {path}", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    import torch
    from benchmarks.report import machine_line, write_section
    from orthonet.diffusion import DEFAULT_T

    torch.set_num_threads(args.threads)
    t_start = time.time()
    # --seg-only pretrains only the knee views the targets' segmentation views need, once their plans exist
    knee_pre, knee_plans, knee_record = prepare_knee(args, views=[] if args.seg_only else None)
    knee_name = knee_plans["dataset_name"]
    set_env(work)                                    # the targets' env, the knee linked in
    if Path(args.knee_work).resolve() != work.resolve():
        for sub in ("preprocessed", "results"):
            link_into(work / sub / knee_name, Path(args.knee_work) / sub / knee_name)
    if args.seg_only:
        return seg_only(args, knee_pre, knee_plans, t_start)
    knee_info = knee_pretraining_summary(knee_plans, knee_record, args.pretrain_patch)
    knee_meta = json.loads((knee_pre / "dataset.json").read_text())
    knee_raw_meta = Path(args.knee_work) / "raw" / knee_name / "synthetic.json"
    knee_size = json.loads(knee_raw_meta.read_text()).get("size") if knee_raw_meta.is_file() else "unknown"
    knee_plan_args = (f"-gpu_memory_target {knee_plans['planner_settings'].get('gpu_memory_target_gb')} "
                      f"--base-features {knee_plans['planner_settings'].get('base_features')}")
    steps = {v: s["steps"] for v, s in knee_info["per_view"].items()}
    print(f"[knee] {knee_name}: views {list(knee_plans['views'])}, encoder steps {steps}, patch {knee_info['patch']}",
          flush=True)
    joints = {}
    for joint in args.joint_list:
        joints[joint] = run_joint(args, joint, knee_plans, knee_info)
        (work / "results.partial.json").write_text(json.dumps(joints, indent=2, default=str))
    results = {"date": _dt.date.today().isoformat(), "machine": machine_line(),
               "knee": {"dataset": knee_name, "work": str(args.knee_work), "size": knee_size,
                        "n_exams": int(knee_meta.get("numTraining", 0)) + int(knee_meta.get("numUnlabeled", 0)),
                        "plan_args": knee_plan_args, "pretraining": knee_info},
               "n_train": args.n_train, "n_unlabeled": args.n_unlabeled, "size": args.size,
               "folds": args.folds, "bootstrap": args.bootstrap, "fraction": args.fraction, "subsets": args.subsets,
               "feature_t": DEFAULT_T, "levels": args.levels, "pooling": args.pooling, "head_steps": args.head_steps, "head_epochs": args.head_epochs,
               "head_batch": args.head_batch, "joints": joints, "wall_min": (time.time() - t_start) / 60}
    results["verdict"] = verdict(joints, args.fraction)
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    command = "python benchmarks/bench_transfer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(results, command.strip())
    print(text, flush=True)
    print(f"[done] {results['wall_min']:.1f} min; {work / 'results.json'}", flush=True)
    if not args.no_write:
        write_section("transfer", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
