"""Benchmark: are diffusion-pretrained encoder features better than random ones? (linear probes)

1. A synthetic knee dataset (``orthonet.synthetic`` ``small`` preset; default 120 training + 40 unlabeled cases)
   goes through the real ``ortho_plan_and_preprocess``.
2. For the CPU budget the benchmark copies the plans to ``probePlans`` with a narrower network and a smaller patch
   (``--features``, ``--patch``: the edit a user can make to plans.json) and pretrains one denoiser per view
   (``--views``, default sagittal) with :class:`orthonet.training.trainers.pretrainer.DiffusionPretrainer`
   (epsilon, cosine T=1000, AdamW, EMA) for ``--steps``; patches/s are recorded.
3. Frozen features of every *training* case (the whole preprocessed volume, noised at ``--t`` with a fixed seed,
   :func:`orthonet.diffusion.extract_features`, encoder levels ``--levels``, several global poolings) from
   (a) the pretrained EMA denoiser and (b) the same network at its random initialisation (exactly the weights
   pretraining started from); as a reference without any network, (c) the raw intensities pooled on a 4x4x4 grid.
4. Multi-label probe: L2-regularised logistic regression (written here in torch), one label at a time, features
   standardised on the training folds, L2 strength picked by inner CV, repeated stratified 5-fold CV over the
   training cases; macro AUC over the diagnoses.
5. Dense anatomy probe: voxel-wise multinomial logistic regression from the upsampled features of every encoder level
   to the segmentation labels (20 training cases, 10 test cases, 3000 voxels each); mean foreground Dice.

Usage::

    python benchmarks/bench_pretrain_probe.py                  # full run (~15 min on 2 quiet cores)
    python benchmarks/bench_pretrain_probe.py --skip-pretrain  # re-probe existing checkpoints (other t / pooling)

Results go to ``WORK/results.json`` (with a markdown table); docs/benchmarks.md is written by hand from them.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import ints, synthetic_dataset  # noqa: E402 (after the path setup)

DATASET_ID = 991
DATASET_NAME = f"Dataset{DATASET_ID}_KneeProbe"
PLANS = "probePlans"
CONFIG = "3d_fullres"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/orthonet_bench_pretrain_probe", help="working folder (data, results)")
    p.add_argument("--n-train", type=int, default=120)
    p.add_argument("--n-unlabeled", type=int, default=40)
    p.add_argument("--size", default="small")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--views", nargs="+", default=["sagittal"])
    p.add_argument("--steps", type=int, default=3000,
                   help="pretraining steps per view (600 did not separate the probes)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--features", default="8,16,32,64,128", help="features per stage of the benchmark plans")
    p.add_argument("--patch", default="16,64,64", help="patch size of the benchmark plans")
    p.add_argument("--t", default="100", help="feature timestep(s), comma separated (concatenated)")
    p.add_argument("--levels", default="-3,-2,-1", help="encoder levels, comma separated")
    p.add_argument("--decoder-levels", default="", help="decoder stages to add (e.g. '-2,-1'; empty: none)")
    p.add_argument("--poolings", default="mean;max;grid2",
                   help="pooling variants to probe, ';'-separated; each '+'-joins mean, max, std, gridN")
    p.add_argument("--no-dense", action="store_true", help="skip the voxel-wise anatomy probe")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-pretrain", action="store_true", help="reuse existing pretraining checkpoints")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading workers during pretraining")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------
# data and plans
# ------------------------------------------------------------------------------------------------------------
def prepare_data(args: argparse.Namespace) -> Path:
    """Generate + plan + preprocess once (reused when present); write the benchmark plans copy."""
    from orthonet.planners.plans import load_plans, save_plans

    pre = synthetic_dataset(DATASET_ID, DATASET_NAME, "knee", args.n_train, args.n_unlabeled, args.seed, args.size,
                            CONFIG)
    plans = load_plans(pre)
    probe = copy.deepcopy(plans)
    probe["plans_name"] = PLANS
    for vp in probe["views"].values():
        cfg = vp["configurations"][CONFIG]
        kw = cfg["network"]["kwargs"]
        feats = ints(args.features)
        if len(feats) != kw["n_stages"]:
            raise SystemExit(f"--features needs {kw['n_stages']} numbers (the plan has {kw['n_stages']} stages)")
        kw["features_per_stage"] = feats
        cfg["patch_size"] = ints(args.patch)
        cfg["batch_size"] = args.batch_size
    save_plans(probe, pre)
    return pre


def pretrain(args: argparse.Namespace, pre: Path) -> Dict[str, Dict]:
    from orthonet.planners.plans import load_plans
    from orthonet.training.pretrained import pretrain_view_dir
    from orthonet.training.trainers.pretrainer import DiffusionPretrainer, PretrainSettings, loss_drop

    plans = load_plans(pre, PLANS)
    out = {}
    for view in args.views:
        folder = pretrain_view_dir(DATASET_NAME, PLANS, CONFIG, view)
        settings = PretrainSettings(steps=args.steps, lr=args.lr, save_every=max(50, args.steps // 4),
                                    log_every=max(10, args.steps // 10), num_workers=args.num_workers,
                                    progress=False, warmup_steps=max(1, args.steps // 20))
        trainer = DiffusionPretrainer(plans, CONFIG, view, pre, folder, settings)
        t0 = time.time()
        trainer.run()
        first, last = loss_drop(trainer.loss_history, 20)
        out[view] = {"wall_s": round(time.time() - t0, 1), "patches_per_s": round(trainer.throughput, 3),
                     "loss_first20": round(first, 4), "loss_last20": round(last, 4)}
        print(f"[pretrain] {view}: {out[view]}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------------------------
def pool(feature, mode: str):
    """Global pooling of one (C, *spatial) map: mean, max, std, or gridN (average over an N^3 grid of regions)."""
    import torch.nn.functional as F
    if mode.startswith("grid"):
        n = int(mode[4:])
        pool_fn = F.adaptive_avg_pool3d if feature.ndim == 4 else F.adaptive_avg_pool2d
        return pool_fn(feature[None], n)[0].flatten()
    flat = feature.flatten(1)
    return {"mean": flat.mean(1), "max": flat.amax(1), "std": flat.std(1)}[mode]


def pooled(feats, pooling: str) -> np.ndarray:
    """Concatenate ``pooling`` ('mean', 'mean+max', 'grid2' ...) of every level."""
    import torch
    return torch.cat([pool(f, m) for f in feats for m in pooling.split("+")]).numpy().astype(np.float64)


def load_models(args: argparse.Namespace) -> Dict[str, Dict[str, object]]:
    """{'pretrained': {view: EMA denoiser}, 'random': {view: the same network at pretraining's initialisation}}."""
    from orthonet.networks import DiffusionUNet
    from orthonet.training.pretrained import pretrain_view_dir
    from orthonet.training.runtime import seed_everything
    from orthonet.training.trainers.pretrainer import PretrainSettings, load_denoiser_checkpoint

    out: Dict[str, Dict[str, object]] = {"pretrained": {}, "random": {}}
    for view in args.views:
        bundle = load_denoiser_checkpoint(pretrain_view_dir(DATASET_NAME, PLANS, CONFIG, view) / "checkpoint_final.pt")
        out["pretrained"][view] = bundle.model.eval()
        seed_everything(PretrainSettings().seed)  # DiffusionPretrainer.setup seeds exactly so before building
        out["random"][view] = DiffusionUNet(bundle.model.spec, bundle.model.input_channels).eval()
    return out


def feature_tables(args: argparse.Namespace, pre: Path, models) -> Tuple[Dict[str, Dict[str, np.ndarray]],
                                                                         np.ndarray, List[str]]:
    """{model: {pooling: (n, d)}} for every training case (views concatenated), plus the raw-intensity reference
    ({'raw': {'gridmax4': ...}}), labels (n, D) and the diagnosis names."""
    import torch
    import torch.nn.functional as F
    from orthonet.dataset import load_dataset
    from orthonet.diffusion import extract_features
    from orthonet.planners.plans import data_folder, load_plans
    from orthonet.training.data import PreprocessedCaseStore

    plans = load_plans(pre, PLANS)
    spec_raw = load_dataset(Path(os.environ["ORTHO_raw"]) / DATASET_NAME)
    diagnoses = spec_raw.read_diagnoses("Tr")
    cases = sorted(diagnoses)
    labels = np.stack([diagnoses[c] for c in cases]).astype(np.float64)
    stores = {v: PreprocessedCaseStore(data_folder(pre, plans, v, CONFIG), [v]) for v in args.views}
    t, levels, poolings = ints(args.t), ints(args.levels), args.poolings.split(";")
    rows: Dict[str, Dict[str, List[np.ndarray]]] = {m: {p: [] for p in poolings} for m in models}
    rows["raw"] = {"gridmax4": [], "grid4": []}
    t0 = time.time()
    with torch.no_grad():
        for case in cases:
            parts: Dict[str, Dict[str, List[np.ndarray]]] = {m: {p: [] for p in poolings} for m in models}
            raw_max, raw_mean = [], []
            for v in args.views:
                x = torch.from_numpy(np.asarray(stores[v].open(case, v, with_seg=False).data[:], np.float32))
                raw_max.append(F.adaptive_max_pool3d(x[None], 4).flatten().numpy())
                raw_mean.append(F.adaptive_avg_pool3d(x[None], 4).flatten().numpy())
                for name, by_view in models.items():
                    dec = ints(args.decoder_levels) if args.decoder_levels else None
                    feats = extract_features(by_view[v], x, t=t, levels=levels, seed=0,
                                             include_decoder=dec is not None, decoder_levels=dec)
                    for p in poolings:
                        parts[name][p].append(pooled(feats, p))
            for name in models:
                for p in poolings:
                    rows[name][p].append(np.concatenate(parts[name][p]))
            rows["raw"]["gridmax4"].append(np.concatenate(raw_max).astype(np.float64))
            rows["raw"]["grid4"].append(np.concatenate(raw_mean).astype(np.float64))
    print(f"[features] {len(cases)} cases x {len(args.views)} view(s) x {len(models)} models in "
          f"{time.time() - t0:.1f} s", flush=True)
    tables = {m: {p: np.stack(v) for p, v in by_p.items()} for m, by_p in rows.items()}
    return tables, labels, list(spec_raw.diagnoses)


def dense_probe(args: argparse.Namespace, pre: Path, models, n_cases: int = 30, n_train: int = 20,
                voxels_per_case: int = 3000) -> Dict[str, Dict]:
    """Voxel-wise linear probe of anatomy: multinomial logistic regression from the (upsampled, concatenated)
    encoder features of every level to the segmentation label, trained on ``n_train`` labelled cases, tested on the
    rest. Measures what the features know about anatomy, independently of global pooling."""
    import torch
    import torch.nn.functional as F
    from orthonet.diffusion import extract_features
    from orthonet.planners.plans import data_folder, load_plans
    from orthonet.training.data import PreprocessedCaseStore

    plans = load_plans(pre, PLANS)
    view = plans.get("segmentation_view") or args.views[0]
    if view not in args.views:
        return {}
    store = PreprocessedCaseStore(data_folder(pre, plans, view, CONFIG), [view], view)
    cases = store.labelled_cases()[:n_cases]
    rng = np.random.default_rng(0)
    feats: Dict[str, List[np.ndarray]] = {m: [] for m in models}
    labels = []
    with torch.no_grad():
        for case in cases:
            arrays = store.open(case, view)
            x = torch.from_numpy(np.asarray(arrays.data[:], np.float32))
            y = np.asarray(arrays.seg[:])[0].ravel()
            idx = rng.choice(np.flatnonzero(y >= 0), voxels_per_case, replace=False)
            labels.append(y[idx])
            for name, by_view in models.items():
                maps = extract_features(by_view[view], x, t=ints(args.t), levels=list(range(5)), seed=0)
                up = torch.cat([F.interpolate(f[None], size=x.shape[1:], mode="trilinear", align_corners=False)[0]
                                for f in maps]).flatten(1)
                feats[name].append(up[:, idx].T.numpy().astype(np.float64))
    y_all = np.asarray(labels)
    n_classes = int(y_all.max()) + 1
    out = {}
    for name, rows in feats.items():
        x_all = np.stack(rows)
        xtr, xte = standardise(x_all[:n_train].reshape(-1, x_all.shape[-1]), x_all[n_train:].reshape(-1, x_all.shape[-1]))
        ytr, yte = y_all[:n_train].ravel(), y_all[n_train:].ravel()
        W, b = fit_softmax(xtr, ytr, n_classes, 1e-3)
        pred = (xte @ W + b).argmax(1)
        dice = [2 * np.sum((pred == k) & (yte == k)) / (np.sum(pred == k) + np.sum(yte == k))
                for k in range(1, n_classes) if np.any(yte == k)]
        out[name] = {"accuracy": round(float(np.mean(pred == yte)), 3), "mean_fg_dice": round(float(np.mean(dice)), 3),
                     "dice_per_class": [round(float(d), 2) for d in dice]}
        print(f"[dense] {name}: {out[name]}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------------------
# the linear probe
# ------------------------------------------------------------------------------------------------------------
def auc(scores: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC (orthonet.metrics, i.e. scikit-learn; NaN when a class is missing)."""
    from orthonet.metrics import roc_auc
    return roc_auc(y, scores)


def macro_auc(scores: np.ndarray, y: np.ndarray) -> float:
    vals = [auc(scores[:, j], y[:, j]) for j in range(y.shape[1])]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _fit_linear(x: np.ndarray, target, n_out: int, loss_fn, l2: float, **lbfgs) -> Tuple[np.ndarray, np.ndarray]:
    """Linear model ``x @ W + b`` minimising ``loss_fn(logits, target) + l2/2 |W|^2`` with LBFGS (float64)."""
    import torch
    X = torch.from_numpy(x)
    W = torch.zeros(x.shape[1], n_out, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_out, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, line_search_fn="strong_wolfe", **lbfgs)

    def closure():
        opt.zero_grad()
        loss = loss_fn(X @ W + b, target) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().numpy(), b.detach().numpy()


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float) -> Tuple[np.ndarray, np.ndarray]:
    """Multi-label logistic regression (one independent output per label), mean BCE + l2/2 |W|^2, LBFGS."""
    import torch
    return _fit_linear(x, torch.from_numpy(y), y.shape[1], torch.nn.functional.binary_cross_entropy_with_logits, l2,
                       max_iter=100, tolerance_grad=1e-6)


def fit_softmax(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float) -> Tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression (dense anatomy probe), mean cross-entropy + l2/2 |W|^2, LBFGS."""
    import torch
    return _fit_linear(x, torch.from_numpy(y).long(), n_classes, torch.nn.functional.cross_entropy, l2,
                       max_iter=200)


def standardise(train: np.ndarray, test: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    mu, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    return (train - mu) / sd, (test - mu) / sd


def stratified_folds(y: np.ndarray, k: int, rng: np.random.Generator) -> List[np.ndarray]:
    """k folds with the positives (and the negatives) of one label spread evenly.

    Why per-label stratification: with unstratified folds a fold that happens to hold many positives is scored by a
    model trained on few, whose lower intercept pushes exactly those positives down; pooled over folds this drives
    the AUC of uninformative features well *below* 0.5 on 40-120 cases. Stratifying removes that artefact."""
    folds: List[List[int]] = [[] for _ in range(k)]
    offset = 0
    for cls in (1.0, 0.0):
        idx = rng.permutation(np.flatnonzero(y == cls))
        for i, j in enumerate(idx):
            folds[(i + offset) % k].append(int(j))
        offset += len(idx)
    return [np.asarray(sorted(f)) for f in folds]


def probe_label(x: np.ndarray, y: np.ndarray, folds: int, grid: Sequence[float], rng: np.random.Generator,
                inner_folds: int = 3) -> Tuple[float, List[float]]:
    """Out-of-fold AUC of one label; the L2 strength is picked by inner (stratified) CV on each training part."""
    scores = np.zeros(len(y))
    chosen = []
    for test in stratified_folds(y, folds, rng):
        train = np.setdiff1d(np.arange(len(y)), test)
        best, best_auc = grid[0], -1.0
        inner = stratified_folds(y[train], inner_folds, rng)
        for l2 in grid:
            s = np.zeros(len(train))
            for fold in inner:
                tr = np.setdiff1d(np.arange(len(train)), fold)
                a, b_ = standardise(x[train[tr]], x[train[fold]])
                W, b = fit_logistic(a, y[train[tr]][:, None], l2)
                s[fold] = (b_ @ W + b)[:, 0]
            value = auc(s, y[train])
            if value > best_auc:
                best, best_auc = l2, value
        a, b_ = standardise(x[train], x[test])
        W, b = fit_logistic(a, y[train][:, None], best)
        scores[test] = (b_ @ W + b)[:, 0]
        chosen.append(best)
    return auc(scores, y), chosen


def evaluate_probe(x: np.ndarray, y: np.ndarray, folds: int, repeats: int, seed: int = 0) -> Dict:
    """Repeated stratified k-fold CV of an L2 logistic-regression probe, one label at a time (labels with fewer
    than ``folds`` positives or negatives are skipped); macro AUC = mean over labels."""
    grid = [1e-2, 1e-1, 1.0, 10.0]
    usable = [j for j in range(y.shape[1]) if min(y[:, j].sum(), (1 - y[:, j]).sum()) >= folds]
    per_repeat, per_label, chosen = [], [], []
    for r in range(repeats):
        rng = np.random.default_rng(seed + r)
        aucs = []
        for j in usable:
            value, picked = probe_label(x, y[:, j], folds, grid, rng)
            aucs.append(value)
            chosen.extend(picked)
        per_repeat.append(float(np.mean(aucs)))
        per_label.append(aucs)
    labels = np.full(y.shape[1], np.nan)
    labels[usable] = np.mean(np.asarray(per_label), 0)
    return {"macro_auc_mean": float(np.mean(per_repeat)), "macro_auc_sd": float(np.std(per_repeat)),
            "macro_auc_per_repeat": [round(v, 4) for v in per_repeat],
            "auc_per_label": [round(float(v), 3) for v in labels],
            "l2_chosen": {str(g): chosen.count(g) for g in grid}}


# ------------------------------------------------------------------------------------------------------------
def markdown_table(probes: Dict, names: Sequence[str]) -> str:
    lines = ["| features | pooling | dim | macro AUC (mean +- sd over repeats) | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for (model, pooling), r in probes.items():
        lines.append(f"| {model} | {pooling} | {r['dim']} | {r['macro_auc_mean']:.3f} +- {r['macro_auc_sd']:.3f} | "
                     + " | ".join(f"{v:.2f}" for v in r["auc_per_label"]) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    for kind in ("raw", "preprocessed", "results"):
        os.environ.setdefault(f"ORTHO_{kind}", str(work / kind))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    torch.set_num_threads(args.threads)
    t_all = time.time()
    pre = prepare_data(args)
    print(f"[data] ready in {time.time() - t_all:.1f} s", flush=True)
    result_path = work / "results.json"
    previous = json.loads(result_path.read_text(encoding="utf-8")) if result_path.is_file() else {}
    pretraining = previous.get("pretraining", {}) if args.skip_pretrain else pretrain(args, pre)
    models = load_models(args)
    t0 = time.time()
    tables, labels, names = feature_tables(args, pre, models)
    probes = {}
    for model, by_pooling in tables.items():
        for pooling, x in by_pooling.items():
            r = evaluate_probe(x, labels, args.folds, args.repeats)
            r["dim"] = int(x.shape[1])
            probes[(model, pooling)] = r
            print(f"[probe] {model:10s} {pooling:9s} dim {x.shape[1]:5d}: macro AUC {r['macro_auc_mean']:.3f} +- "
                  f"{r['macro_auc_sd']:.3f}  per label {r['auc_per_label']}", flush=True)
    probe_s = time.time() - t0
    dense = {} if args.no_dense else dense_probe(args, pre, models)
    table = markdown_table(probes, names)
    print(table)
    record = {"date": _dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
              "load_average_at_end": [round(v, 1) for v in os.getloadavg()],
              "command": "python " + " ".join([sys.argv[0]] + list(argv if argv is not None else sys.argv[1:])),
              "args": vars(args), "pretraining": pretraining,
              "probe": {f"{m}/{p}": r for (m, p), r in probes.items()}, "probe_s": round(probe_s, 1),
              "dense_probe": dense, "diagnoses": names, "prevalence": [round(float(v), 3) for v in labels.mean(0)],
              "markdown": table, "total_s": round(time.time() - t_all, 1)}
    runs = previous.get("runs", []) + [record]
    result_path.write_text(json.dumps({"pretraining": pretraining, "runs": runs, "latest": record}, indent=2),
                           encoding="utf-8")
    print(f"[done] {record['total_s']} s; results in {result_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
