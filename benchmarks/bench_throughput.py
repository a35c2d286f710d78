"""Benchmark: training-step, pretraining and prediction throughput of orthonet next to nnU-Net (issue 14 item 1).

What it measures, on one synthetic knee dataset and one plan, in one run:

1. ``SegTrainer`` training step (orthonet) vs ``nnUNetTrainer.train_step`` (nnU-Net 2.8.1): seconds per
   iteration and iterations/s after ``--warmup`` iterations, each timed around ``train_step(next(loader))``
   (data loading + augmentation + forward + backward + optimizer step), with the same number of data-loading
   workers (``--num-workers``, default 0: in the training process) and the same torch threads.
2. ``MultitaskTrainer`` step (three view encoders, segmentation + whole-exam diagnosis): its ratio to the
   orthonet segmentation step.
3. The pretraining step (``DiffusionPretrainer.train_step`` on the segmentation view, the plan's patch and
   batch): patches/s.
4. ``ortho_predict`` vs ``nnUNetv2_predict`` with mirroring TTA on (both mirror all three axes: 8 passes),
   fold 0 of each tool's short training run above, the same ``--predict-cases`` test images, one
   preprocessing/export worker each: wall time of the CLI divided by the number of cases (so each CLI's
   start-up and model loading is included once).

How:

- Data: ``orthonet.synthetic`` knees (``--size``, default ``small``), planned by ``ortho_plan_and_preprocess``
  with the CPU plan (``-gpu_memory_target 1 --base-features 16``). The segmentation (sagittal) view is exported
  in nnU-Net's raw format (``bench_preprocess.copy_segmentation_view``) and planned by
  ``nnUNetv2_plan_and_preprocess -c 3d_fullres -gpu_memory_target 1`` (its default planner). nnU-Net's planner
  has no width option (32 base features), so unless ``--no-align`` its 3d_fullres plan is copied to plans
  ``nnUNetPlansAligned`` with orthonet's patch size, batch size and U-Net topology/widths (both tools build the
  same ``PlainConvUNet`` class); both plans are printed and stored in results.json.
- nnU-Net runs from its own virtual environment exactly as ``bench_preprocess.py`` sets it up
  (``benchmarks/.venv-nnunet``, nnunetv2 2.8.1, this environment's torch through a ``.pth`` file).
- Every measurement is its own process: this file re-run with ``--driver JOB`` (with nnU-Net's Python for
  nnU-Net). Peak memory is ``bench_preprocess.run_measured``'s largest process-tree PSS (sampled every 50 ms)
  over the whole process, start-up and data set-up included, for both tools alike.
- ``--repeats`` rounds; in each, every measurement runs once, orthonet and nnU-Net alternately (and the order of
  the two flips every round) so that background load affects both alike. Tables show medians over the rounds.

Usage::

    python benchmarks/bench_throughput.py                       # 10 small knees, writes docs/benchmarks.md
    python benchmarks/bench_throughput.py --quick --no-write --work /tmp/tp   # smoke run (tiny everything)

Results: ``WORK/results.json`` and, unless ``--no-write``, the ``bench_throughput`` section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# light imports only: --driver also runs under nnU-Net's Python
from benchmarks.bench_preprocess import (NNUNET_VERSION, copy_segmentation_view, ensure_nnunet_venv,  # noqa: E402
                                         run_measured, write_nnunet_dataset_json)
from benchmarks.common import count_flops, driver_job, driver_result, utilisation, write_driver_result  # noqa: E402

DATASET_ID = 994
DATASET_NAME = f"Dataset{DATASET_ID}_ThroughputKnee"
CONFIG = "3d_fullres"
ALIGNED_PLANS = "nnUNetPlansAligned"
TARGETS = {"seg_step": 1.0, "predict": 0.8, "multitask_vs_seg": 2.0}
ARCH_KEYS = ("n_stages", "features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage",
             "n_conv_per_stage_decoder")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".data" / "throughput",
                   help="working folder (data, plans, checkpoints, logs, results.json)")
    p.add_argument("--cases", type=int, default=10, help="labelled training exams (at least 5: 5-fold splits)")
    p.add_argument("--size", choices=["tiny", "small", "default"], default="small", help="synthetic size preset")
    p.add_argument("--iterations", type=int, default=30, help="timed training/pretraining iterations per run")
    p.add_argument("--warmup", type=int, default=5, help="first iterations left out of the rates")
    p.add_argument("--repeats", type=int, default=2, help="rounds of every measurement (medians reported)")
    p.add_argument("--predict-cases", type=int, default=3, help="test exams each prediction CLI predicts")
    p.add_argument("--num-workers", type=int, default=0,
                   help="data-loading worker processes, both tools (0: in the training process)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads of the training processes, both tools (default: the CPUs; nnU-Net's "
                        "run_training sets this too)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device of both tools")
    p.add_argument("--plan-args", default="-gpu_memory_target 1 --base-features 16",
                   help="ortho_plan_and_preprocess arguments (the CPU plan)")
    p.add_argument("--nnunet-gpu-memory-target", type=float, default=1.0,
                   help="nnUNetv2_plan_and_preprocess -gpu_memory_target (GB)")
    p.add_argument("--no-align", action="store_true",
                   help="train nnU-Net on its own plan (default: orthonet's patch, batch and network widths)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--venv", type=Path, default=REPO / "benchmarks" / ".venv-nnunet")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (tiny size, 6 exams, 4 iterations, 1 round)")
    p.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    p.add_argument("--driver", type=Path, default=None, help=argparse.SUPPRESS)   # internal: run one job file
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.cases, args.iterations, args.warmup, args.repeats, args.predict_cases = "tiny", 6, 4, 1, 1, 1
    if args.driver is None:
        if args.cases < 5:
            p.error("--cases must be at least 5 (both tools split fold 0 of 5)")
        if not 0 <= args.warmup < args.iterations:
            p.error("--warmup must be at least 0 and below --iterations")
        if args.repeats < 1 or args.predict_cases < 1:
            p.error("--repeats and --predict-cases must be at least 1")
    return args


# ------------------------------------------------------------------------------------------------------------
# drivers: one measurement per process (run with --driver JOB.json)
# ------------------------------------------------------------------------------------------------------------
def _timed_steps(n: int, step) -> List[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _drive_ortho_trainer(job: Dict) -> Dict:
    from orthonet.training.options import TrainOptions
    from orthonet.training.trainers import get_trainer_class

    cls = get_trainer_class(job["trainer"])
    opts = TrainOptions(dataset_name=job["dataset"], configuration=CONFIG, fold=0, task=cls.task, pretrained="none",
                        epochs=1, iterations_per_epoch=job["iterations"], val_iterations=1, device=job["device"],
                        num_workers=job["num_workers"], final_validation=False)
    trainer = cls(opts)
    trainer.setup()
    loader = trainer.build_train_loader()
    trainer.network.train()
    try:
        def step():
            return trainer.train_step(trainer.to_device(next(loader)))
        times = _timed_steps(job["iterations"], step)
        flops = count_flops(step)
    finally:
        if hasattr(loader, "close"):
            loader.close()
    trainer.save("checkpoint_final.pt")
    view = trainer.segmentation_view
    cfg = trainer.plans["views"][view]["configurations"][CONFIG]
    return {"times": times, "batch_size": int(cfg["batch_size"]), "patch_size": cfg["patch_size"],
            "model_folder": str(trainer.output_dir.parent), "views": list(trainer.model_cfg.views),
            "mirror_axes": trainer.model_cfg.allowed_mirroring_axes, "flops_per_step": flops}


def _drive_ortho_pretrain(job: Dict) -> Dict:
    import torch

    from orthonet.fileio import load_json
    from orthonet.training.trainers.pretrainer import DiffusionPretrainer, PretrainSettings, segment_seed

    pre = Path(job["preprocessed"])
    plans = load_json(pre / "orthoPlans.json", "plans file")
    view = plans["segmentation_view"]
    settings = PretrainSettings(steps=job["iterations"], save_every=10 ** 9, log_every=10 ** 9, progress=False,
                                num_workers=job["num_workers"])
    trainer = DiffusionPretrainer(plans, CONFIG, view, pre, Path(job["out"]).parent / "pretrain_out", settings,
                                  device=job["device"])
    trainer.setup()
    seed = segment_seed(settings.seed, 0, 0)
    loader = trainer.build_loader(trainer.store, trainer.cases, seed)
    trainer.generator = torch.Generator().manual_seed(seed)
    try:
        def step():
            return trainer.train_step(next(loader))
        times = _timed_steps(job["iterations"], step)
        flops = count_flops(step)
    finally:
        loader.close()
    return {"times": times, "batch_size": trainer.batch_size, "patch_size": trainer.spec_patch(), "view": view,
            "flops_per_step": flops}


def _drive_nnunet_trainer(job: Dict) -> Dict:
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(job["dataset"], CONFIG, 0, "nnUNetTrainer", job["plans"],
                                    device=torch.device(job["device"]))
    trainer.on_train_start()
    trainer.on_train_epoch_start()            # network.train(), the epoch's learning rate
    try:
        def step():
            return trainer.train_step(next(trainer.dataloader_train))
        times = _timed_steps(job["iterations"], step)
        flops = count_flops(step)
    finally:
        trainer.on_train_end()                # writes fold_0/checkpoint_final.pth, stops the loaders
    cm = trainer.configuration_manager
    _, _, _, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    return {"times": times, "batch_size": int(cm.batch_size), "patch_size": list(cm.patch_size),
            "model_folder": str(trainer.output_folder_base),
            "mirror_axes": list(mirror_axes) if mirror_axes is not None else [], "flops_per_step": flops}


def driver_main(job_path: Path) -> int:
    """Run one job file's measurement in this process; its result goes to ``job['out']``."""
    import resource

    import torch

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    torch.set_num_threads(int(job["threads"]))
    t0 = time.perf_counter()
    fn = {"ortho-trainer": _drive_ortho_trainer, "ortho-pretrain": _drive_ortho_pretrain,
          "nnunet-trainer": _drive_nnunet_trainer}[job["kind"]]
    result = fn(job)
    result["process_seconds"] = time.perf_counter() - t0
    result["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result["torch_threads"] = torch.get_num_threads()
    result["device_name"] = torch.cuda.get_device_name() if str(job["device"]).startswith("cuda") else "cpu"
    write_driver_result(job, result)
    return 0


# ------------------------------------------------------------------------------------------------------------
# data and plans
# ------------------------------------------------------------------------------------------------------------
def environment(work: Path) -> Dict[str, str]:
    """Both tools' folders under WORK (also set in this process, for the in-process data preparation)."""
    paths = {"ORTHO_raw": work / "raw", "ORTHO_preprocessed": work / "ortho_pre", "ORTHO_results": work / "ortho_res",
             "nnUNet_raw": work / "nnunet_raw", "nnUNet_preprocessed": work / "nnunet_pre",
             "nnUNet_results": work / "nnunet_res"}
    os.environ.update({k: str(v) for k, v in paths.items()})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORTHO_", "nnUNet_"))}
    env.update({k: str(v) for k, v in paths.items()})
    env["PYTHONPATH"] = str(REPO)
    return env


def prepare_data(args: argparse.Namespace, work: Path, env: Dict[str, str], nnunet_bin: Path) -> Dict:
    """Generate, plan and preprocess for both tools (each step reused when already done with the same settings);
    returns what went in."""
    signature = {"cases": args.cases, "size": args.size, "predict_cases": args.predict_cases, "seed": args.seed,
                 "plan_args": args.plan_args, "nnunet_gpu_memory_target": args.nnunet_gpu_memory_target,
                 "nnunet": NNUNET_VERSION}
    sig_path = work / "data.json"
    if sig_path.is_file() and json.loads(sig_path.read_text(encoding="utf-8")) != signature:
        print(f"[data] settings changed: rebuilding {work}", flush=True)
        for d in ("raw", "ortho_pre", "ortho_res", "nnunet_raw", "nnunet_pre", "nnunet_res", "predict_in"):
            shutil.rmtree(work / d, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    sig_path.write_text(json.dumps(signature, indent=1), encoding="utf-8")

    from benchmarks.common import synthetic_dataset

    pre = synthetic_dataset(DATASET_ID, DATASET_NAME, "knee", args.cases, 0, args.seed, args.size, CONFIG,
                            shlex.split(args.plan_args), n_test=args.predict_cases)
    raw = work / "raw" / DATASET_NAME
    nn_raw = work / "nnunet_raw" / DATASET_NAME
    if not (nn_raw / "dataset.json").is_file():
        shutil.rmtree(nn_raw, ignore_errors=True)
        (nn_raw / "imagesTr").mkdir(parents=True)
        (nn_raw / "labelsTr").mkdir()
        view, labels, n = copy_segmentation_view(raw, nn_raw, test_cases=args.predict_cases)
        write_nnunet_dataset_json(nn_raw, labels, n, name="ThroughputKnee")
    nn_pre = work / "nnunet_pre" / DATASET_NAME
    if not (nn_pre / "nnUNetPlans.json").is_file() or not (nn_pre / "nnUNetPlans_3d_fullres").is_dir():
        cmd = [str(nnunet_bin / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", CONFIG, "-np", "2",
               "-npfp", "2", "-gpu_memory_target", f"{args.nnunet_gpu_memory_target:g}"]
        t0 = time.time()
        wall, _, code = run_measured(cmd, env, work / "nnunet_plan.log")
        if code != 0:
            raise SystemExit(f"nnUNetv2_plan_and_preprocess failed (exit {code}); see {work / 'nnunet_plan.log'}")
        print(f"[plan] nnU-Net planned and preprocessed in {time.time() - t0:.0f} s", flush=True)
    # prediction inputs: the same test images, in each tool's naming
    ortho_plans = json.loads((pre / "orthoPlans.json").read_text(encoding="utf-8"))
    view = ortho_plans["segmentation_view"]
    ortho_in = work / "predict_in" / "orthonet"
    nn_in = nn_raw / "imagesTs"
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in nn_in.glob("*_0000.nii.gz"))
    if not ortho_in.is_dir():
        ortho_in.mkdir(parents=True)
        for case in cases:
            shutil.copyfile(raw / "imagesTs" / f"{case}_{view}_0000.nii.gz", ortho_in / f"{case}_{view}_0000.nii.gz")
    return {"preprocessed": pre, "nnunet_preprocessed": nn_pre, "ortho_plans": ortho_plans,
            "predict_inputs": {"orthonet": ortho_in, "nnU-Net": nn_in}, "predict_cases": cases, "view": view}


def align_nnunet_plans(nn_pre: Path, ortho_cfg: Dict) -> Dict:
    """Write plans ``nnUNetPlansAligned``: nnU-Net's own plan (same preprocessed data) with orthonet's patch size,
    batch size and U-Net topology and widths in 3d_fullres. Returns the written plans."""
    plans = json.loads((nn_pre / "nnUNetPlans.json").read_text(encoding="utf-8"))
    plans["plans_name"] = ALIGNED_PLANS
    cfg = plans["configurations"][CONFIG]
    cfg["patch_size"] = list(ortho_cfg["patch_size"])
    cfg["batch_size"] = int(ortho_cfg["batch_size"])
    arch = cfg["architecture"]["arch_kwargs"]
    for key in ARCH_KEYS:
        arch[key] = ortho_cfg["network"]["kwargs"][key]
    (nn_pre / f"{ALIGNED_PLANS}.json").write_text(json.dumps(plans, indent=1), encoding="utf-8")
    return plans


def plan_summary(spacing, patch, batch, arch: Dict) -> Dict:
    return {"spacing": [round(float(s), 3) for s in spacing], "patch_size": [int(p) for p in patch],
            "batch_size": int(batch), "features_per_stage": list(arch["features_per_stage"]),
            "strides": [list(s) for s in arch["strides"]]}


def compare_plans(ortho_plans: Dict, nn_pre: Path, aligned: bool) -> Dict[str, Dict]:
    view = ortho_plans["segmentation_view"]
    oc = ortho_plans["views"][view]["configurations"][CONFIG]
    own = json.loads((nn_pre / "nnUNetPlans.json").read_text(encoding="utf-8"))["configurations"][CONFIG]
    out = {f"orthonet ({view})": plan_summary(oc["spacing"], oc["patch_size"], oc["batch_size"],
                                              oc["network"]["kwargs"]),
           "nnU-Net own plan": plan_summary(own["spacing"], own["patch_size"], own["batch_size"],
                                            own["architecture"]["arch_kwargs"])}
    if aligned:
        al = align_nnunet_plans(nn_pre, oc)["configurations"][CONFIG]
        out[f"nnU-Net trained ({ALIGNED_PLANS})"] = plan_summary(al["spacing"], al["patch_size"], al["batch_size"],
                                                                 al["architecture"]["arch_kwargs"])
    return out


# ------------------------------------------------------------------------------------------------------------
# one round of measurements
# ------------------------------------------------------------------------------------------------------------
def run_driver(name: str, kind: str, python: str, job: Dict, work: Path, env: Dict[str, str], rnd: int) -> Dict:
    """One measurement in its own process, peak process-tree PSS sampled from outside."""
    jobs = work / "jobs"
    tag = f"{name}_r{rnd}"
    job, cmd = driver_job(Path(__file__), dict(job, kind=kind), jobs / f"{tag}.json", python)
    wall, peak, code = run_measured(cmd, env, jobs / f"{tag}.log")
    result = driver_result(job, code, name, str(jobs / f"{tag}.log"))
    result.update(wall_s=wall, peak_pss_mb=peak)
    steps = result["times"][job["warmup"]:]
    result["step_s"] = statistics.median(steps)
    result["it_per_s"] = len(steps) / sum(steps)
    return result


def run_predict(name: str, cmd: List[str], out: Path, n_cases: int, work: Path, env: Dict[str, str],
                rnd: int) -> Dict:
    shutil.rmtree(out, ignore_errors=True)
    log = work / "jobs" / f"{name}_r{rnd}.log"
    wall, peak, code = run_measured(cmd, env, log)
    written = len(list(out.glob("*.nii.gz"))) if out.is_dir() else 0
    if code != 0 or written < n_cases:
        raise SystemExit(f"{name} failed (exit {code}, {written} of {n_cases} segmentations); see {log}")
    return {"wall_s": wall, "peak_pss_mb": peak, "s_per_case": wall / n_cases}


def one_round(rnd: int, args: argparse.Namespace, work: Path, env: Dict[str, str], data: Dict, nnunet_py: str,
              nnunet_bin: Path, plans_id: str, log) -> Dict[str, Dict]:
    base = {"dataset": DATASET_NAME, "iterations": args.iterations, "warmup": args.warmup,
            "num_workers": args.num_workers, "threads": args.threads, "device": args.device}
    me = sys.executable
    out: Dict[str, Dict] = {}

    def seg_ortho():
        out["seg_orthonet"] = run_driver("seg_orthonet", "ortho-trainer", me, dict(base, trainer="SegTrainer"),
                                         work, env, rnd)
        log("seg_orthonet", out["seg_orthonet"])

    def seg_nnunet():
        out["seg_nnunet"] = run_driver("seg_nnunet", "nnunet-trainer", nnunet_py, dict(base, plans=plans_id),
                                       work, env, rnd)
        log("seg_nnunet", out["seg_nnunet"])

    def pred_ortho():
        model = out["seg_orthonet"]["model_folder"]
        dst = work / "predict_out" / "orthonet"
        cmd = [str(Path(me).parent / "ortho_predict"), "-i", str(data["predict_inputs"]["orthonet"]), "-o", str(dst),
               "--model-folder", model, "-f", "0", "--device", args.device, "-npp", "1", "--no-overview",
               "--no-progress"]
        out["predict_orthonet"] = run_predict("predict_orthonet", cmd, dst, len(data["predict_cases"]), work, env,
                                              rnd)
        log("predict_orthonet", out["predict_orthonet"])

    def pred_nnunet():
        dst = work / "predict_out" / "nnunet"
        cmd = [str(nnunet_bin / "nnUNetv2_predict"), "-i", str(data["predict_inputs"]["nnU-Net"]), "-o", str(dst),
               "-d", str(DATASET_ID), "-c", CONFIG, "-p", plans_id, "-f", "0", "-chk", "checkpoint_final.pth",
               "-device", args.device, "-npp", "1", "-nps", "1", "--disable_progress_bar"]
        out["predict_nnunet"] = run_predict("predict_nnunet", cmd, dst, len(data["predict_cases"]), work, env, rnd)
        log("predict_nnunet", out["predict_nnunet"])

    pair_seg = [seg_ortho, seg_nnunet] if rnd % 2 == 0 else [seg_nnunet, seg_ortho]
    for fn in pair_seg:
        fn()
    out["multitask_orthonet"] = run_driver("multitask_orthonet", "ortho-trainer", me,
                                           dict(base, trainer="MultitaskTrainer"), work, env, rnd)
    log("multitask_orthonet", out["multitask_orthonet"])
    out["pretrain_orthonet"] = run_driver("pretrain_orthonet", "ortho-pretrain", me,
                                          dict(base, preprocessed=str(data["preprocessed"])), work, env, rnd)
    out["pretrain_orthonet"]["patches_per_s"] = out["pretrain_orthonet"]["batch_size"] * \
        out["pretrain_orthonet"]["it_per_s"]
    log("pretrain_orthonet", out["pretrain_orthonet"])
    for fn in ([pred_ortho, pred_nnunet] if rnd % 2 == 0 else [pred_nnunet, pred_ortho]):
        fn()
    return out


def _log_line(rnd: int, repeats: int):
    def log(name: str, r: Dict) -> None:
        if "step_s" in r:
            extra = f", {r['patches_per_s']:.2f} patches/s" if "patches_per_s" in r else ""
            print(f"round {rnd + 1}/{repeats} {name:19s}: {r['step_s']:7.3f} s/it ({r['it_per_s']:.3f} it/s{extra}), "
                  f"peak {r['peak_pss_mb']:6.0f} MB, process {r['wall_s']:.0f} s", flush=True)
        else:
            print(f"round {rnd + 1}/{repeats} {name:19s}: {r['s_per_case']:7.2f} s/case, peak {r['peak_pss_mb']:6.0f} MB",
                  flush=True)
    return log


# ------------------------------------------------------------------------------------------------------------
# summary and report
# ------------------------------------------------------------------------------------------------------------
def summarise(rounds: List[Dict[str, Dict]]) -> Dict:
    def med(name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in rounds)

    s = {name: {key: med(name, key) for key in ("step_s", "it_per_s", "peak_pss_mb", "wall_s", "s_per_case",
                                                 "patches_per_s", "flops_per_step") if key in rounds[0][name]}
         for name in rounds[0]}
    for name, r in s.items():           # utilisation of the median step (the FLOPs of a step do not vary)
        if "step_s" in r:
            r.update(utilisation(r.get("flops_per_step"), r["step_s"], rounds[0][name].get("device_name")))
    ratios = {"seg_step": s["seg_orthonet"]["step_s"] / s["seg_nnunet"]["step_s"],
              "seg_peak_memory": s["seg_orthonet"]["peak_pss_mb"] / s["seg_nnunet"]["peak_pss_mb"],
              "predict": s["predict_orthonet"]["s_per_case"] / s["predict_nnunet"]["s_per_case"],
              "predict_peak_memory": s["predict_orthonet"]["peak_pss_mb"] / s["predict_nnunet"]["peak_pss_mb"],
              "multitask_vs_seg": s["multitask_orthonet"]["step_s"] / s["seg_orthonet"]["step_s"]}
    verdicts = {k: ("met" if ratios[k] <= t else "NOT met") for k, t in TARGETS.items()}
    return {"medians": s, "ratios": ratios, "verdicts": verdicts}


def command_line(argv: Optional[Sequence[str]]) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return "python benchmarks/bench_throughput.py" + ("".join(" " + shlex.quote(a) for a in args))


def print_summary(summary: Dict, plans: Dict[str, Dict]) -> None:
    print("\nplans:")
    for name, pl in plans.items():
        print(f"  {name:34s}: patch {pl['patch_size']}, batch {pl['batch_size']}, spacing {pl['spacing']}, "
              f"features {pl['features_per_stage']}")
    r, v = summary["ratios"], summary["verdicts"]
    print(f"\northonet / nnU-Net: segmentation step {r['seg_step']:.2f}x (target <= {TARGETS['seg_step']}: "
          f"{v['seg_step']}), peak memory {r['seg_peak_memory']:.2f}x; prediction {r['predict']:.2f}x per case "
          f"(target <= {TARGETS['predict']}: {v['predict']}); multitask / segmentation step "
          f"{r['multitask_vs_seg']:.2f}x (target <= {TARGETS['multitask_vs_seg']}: {v['multitask_vs_seg']}); "
          f"pretraining {summary['medians']['pretrain_orthonet']['patches_per_s']:.2f} patches/s", flush=True)


def section_body(args: argparse.Namespace, summary: Dict, plans: Dict[str, Dict], rounds: List[Dict], data: Dict,
                 cmd: str) -> str:
    from benchmarks.report import machine_line

    m, r, v = summary["medians"], summary["ratios"], summary["verdicts"]

    def runs(name: str, key: str, fmt: str = "{:.2f}") -> str:
        return ", ".join(fmt.format(x[name][key]) for x in rounds)

    plan_rows = "\n".join(f"| {n} | {p['spacing']} | {p['patch_size']} | {p['batch_size']} | "
                          f"{p['features_per_stage']} |" for n, p in plans.items())
    pre = rounds[0]["pretrain_orthonet"]
    mirrors = (f"orthonet mirrors axes {rounds[0]['seg_orthonet']['mirror_axes'].get(data['view'])}, nnU-Net axes "
               f"{rounds[0]['seg_nnunet']['mirror_axes']}")
    nn_plan = ("nnU-Net trained on its own plan (`--no-align`)." if args.no_align else
               f"nnU-Net trained on `{ALIGNED_PLANS}`: its own plan with orthonet's patch, batch and U-Net widths "
               "(its planner has no width option), so both train the same `PlainConvUNet`.")
    return f"""## Throughput: training step, pretraining and prediction, orthonet vs nnU-Net

- Date: {_dt.date.today().isoformat()}; machine: {machine_line()}; device `{args.device}`. The machine may be
  shared, so absolute times are noisy: every measurement ran {args.repeats} time(s), orthonet and nnU-Net
  alternately (order flipped every round); tables show medians over rounds (each round in brackets).
- Data: {args.cases} synthetic knees (`orthonet.synthetic`, size `{args.size}`), planned with
  `ortho_plan_and_preprocess {args.plan_args}`; the `{data['view']}` view exported in nnU-Net's format and
  planned with `nnUNetv2_plan_and_preprocess -c 3d_fullres -gpu_memory_target {args.nnunet_gpu_memory_target:g}`
  (nnunetv2 {NNUNET_VERSION}). {nn_plan}
- Training steps: {args.iterations} iterations per run, the first {args.warmup} left out; each iteration timed
  around `train_step(next(loader))` (loading, augmentation, forward, backward, optimizer), fold 0,
  {args.num_workers} data-loading workers for both, {args.threads} torch threads. s/it is the median
  iteration, it/s the timed iterations over their total time. nnU-Net: `nnUNetTrainer` from
  `get_trainer_from_args`, `on_train_start()`, steps, `on_train_end()`; orthonet: the trainer's `setup()`,
  `build_train_loader()` and `train_step` (`--pretrained none`). Peak memory: the largest process-tree PSS
  (sampled every 50 ms, `bench_preprocess.run_measured`) over the whole process, set-up included.
- Prediction: `ortho_predict --no-overview -npp 1` vs `nnUNetv2_predict -npp 1 -nps 1`, mirroring TTA on
  ({mirrors}), fold 0 of the runs above, {len(data['predict_cases'])} test case(s); s/case is the CLI's wall
  time over the cases (start-up and model loading included).
- Command: `{cmd}`

| plan | spacing (mm) | patch | batch | features per stage |
|---|---|---|---|---|
{plan_rows}

| measurement | orthonet | nnU-Net | orthonet / nnU-Net | target |
|---|---|---|---|---|
| segmentation step (s/it) | {m['seg_orthonet']['step_s']:.3f} ({runs('seg_orthonet', 'step_s', '{:.3f}')}) | {m['seg_nnunet']['step_s']:.3f} ({runs('seg_nnunet', 'step_s', '{:.3f}')}) | **{r['seg_step']:.2f}** | <= {TARGETS['seg_step']}: {v['seg_step']} |
| segmentation iterations/s | {m['seg_orthonet']['it_per_s']:.3f} | {m['seg_nnunet']['it_per_s']:.3f} | | |
| segmentation training peak memory (MB PSS) | {m['seg_orthonet']['peak_pss_mb']:.0f} | {m['seg_nnunet']['peak_pss_mb']:.0f} | {r['seg_peak_memory']:.2f} | |
| prediction with TTA (s/case) | {m['predict_orthonet']['s_per_case']:.2f} ({runs('predict_orthonet', 's_per_case')}) | {m['predict_nnunet']['s_per_case']:.2f} ({runs('predict_nnunet', 's_per_case')}) | **{r['predict']:.2f}** | <= {TARGETS['predict']}: {v['predict']} |
| prediction peak memory (MB PSS) | {m['predict_orthonet']['peak_pss_mb']:.0f} | {m['predict_nnunet']['peak_pss_mb']:.0f} | {r['predict_peak_memory']:.2f} | |

| orthonet only | time | rate | peak memory (MB PSS) | ratio | target |
|---|---|---|---|---|---|
| `MultitaskTrainer` step (views {', '.join(rounds[0]['multitask_orthonet']['views'])}) | {m['multitask_orthonet']['step_s']:.3f} s/it ({runs('multitask_orthonet', 'step_s', '{:.3f}')}) | {m['multitask_orthonet']['it_per_s']:.3f} it/s | {m['multitask_orthonet']['peak_pss_mb']:.0f} | **{r['multitask_vs_seg']:.2f}x** the segmentation step | <= {TARGETS['multitask_vs_seg']}: {v['multitask_vs_seg']} |
| pretraining step (`DiffusionPretrainer`, {pre['view']}, patch {pre['patch_size']}, batch {pre['batch_size']}) | {m['pretrain_orthonet']['step_s']:.3f} s/step ({runs('pretrain_orthonet', 'step_s', '{:.3f}')}) | {m['pretrain_orthonet']['patches_per_s']:.2f} patches/s | {m['pretrain_orthonet']['peak_pss_mb']:.0f} | | |
{flops_table(summary, rounds)}
"""


#: rows of the FLOP table: measurement name -> what it is
FLOP_ROWS = {"seg_orthonet": "orthonet `SegTrainer` step", "seg_nnunet": "nnU-Net `nnUNetTrainer` step",
             "multitask_orthonet": "orthonet `MultitaskTrainer` step",
             "pretrain_orthonet": "orthonet pretraining step"}


def flops_table(summary: Dict, rounds: List[Dict]) -> str:
    """Model FLOPs per training step (``benchmarks.common.count_flops``: one extra step after the timed ones),
    achieved TFLOP/s at the median step, and MFU against the device's bf16 dense peak (GPUs only)."""
    m = summary["medians"]
    device = rounds[0]["seg_orthonet"].get("device_name", "cpu")
    rows = []
    for name, label in FLOP_ROWS.items():
        r = m.get(name, {})
        if not r.get("flops_per_step"):
            continue
        mfu = "n/a (no bf16 peak known for this device)" if r.get("mfu") is None else f"**{100 * r['mfu']:.1f} %**"
        rows.append(f"| {label} | {r['flops_per_step'] / 1e9:.1f} | {r['tflops_per_s']:.3f} | {mfu} |")
    if not rows:
        return ""
    return ("Model FLOPs (forward + backward convolutions and matrix products counted by "
            f"`torch.utils.flop_counter` on one step; device `{device}`; MFU target >= 40 % on an H100):\n\n"
            "| training step | GFLOP per step | achieved TFLOP/s | MFU (bf16 dense peak) |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.driver is not None:
        return driver_main(args.driver)
    t_start = time.time()
    work = args.work.resolve()
    env = environment(work)
    nnunet_bin = ensure_nnunet_venv(args.venv.resolve()).parent
    data = prepare_data(args, work, env, nnunet_bin)
    plans = compare_plans(data["ortho_plans"], data["nnunet_preprocessed"], aligned=not args.no_align)
    plans_id = "nnUNetPlans" if args.no_align else ALIGNED_PLANS
    for name, pl in plans.items():
        print(f"[plan] {name:34s}: patch {pl['patch_size']}, batch {pl['batch_size']}, spacing {pl['spacing']}, "
              f"features {pl['features_per_stage']}", flush=True)

    rounds = []
    for rnd in range(args.repeats):
        rounds.append(one_round(rnd, args, work, env, data, str(nnunet_bin / "python"), nnunet_bin, plans_id,
                                _log_line(rnd, args.repeats)))
    summary = summarise(rounds)
    print_summary(summary, plans)
    cmd = command_line(argv)
    results = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "command": cmd,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "nnunet_version": NNUNET_VERSION, "nnunet_plans": plans_id, "plans": plans,
               "predict_cases": data["predict_cases"], "targets": TARGETS, **summary,
               "rounds": rounds,
               "elapsed_s": time.time() - t_start}
    (work / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(f"results: {work / 'results.json'} ({time.time() - t_start:.0f} s)")
    if not args.no_write:
        from benchmarks.report import write_section
        print(f"wrote {write_section('bench_throughput', section_body(args, summary, plans, rounds, data, cmd))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
