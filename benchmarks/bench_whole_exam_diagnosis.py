"""Benchmark: whole-exam multi-label knee diagnosis, 100 % and 10 % labels, pretrained vs no pretraining vs crop.

What it measures (issue 15): does every voxel of every view reaching the decision (attention-MIL over the whole
preprocessed volume of each view, fused across views) diagnose the 8 knee abnormalities, and does diffusion
pretraining pay off with 10 % of the labels?

1. Data: ``orthonet.synthetic`` knees at the ``default`` (realistic) size, ``--n-train`` labelled exams plus
   ``--n-unlabeled`` unlabeled ones, planned and preprocessed by the real ``ortho_plan_and_preprocess`` with the
   CPU plan (``-gpu_memory_target 1 --base-features 16`` by default, ``--plan-args``).
2. Pretraining: one diffusion denoiser per view (:class:`DiffusionPretrainer`, the ``ortho_pretrain`` code) on
   every exam's image (labelled and unlabeled; no label is read). The network is the planned one; the patch may be
   smaller than planned (``--pretrain-patch``, the network is fully convolutional, so ``encoder.pt`` still loads).
3. Models: the real orthonet diagnosis model (:func:`orthonet.training.model_factory.build_model`, ``--task diag``) with
   ``diagnosis_input='whole'`` and diffusion features at ``t`` (``feature_t``), its encoders either loaded from the
   pretraining (``encoder.pt``, exactly as ``ortho_train`` loads them) or left at their random initialisation
   ("no pretraining"). Row "centre crop" is the old ``--diagnosis-input crop`` model (global pooling of the centre
   crop of each view, the planned patch size) on the same pretrained encoders.
4. Frozen-probe training (``DiagTrainerDiffusionFeatures``' mode: encoders frozen, the diagnosis head — per-view
   attention-MIL, auxiliary view heads, fusion — trained with the trainer's loss): each exam's encoder features are
   computed once (fixed noise seed) and the head trains on them; 5-fold CV over the labelled exams, stratified per
   label, with 100 % and ``--fraction`` of each training fold's labels (``--subsets`` random subsets, averaged).
5. Out-of-fold probabilities of every exam give macro and per-diagnosis AUC / AP with case-bootstrap 95 %
   intervals, and a paired bootstrap of the 10 % difference pretrained minus no pretraining.

Usage::

    python benchmarks/bench_whole_exam_diagnosis.py           # full run, writes docs/benchmarks.md
    python benchmarks/bench_whole_exam_diagnosis.py --quick --no-write --work /tmp/q   # smoke run

Results: ``WORK/results.json`` and the ``whole_exam_diagnosis`` section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import ints, synthetic_dataset  # noqa: E402 (after the path setup)

DATASET_ID = 992
DATASET_NAME = f"Dataset{DATASET_ID}_KneeWholeExam"
CONFIG = "3d_fullres"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/orthonet_bench_whole_exam", help="working folder (data, results)")
    p.add_argument("--n-train", type=int, default=120, help="labelled exams")
    p.add_argument("--n-unlabeled", type=int, default=40, help="unlabeled exams (pretraining only)")
    p.add_argument("--size", default="default", help="synthetic size preset")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--plan-args", default="-gpu_memory_target 1 --base-features 16",
                   help="extra ortho_plan_and_preprocess arguments (the CPU plan)")
    p.add_argument("--pretrain-steps", type=int, default=400, help="pretraining steps per view")
    p.add_argument("--pretrain-patch", default="16,64,64",
                   help="pretraining patch (clipped to the planned one); empty: the planned patch")
    p.add_argument("--pretrain-batch", type=int, default=2)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--skip-pretrain", action="store_true", help="reuse existing pretraining output")
    p.add_argument("--levels", default="-2,-1",
                   help="encoder levels the diagnosis reads (--diagnosis-levels; the two deepest keep the CPU head fast)")
    p.add_argument("--coarsen-levels", default="",
                   help="of --levels, those max-pooled onto the next coarser level's grid before the head (e.g. -3: "
                        "fine detail at the head cost of level -2; --diagnosis-coarsen-levels of ortho_train)")
    p.add_argument("--feature-t", type=int, default=None,
                   help="diffusion-feature timestep of the encoders' input (default: the denoiser's, 100)")
    p.add_argument("--variants", default="pretrained/whole,random/whole,pretrained/crop",
                   help="encoders/input rows to run, comma separated")
    p.add_argument("--pooling", default="mil",
                   help="pooling of the whole-exam head, comma separated (the trainer's default: mil)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--fraction", type=float, default=0.1, help="label fraction of the low-label rows")
    p.add_argument("--subsets", type=int, default=2, help="random label subsets per fold at --fraction")
    p.add_argument("--head-steps", type=int, default=200, help="least optimizer steps of the diagnosis head")
    p.add_argument("--head-epochs", type=float, default=40,
                   help="at least this many passes over the training exams (steps = max(--head-steps, epochs x "
                        "exams / batch)): a fixed step count underfits the 100 %% rows while the 10 %% rows run "
                        "ten times as many epochs (measured: 40 epochs lift the 100 %% row from 0.547 to 0.650)")
    p.add_argument("--feature-cache", default="",
                   help="folder for the frozen features (one file per encoder variant, reused when present; "
                        "default: WORK/features)")
    p.add_argument("--head-batch", type=int, default=8, help="exams per head step")
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (small size, few exams and steps)")
    p.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_unlabeled, args.size = 16, 2, "tiny"
        args.pretrain_steps, args.head_steps, args.folds, args.subsets, args.bootstrap = 4, 10, 2, 1, 50
        args.head_epochs = 0
        args.fraction = 0.5
    return args


# ------------------------------------------------------------------------------------------------------------
# data, plans, pretraining
# ------------------------------------------------------------------------------------------------------------
def prepare_data(args: argparse.Namespace) -> Path:
    """Generate + plan + preprocess once (reused when present); returns the preprocessed dataset folder."""
    return synthetic_dataset(DATASET_ID, DATASET_NAME, "knee", args.n_train, args.n_unlabeled, args.seed, args.size,
                             CONFIG, shlex.split(args.plan_args))


def pretrain(args: argparse.Namespace, pre: Path, plans: Dict) -> Dict[str, Dict]:
    """One denoiser per view (``ortho_pretrain --patch-size``), written where ``--pretrained auto`` finds it;
    patches/s per view."""
    from orthonet.training.pretrained import pretrain_view_dir
    from orthonet.training.trainers.pretrainer import DiffusionPretrainer, PretrainSettings, loss_drop

    record = Path(args.work) / "pretraining.json"          # kept so a --skip-pretrain rerun reports them too
    out = json.loads(record.read_text()) if record.is_file() else {}
    for view in plans["views"]:
        folder = pretrain_view_dir(plans["dataset_name"], plans["plans_name"], CONFIG, view)
        if args.skip_pretrain and (folder / "encoder.pt").is_file():
            continue
        planned = plans["views"][view]["configurations"][CONFIG]["patch_size"]
        patch = [min(a, b) for a, b in zip(ints(args.pretrain_patch), planned)] if args.pretrain_patch else None
        settings = PretrainSettings(steps=args.pretrain_steps, lr=args.pretrain_lr, batch_size=args.pretrain_batch,
                                    save_every=max(50, args.pretrain_steps // 2), num_workers=0,
                                    log_every=max(10, args.pretrain_steps // 10), progress=False,
                                    warmup_steps=max(1, args.pretrain_steps // 20), patch_size=patch)
        for stale in (Path(args.feature_cache or Path(args.work) / "features")).glob("pretrained_*.pt"):
            stale.unlink()                           # features of the encoders this pretraining replaces
        trainer = DiffusionPretrainer(plans, CONFIG, view, pre, folder, settings)
        t0 = time.time()
        trainer.run()
        first, last = loss_drop(trainer.loss_history, 20)
        out[view] = {"steps": args.pretrain_steps, "patch": patch, "wall_s": round(time.time() - t0, 1),
                     "patches_per_s": round(trainer.throughput, 3), "loss_first20": round(first, 4),
                     "loss_last20": round(last, 4)}
        print(f"[pretrain] {view}: {out[view]}", flush=True)
        record.write_text(json.dumps(out, indent=2))
    return out


# ------------------------------------------------------------------------------------------------------------
# models and cached features
# ------------------------------------------------------------------------------------------------------------
def build_diag_model(plans: Dict, pre: Path, diagnosis_input: str, pretrained: bool, levels: Sequence[int],
                     pooling: Sequence[str] = ("mil",), seed: int = 0, coarsen_levels: Sequence[int] = (),
                     feature_t: Optional[int] = None):
    """The ``ortho_train --task diag`` model, encoders pretrained (from ``encoder.pt``) or at random init."""
    import torch
    from orthonet.diffusion import DEFAULT_T
    from orthonet.networks.multitask import load_pretrained_encoder
    from orthonet.training.model_factory import ModelConfig, build_model
    from orthonet.training.pretrained import find_pretrained, load_encoder_file

    views = list(plans["views"])
    meta = json.loads((pre / "dataset.json").read_text()) if (pre / "dataset.json").is_file() else {}
    n_diag = len(meta.get("diagnoses") or load_diagnoses()[1])
    cfg = ModelConfig(task="diag", configuration=CONFIG, views=views, segmentation_view=None,
                      channels_by_view={v: 1 for v in views}, n_diagnoses=n_diag, diagnosis_input=diagnosis_input,
                      levels=list(levels),
                      # the whole-exam head pools as ortho_train's (attention-MIL); the crop model keeps its pooling
                      head_kwargs={"pooling": list(pooling)} if diagnosis_input == "whole" else {},
                      feature_t={v: DEFAULT_T if feature_t is None else feature_t for v in views}
                      if diagnosis_input == "whole" else {},
                      coarsen_levels=list(coarsen_levels) if diagnosis_input == "whole" else [])
    torch.manual_seed(seed)
    model = build_model(plans, cfg)
    if pretrained:
        source = find_pretrained("auto", plans, CONFIG, views)
        if source is None or sorted(source.files) != sorted(views):
            raise SystemExit("pretrained encoders missing for some view (run without --skip-pretrain)")
        for view, path in source.files.items():
            report = load_pretrained_encoder(model, load_encoder_file(path)["encoder_state_dict"], view=view)
            if report.missing or report.shape_mismatch:
                raise SystemExit(f"encoder of {view} does not fit: {report.summary()}")
    return model.eval()


def load_diagnoses() -> Tuple[Dict[str, np.ndarray], List[str]]:
    from orthonet.dataset import load_dataset
    spec = load_dataset(Path(os.environ["ORTHO_raw"]) / DATASET_NAME)
    return spec.read_diagnoses("Tr"), list(spec.diagnoses)


def cache_features(model, plans: Dict, pre: Path, cases: Sequence[str], diagnosis_input: str,
                   t: Optional[int] = None) -> List[Dict[str, Tuple[List, List]]]:
    """Per exam {view: (level maps, level masks)} of the frozen encoders (fixed noise seed per exam).

    Whole: every voxel of the stride-padded volume (``model.whole_features``, tiled where large). Crop: the
    deterministic centre crop at the planned patch size (the old model's validation input), noised at the same t.
    """
    import torch
    from orthonet.inference.predict_core import center_crop
    from orthonet.diffusion import DEFAULT_T
    from orthonet.networks.whole_exam import diffusion_noise
    from orthonet.planners.plans import data_folder
    from orthonet.training.data import PreprocessedCaseStore

    views = list(plans["views"])
    stores = {v: PreprocessedCaseStore(data_folder(pre, plans, v, CONFIG), [v]) for v in views}
    out = []
    with torch.no_grad():
        for i, case in enumerate(cases):
            per_view = {}
            for v in views:
                x = torch.from_numpy(np.asarray(stores[v].open(case, v, with_seg=False).data[:], np.float32))
                gen = torch.Generator().manual_seed(10_000 + i)
                if diagnosis_input == "whole":
                    feats, masks = model.whole_features({v: x[None]}, generator=gen)
                    per_view[v] = ([f.half() for f in feats[v]], masks[v])
                else:
                    patch = plans["views"][v]["configurations"][CONFIG]["patch_size"]
                    crop = diffusion_noise(center_crop(x, patch)[None], DEFAULT_T if t is None else t, None, gen)
                    skips = model.encode({v: crop})[v]
                    per_view[v] = ([skips[k].half() for k in model.levels[v]], None)
            out.append(per_view)
    return out


def cached_features(args: argparse.Namespace, model, plans: Dict, pre: Path, cases: Sequence[str], encoders: str,
                    diagnosis_input: str) -> List[Dict[str, Tuple[List, List]]]:
    """:func:`cache_features`, kept on disk per encoder variant so reruns of the head (other steps, subsets) skip
    the encoder pass; the file is keyed by everything that changes the features and written atomically."""
    import torch
    folder = Path(args.feature_cache or Path(args.work) / "features")
    folder.mkdir(parents=True, exist_ok=True)
    coarse = (f"_coarsen{args.coarsen_levels.replace(',', '_')}" if args.coarsen_levels and diagnosis_input == "whole"
              else "")
    levels = args.levels.replace(",", "_")
    key = f"{encoders}_{diagnosis_input}_levels{levels}{coarse}_t{feature_t(args)}_n{len(cases)}.pt"
    path = folder / key
    if path.is_file():
        blob = torch.load(path, weights_only=True)
        if blob["cases"] == list(cases):
            print(f"[features] {encoders}/{diagnosis_input}: reused {path}", flush=True)
            return blob["features"]
    feats = cache_features(model, plans, pre, cases, diagnosis_input, feature_t(args))
    tmp = path.with_suffix(".tmp")
    torch.save({"cases": list(cases), "features": feats}, tmp)
    os.replace(tmp, path)
    return feats


# ------------------------------------------------------------------------------------------------------------
# head training on cached features
# ------------------------------------------------------------------------------------------------------------
def train_head(model, feats: List[Dict], labels: np.ndarray, train_idx: np.ndarray, args: argparse.Namespace,
               seed: int):
    """A fresh diagnosis head trained on frozen features with the DiagTrainer loss; returns it in eval mode."""
    import torch
    from orthonet.training.losses import MaskedBCEWithLogitsLoss, compute_pos_weight

    torch.manual_seed(seed)
    head = copy.deepcopy(model.diagnosis)
    for m in head.modules():                       # a fresh initialisation per run
        if hasattr(m, "reset_parameters") and m is not head:
            m.reset_parameters()
    head.train()
    bce = MaskedBCEWithLogitsLoss(compute_pos_weight(labels[train_idx]))
    opt = torch.optim.AdamW(head.parameters(), lr=args.head_lr, weight_decay=1e-2)
    steps = head_steps(args, len(train_idx))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - s / steps) ** 0.9)
    rng = np.random.default_rng(seed)
    y = torch.from_numpy(labels.astype(np.float32))
    for _ in range(head_steps(args, len(train_idx))):
        batch = rng.choice(train_idx, size=min(args.head_batch, len(train_idx)), replace=False)
        out = head_forward(head, [feats[i] for i in batch])
        target = y[batch]
        aux = torch.stack([bce(vl, target) for vl in out["view_logits"].values()]).mean()
        loss = bce(out["logits"], target) + 0.5 * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 5.0)
        opt.step()
        sched.step()
    return head.eval()


def head_steps(args: argparse.Namespace, n_exams: int) -> int:
    """Optimizer steps for ``n_exams`` training exams: ``--head-steps``, or ``--head-epochs`` passes if more."""
    return max(int(args.head_steps), int(np.ceil(args.head_epochs * n_exams / max(1, args.head_batch))))


def head_forward(head, exams: Sequence[Dict[str, Tuple[List, List]]]):
    """The head on a batch of exams: each level's maps zero-padded to the batch's largest, masks False there (the
    attention pooling ignores masked positions, as in whole-exam training's batch padding)."""
    import torch
    feats, masks = {}, {}
    for v in exams[0]:
        levels = len(exams[0][v][0])
        feats[v], masks[v] = [], []
        for k in range(levels):
            maps = [e[v][0][k] for e in exams]
            size = [max(m.shape[2 + a] for m in maps) for a in range(maps[0].ndim - 2)]
            feats[v].append(torch.cat([pad_end(m.float(), size) for m in maps]))
            if exams[0][v][1] is not None:
                masks[v].append(torch.cat([pad_end(e[v][1][k].to(torch.uint8), size) for e in exams]).bool())
    masks = {v: mk for v, mk in masks.items() if mk}
    return head(feats, None, masks or None)


def pad_end(t, size: Sequence[int]):
    """Zero-pad the trailing ``len(size)`` axes of ``t`` at their far end up to ``size``."""
    import torch.nn.functional as F
    widths = [w for a in reversed(range(len(size))) for w in (0, int(size[a]) - t.shape[t.ndim - len(size) + a])]
    return F.pad(t, widths)


def predict_head(head, feats: List[Dict], idx: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return np.concatenate([torch.sigmoid(head_forward(head, [feats[i] for i in idx[j:j + 16]])["logits"]).numpy()
                               for j in range(0, len(idx), 16)])


def label_subset(train_idx: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A random ``fraction`` of the training fold (at least 2 exams): the labels a lab would have annotated."""
    n = max(2, int(round(fraction * len(train_idx))))
    return np.sort(rng.choice(train_idx, size=n, replace=False))


def cross_validate(model, feats: List[Dict], labels: np.ndarray, folds: List[np.ndarray], fraction: float,
                   subsets: int, args: argparse.Namespace) -> List[np.ndarray]:
    """Out-of-fold probabilities (n, D), one array per label subset (1 at 100 % labels)."""
    runs = 1 if fraction >= 1 else subsets
    preds = [np.full(labels.shape, np.nan) for _ in range(runs)]
    for k, val in enumerate(folds):
        train = np.setdiff1d(np.arange(len(labels)), val)
        for r in range(runs):
            rng = np.random.default_rng(1000 * k + r)
            sub = train if fraction >= 1 else label_subset(train, fraction, rng)
            head = train_head(model, feats, labels, sub, args, seed=100 * k + r)
            preds[r][val] = predict_head(head, feats, val)
    return preds


# ------------------------------------------------------------------------------------------------------------
# metrics with intervals
# ------------------------------------------------------------------------------------------------------------
def scores(probs: np.ndarray, labels: np.ndarray) -> Dict[str, np.ndarray]:
    from orthonet.metrics import average_precision, roc_auc
    auc = np.array([roc_auc(labels[:, d], probs[:, d]) for d in range(labels.shape[1])])
    ap = np.array([average_precision(labels[:, d], probs[:, d]) for d in range(labels.shape[1])])
    return {"auc": auc, "ap": ap}


def summarise(preds: List[np.ndarray], labels: np.ndarray, n_boot: int, seed: int = 0) -> Dict:
    """Point values averaged over label subsets; 95 % intervals from one shared case bootstrap."""
    rng = np.random.default_rng(seed)
    point = [scores(p, labels) for p in preds]
    auc = np.mean([s["auc"] for s in point], 0)
    ap = np.mean([s["ap"] for s in point], 0)
    boots = boot_indices(len(labels), n_boot, rng)
    macro_auc_b, macro_ap_b, per_auc_b = [], [], []
    for b in boots:
        s = [scores(p[b], labels[b]) for p in preds]
        per = np.mean([x["auc"] for x in s], 0)
        per_auc_b.append(per)
        macro_auc_b.append(np.nanmean(per))
        macro_ap_b.append(np.nanmean(np.mean([x["ap"] for x in s], 0)))
    per_lo, per_hi = np.nanpercentile(np.array(per_auc_b), [2.5, 97.5], axis=0)
    return {"macro_auc": float(np.nanmean(auc)), "macro_auc_ci": ci(macro_auc_b),
            "macro_ap": float(np.nanmean(ap)), "macro_ap_ci": ci(macro_ap_b),
            "auc": auc.tolist(), "auc_ci": np.stack([per_lo, per_hi], 1).tolist(), "ap": ap.tolist(),
            "_macro_auc_boot": macro_auc_b}


def boot_indices(n: int, n_boot: int, rng: np.random.Generator) -> List[np.ndarray]:
    return [rng.integers(0, n, size=n) for _ in range(n_boot)]


def ci(values: Sequence[float]) -> List[float]:
    lo, hi = np.nanpercentile(np.asarray(values, float), [2.5, 97.5])
    return [float(lo), float(hi)]


def stratified_folds(labels: np.ndarray, k: int, seed: int = 0) -> List[np.ndarray]:
    """k folds that spread the exams of every diagnosis evenly: exams sorted by their rarest positive label, then
    dealt round-robin in random order within each group."""
    rng = np.random.default_rng(seed)
    prevalence = np.nanmean(labels, 0)
    key = np.array([np.argmin(np.where(row > 0.5, prevalence, np.inf)) if (row > 0.5).any() else -1
                    for row in labels])
    order = np.concatenate([rng.permutation(np.where(key == g)[0]) for g in np.unique(key)])
    folds = [order[i::k] for i in range(k)]
    return [np.sort(f) for f in folds]


# ------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------
def fmt_ci(value: float, interval: Sequence[float]) -> str:
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def markdown(results: Dict, names: Sequence[str], command: str) -> str:
    rows = results["rows"]
    head = ("| labels | encoders | diagnosis input | macro AUC [95 % CI] | macro AP [95 % CI] | "
            + " | ".join(names) + " |")
    lines = [head, "|" + "---|" * (5 + len(names))]
    for key, r in rows.items():
        per = " | ".join(f"{a:.2f}" for a in r["auc"])
        lines.append(f"| {r['labels']} | {r['encoders']} | {r['input']} | {fmt_ci(r['macro_auc'], r['macro_auc_ci'])}"
                     f" | {fmt_ci(r['macro_ap'], r['macro_ap_ci'])} | {per} |")
    d = results.get("paired_difference_low_labels")
    pre = results["pretraining"]
    text = [
        "## Whole-exam diagnosis: 8 knee abnormalities, 100 % and 10 % labels (`bench_whole_exam_diagnosis.py`)",
        "",
        f"{results['date']}, {results['machine']}. Command: `{command}` (total {results['wall_min']:.0f} min).",
        "",
        f"Data: {results['n_train']} labelled + {results['n_unlabeled']} unlabeled synthetic knees at the "
        f"`{results['size']}` size (three views, mean preprocessed shape per view: {results['shapes']}), plan "
        f"`{results['plan_args']}`. {results['folds']}-fold stratified CV over the labelled exams; every exam is "
        f"predicted once out of fold; 95 % intervals from {results['bootstrap']} case-bootstrap resamples. The low-label "
        f"rows keep {results['fraction']:.0%} of each training fold's labels ({results['low_label_exams']} exams), "
        f"{results['subsets']} random subsets per fold, averaged.",
        "",
        f"Pretraining: one denoiser per view, {pre.get('steps')} steps, patch {pre.get('patch')}, batch "
        f"{pre.get('batch')}, on all {results['n_train'] + results['n_unlabeled']} images (no labels); "
        f"{pre.get('summary')}.",
        "",
        "Diagnosis: the `--task diag` model with encoders frozen (frozen-probe mode, `DiagTrainerDiffusionFeatures`), "
        f"diffusion features at t = {results['feature_t']} of encoder levels {results['levels']}"
        f"{coarsened(results)}; the head (per view and "
        f"diagnosis (`{results['pooling']}` pooling), auxiliary view heads, concat fusion) trained "
        f"max({results['head_steps']}, {results.get('head_epochs', 0):g} epochs) AdamW steps of "
        f"{results['head_batch']} exams with the trainer's loss. 'no pretraining' = the same model with its encoders "
        "at their random initialisation; 'centre crop' = the old `--diagnosis-input crop` model (global pooling of "
        "the planned-patch centre crop of each view).",
        "",
        *lines,
        "",
    ]
    if d:
        text.append(f"Paired difference at {results['fraction']:.0%} labels, whole exam, pretrained minus no "
                    f"pretraining: macro AUC {fmt_ci(d['mean'], d['ci'])}.")
        text.append("")
    text += results.get("verdict", [])
    return "\n".join(text)


def verdict(rows: Dict, diff: Optional[Dict]) -> List[str]:
    """The issue's targets, each marked met / not met."""
    out = []
    full = rows.get("100_pretrained_whole")
    low = rows.get("low_pretrained_whole")
    if full:
        worst = min(full["auc"])
        ok = full["macro_auc"] >= 0.90 and worst >= 0.75
        out.append(f"- Target 100 % labels macro AUC >= 0.90, each >= 0.75: {full['macro_auc']:.3f}, lowest "
                   f"{worst:.3f} — {'met' if ok else 'not met'}.")
    if low and diff:
        ok = low["macro_auc"] >= 0.80 and diff["mean"] >= 0.05
        out.append(f"- Target low labels pretrained >= 0.80 and >= no pretraining + 0.05: {low['macro_auc']:.3f}, "
                   f"difference {diff['mean']:+.3f} — {'met' if ok else 'not met'}.")
    return out


# ------------------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    for key, sub in (("ORTHO_raw", "raw"), ("ORTHO_preprocessed", "preprocessed"), ("ORTHO_results", "results")):
        os.environ[key] = str(work / sub)
        (work / sub).mkdir(parents=True, exist_ok=True)
    import torch
    from benchmarks.report import machine_line, write_section
    from orthonet.planners.plans import load_plans

    torch.set_num_threads(args.threads)
    t_start = time.time()
    pre = prepare_data(args)
    plans = load_plans(pre)
    pre_stats = pretrain(args, pre, plans)
    diagnoses, names = load_diagnoses()
    cases = sorted(diagnoses)
    labels = np.stack([diagnoses[c] for c in cases]).astype(np.float64)
    folds = stratified_folds(labels, args.folds, seed=args.seed)
    low_n = int(np.mean([max(2, round(args.fraction * (len(cases) - len(f)))) for f in folds]))

    variants = [tuple(v.split("/")) for v in args.variants.split(",") if v]
    rows, boots = {}, {}
    shapes = None
    for enc, inp in variants:
        model = build_diag_model(plans, pre, inp, enc == "pretrained", ints(args.levels), args.pooling.split(","),
                                 coarsen_levels=ints(args.coarsen_levels) if args.coarsen_levels else (),
                                 feature_t=feature_t(args))
        t0 = time.time()
        feats = cached_features(args, model, plans, pre, cases, enc, inp)
        print(f"[features] {enc}/{inp}: {len(cases)} exams in {time.time() - t0:.0f} s", flush=True)
        if inp == "whole" and shapes is None:
            shapes = {v: [int(round(np.mean([e[v][1][0].shape[a + 1] * s for e in feats]))) for a, s in
                          enumerate(stride_of(model, v, 0))] for v in plans["views"]}
        for frac, tag in ((1.0, "100"), (args.fraction, "low")):
            if inp == "crop" and tag == "low":
                continue
            t0 = time.time()
            preds = cross_validate(model, feats, labels, folds, frac, args.subsets, args)
            s = summarise(preds, labels, args.bootstrap)
            boots[f"{tag}_{enc}_{inp}"] = s.pop("_macro_auc_boot")
            rows[f"{tag}_{enc}_{inp}"] = {"labels": "100 %" if frac >= 1 else f"{frac:.0%}",
                                          "encoders": "diffusion-pretrained" if enc == "pretrained"
                                          else "no pretraining", "input": "whole exam" if inp == "whole"
                                          else "centre crop", **s}
            print(f"[cv] {tag} {enc}/{inp}: macro AUC {s['macro_auc']:.3f} {s['macro_auc_ci']} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        del feats
    diff = None
    if "low_pretrained_whole" in boots and "low_random_whole" in boots:
        d = np.asarray(boots["low_pretrained_whole"]) - np.asarray(boots["low_random_whole"])
        diff = {"mean": float(rows["low_pretrained_whole"]["macro_auc"] - rows["low_random_whole"]["macro_auc"]),
                "ci": ci(d)}
    pre_summary = "; ".join(f"{v} {s['patches_per_s']} patches/s, {s['wall_s'] / 60:.1f} min, loss "
                            f"{s['loss_first20']:.3f} -> {s['loss_last20']:.3f}" for v, s in pre_stats.items()) \
        or "reused from an earlier run"
    results = {"date": _dt.date.today().isoformat(), "machine": machine_line(), "n_train": len(cases),
               "n_unlabeled": args.n_unlabeled, "size": args.size, "plan_args": args.plan_args,
               "folds": args.folds, "bootstrap": args.bootstrap, "fraction": args.fraction,
               "subsets": args.subsets, "low_label_exams": low_n, "feature_t": feature_t(args),
               "head_steps": args.head_steps, "head_epochs": args.head_epochs, "levels": args.levels,
               "coarsen_levels": args.coarsen_levels, "pooling": args.pooling, "head_batch": args.head_batch,
               "shapes": shapes,
               "pretraining": {"steps": args.pretrain_steps, "patch": args.pretrain_patch or "planned",
                               "batch": args.pretrain_batch, "per_view": pre_stats, "summary": pre_summary},
               "diagnoses": names, "rows": rows, "paired_difference_low_labels": diff,
               "wall_min": (time.time() - t_start) / 60}
    results["verdict"] = verdict(rows, diff)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    command = "python benchmarks/bench_whole_exam_diagnosis.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(results, names, command.strip())
    print(text)
    if not args.no_write:
        write_section("whole_exam_diagnosis", text)
    return 0


def feature_t(args: argparse.Namespace) -> int:
    """The diffusion-feature timestep of this run (``--feature-t``, else the denoiser's default)."""
    from orthonet.diffusion import DEFAULT_T
    return DEFAULT_T if args.feature_t is None else int(args.feature_t)


def coarsened(results: Dict) -> str:
    """The markdown clause for ``--coarsen-levels`` (empty without)."""
    c = results.get("coarsen_levels")
    return f" (level(s) {c} max-pooled onto the next coarser level's grid)" if c else ""


def stride_of(model, view: str, level_index: int) -> List[int]:
    """Stride of a selected level's map as the head sees it (the next level's where it is coarsened)."""
    from orthonet.networks.build import cumulative_strides
    strides = cumulative_strides(model.specs_by_view[view])
    level = model.levels[view][level_index]
    return list(strides[level + 1] if level in model.coarsened.get(view, []) else strides[level])

if __name__ == "__main__":
    raise SystemExit(main())
