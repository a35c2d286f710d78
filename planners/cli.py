"""``ortho_plan_and_preprocess -d 101``: verify -> fingerprint -> plan -> preprocess.

Each step reuses what an earlier run left (fingerprint, plans, finished cases) unless ``--overwrite``; an existing
plans file is never silently replaced, so a hand-edited plan survives a rerun and is what preprocessing uses.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from orthonet.cli_utils import run_cli
from orthonet.dataset import load_dataset
from orthonet.errors import OrthoError
from orthonet.fileio import atomic_path
from orthonet.logging_utils import get_logger
from orthonet.paths import preprocessed_root, raw_dataset_dir, resolve_dataset_name

LOG_NAME = "plan_and_preprocess_log.txt"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ortho_plan_and_preprocess",
        description="Fingerprint, plan and preprocess a dataset (verify -> fingerprint -> plan -> preprocess).")
    p.add_argument("-d", "--dataset", required=True, nargs="+", help="dataset id(s) or DatasetXXX_Name folder(s)")
    p.add_argument("-pl", "--planner", default=None,
                   help="planner class (DefaultPlanner, ResEncPlanner or one you registered); default DefaultPlanner")
    p.add_argument("-c", "--configurations", nargs="+", default=None,
                   help="configurations to preprocess (default: every planned one: 3d_fullres, 2d, 3d_lowres)")
    p.add_argument("--no-pp", action="store_true", help="stop after planning")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute the fingerprint, re-plan (replacing plans you edited) and redo every case")
    p.add_argument("-np", "--num-processes", type=int, default=None,
                   help="worker processes (default: min(CPUs, 8))")
    p.add_argument("-gpu_memory_target", "--gpu-memory-target", type=float, default=None,
                   help="GPU memory budget in GB for patch/batch size (default 8)")
    p.add_argument("--base-features", type=int, default=None,
                   help="features of the first stage (default 32, doubled per stage up to 320); smaller networks "
                        "for CPU-only machines or quick experiments")
    p.add_argument("--plans-from", default=None,
                   help="reuse the network topology of this dataset's plans (plans transfer)")
    p.add_argument("--plans-from-name", default=None,
                   help="plans name in the --plans-from dataset (default: the planner's default plans name)")
    p.add_argument("--view-map", nargs="+", default=None, metavar="TARGET=SOURCE",
                   help="with --plans-from: map target views onto source views, e.g. image=sagittal")
    p.add_argument("--plans-name", default=None, help="name of the plans file (default orthoPlans; "
                   "orthoResEncPlans for ResEncPlanner)")
    p.add_argument("--skip-verify", action="store_true", help="do not verify the dataset first")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_view_map(items: Optional[Sequence[str]]) -> Dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise OrthoError(f"--view-map entry '{item}' is not TARGET=SOURCE", fix="e.g. --view-map image=sagittal")
        t, s = item.split("=", 1)
        out[t.strip()] = s.strip()
    return out


def run_verify(dataset_dir: Path, num_processes: int, progress: bool, log) -> None:
    """Run the dataset verification; errors stop planning with the report."""
    try:
        from orthonet.verify import verify_dataset  # imported lazily: verify is an optional neighbour module
    except ImportError:
        log.info("warning: orthonet.verify is not available; skipping dataset verification")
        return
    log.info("verifying the dataset")
    report = verify_dataset(dataset_dir, num_processes=num_processes, progress=progress)
    full = report.format() if hasattr(report, "format") else "\n".join([*report.errors, report.summary()])
    if not report.ok or report.errors:
        log.info(full)
        raise OrthoError(f"dataset verification failed:\n{full}", dataset_dir,
                         fix="fix the listed problems (or pass --skip-verify if you know what you are doing)")
    for w in getattr(report, "warnings", []) or []:
        log.info(f"verify warning: {w}")
    log.info(f"dataset verified: {report.summary()}")


def _requested_settings_conflict(existing: Dict, planner_name: Optional[str], gpu: Optional[float],
                                 plans_from: Optional[str], base_features: Optional[int] = None) -> List[str]:
    problems = []
    old_base = existing.get("planner_settings", {}).get("base_features")
    if base_features is not None and existing.get("transferred_from") is None and old_base is not None \
            and int(old_base) != int(base_features):
        problems.append(f"base_features {old_base} (requested {base_features})")
    if planner_name is not None and existing.get("planner") != planner_name:
        problems.append(f"planner {existing.get('planner')} (requested {planner_name})")
    old_gpu = existing.get("planner_settings", {}).get("gpu_memory_target_gb")
    if gpu is not None and existing.get("transferred_from") is None and old_gpu is not None \
            and float(old_gpu) != float(gpu):
        problems.append(f"gpu_memory_target {old_gpu} GB (requested {gpu} GB)")
    if plans_from is not None:
        src = (existing.get("transferred_from") or {}).get("dataset_name")
        if src != resolve_dataset_name(plans_from):
            problems.append(f"transferred from {src} (requested {resolve_dataset_name(plans_from)})")
    return problems


def plan_dataset(spec, fingerprint: Dict, preprocessed_dir: Path, args, log) -> Dict:
    """Load existing plans (when compatible) or make new ones, and save them."""
    from orthonet.planners.plans import check_plans, load_plans, plans_path, save_plans
    from orthonet.planners.registry import get_planner

    planner_cls = get_planner(args.planner or "DefaultPlanner")
    plans_name = args.plans_name or planner_cls.default_plans_name
    path = plans_path(preprocessed_dir, plans_name)
    if path.is_file() and not args.overwrite:
        plans = load_plans(preprocessed_dir, plans_name)
        conflicts = _requested_settings_conflict(plans, args.planner, args.gpu_memory_target, args.plans_from,
                                                 args.base_features)
        if conflicts:
            raise OrthoError(f"existing plans {path.name} were made with " + "; ".join(conflicts), path,
                             fix="pass --overwrite to re-plan (this replaces edits), or --plans-name NEW to keep both")
        log.info(f"using the existing plans {path} (edit it freely; --overwrite re-plans)")
        return plans
    planner = planner_cls(spec, fingerprint, gpu_memory_target_gb=args.gpu_memory_target or 8.0,
                          plans_name=plans_name, logger=log, base_features=args.base_features)
    if args.plans_from:
        from orthonet.planners.transfer import transfer_plans

        source_dir = preprocessed_root() / resolve_dataset_name(args.plans_from)
        source_name = args.plans_from_name or planner_cls.default_plans_name
        source = load_plans(source_dir, source_name)
        log.info(f"transferring plans from {source_dir.name}/{source_name}")
        plans = transfer_plans(source, planner, parse_view_map(args.view_map))
    else:
        plans = planner.plan()
    check_plans(plans)
    save_plans(plans, preprocessed_dir)
    log.info(f"plans written to {path}")
    return plans


def process_dataset(dataset: str, args, num_processes: int, command: str = "") -> int:
    """All steps for one dataset; a user-fixable error is also written to the dataset's log file."""
    raw_dir = raw_dataset_dir(dataset)
    preprocessed_dir = preprocessed_root() / raw_dir.name
    preprocessed_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _process_dataset(raw_dir, preprocessed_dir, args, num_processes, command)
    except OrthoError as e:
        get_logger("plan_and_preprocess.errors", preprocessed_dir / LOG_NAME, console=False).info(f"error: {e}")
        raise


def _process_dataset(raw_dir: Path, preprocessed_dir: Path, args, num_processes: int, command: str) -> int:
    from orthonet.planners.fingerprint import load_or_extract_fingerprint
    from orthonet.planners.plans import planned_configurations
    from orthonet.preprocessing.parallel import format_errors, make_pool
    from orthonet.preprocessing.preprocessor import preprocess_dataset

    name = raw_dir.name
    log = get_logger("plan_and_preprocess", preprocessed_dir / LOG_NAME)
    log.info(f"=== ortho_plan_and_preprocess {command} ({name}, {num_processes} process(es))")
    progress = not args.no_progress
    if not args.skip_verify:
        run_verify(raw_dir, num_processes, progress, log)
    spec = load_dataset(raw_dir)
    t0 = time.time()
    pool = make_pool(num_processes)
    try:
        fingerprint = load_or_extract_fingerprint(spec, preprocessed_dir, args.overwrite, pool, progress, log)
        with atomic_path(preprocessed_dir / "dataset.json") as tmp:  # for training on a machine without raw data
            shutil.copyfile(raw_dir / "dataset.json", tmp)
        plans = plan_dataset(spec, fingerprint, preprocessed_dir, args, log)
        if args.no_pp:
            log.info("--no-pp: stopping after planning")
            return 0
        planned = planned_configurations(plans)
        configs = args.configurations or planned
        unknown = [c for c in configs if c not in planned]
        if unknown:
            raise OrthoError(f"configuration(s) {unknown} are not in the plans (planned: {planned})",
                             fix="choose from the planned configurations; the planning log says why the others "
                                 "were not planned")
        summary = preprocess_dataset(spec, plans, preprocessed_dir, configs, pool, args.overwrite, progress, log)
    finally:
        if pool is not None:
            pool.shutdown()
    log.info(f"done in {time.time() - t0:.1f} s: " + ", ".join(
        f"{c}: {summary.done.get(c, 0)} preprocessed, {summary.skipped.get(c, 0)} up to date" for c in configs))
    if summary.errors:
        text = (format_errors(summary.errors, "case/view(s) (configuration / view / case)")
                + "\n  fix: repair the named images and rerun; finished cases are kept")
        get_logger("plan_and_preprocess.errors", preprocessed_dir / LOG_NAME, console=False).info(text)
        print("error: " + text, file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from orthonet.preprocessing.parallel import default_num_processes

    num_processes = args.num_processes if args.num_processes is not None else default_num_processes()
    if num_processes < 1:
        raise OrthoError(f"-np must be at least 1 (got {num_processes})")
    code = 0
    for dataset in args.dataset:
        code = max(code, process_dataset(dataset, args, num_processes, " ".join(argv)))
    return code


plan_and_preprocess_cli = run_cli(main)

if __name__ == "__main__":
    sys.exit(plan_and_preprocess_cli())
