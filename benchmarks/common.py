"""Steps several benchmarks share: parsing number lists, generating + planning a synthetic dataset once, running
one measurement per process from a job file, and counting a training step's model FLOPs for its utilisation (light
imports only: drivers also run under nnU-Net's Python)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple


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


def driver_job(script: Path, job: Dict, job_path: Path, python: str = sys.executable) -> Tuple[Dict, List[str]]:
    """Write ``job`` to ``job_path`` with its result file (``out``, beside it; an old one removed) and return the
    job and the command ``python script --driver job_path``.

    Why a process per measurement: each gets a fresh allocator and thread pool, its peak memory can be sampled
    from outside, and two of them can run at the same time (parallel views)."""
    job = dict(job, out=str(job_path.with_name(job_path.stem + ".result.json")))
    Path(job["out"]).unlink(missing_ok=True)
    job_path.parent.mkdir(parents=True, exist_ok=True)
    job_path.write_text(json.dumps(job, indent=1), encoding="utf-8")
    return job, [python, str(Path(script).resolve()), "--driver", str(job_path)]


def write_driver_result(job: Dict, result: Dict) -> None:
    """The driver's side: ``result`` to ``job['out']``, atomically (a killed driver leaves no half-written file)."""
    tmp = Path(job["out"]).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    os.replace(tmp, job["out"])


def driver_result(job: Dict, code: int, what: str, log: str = "its output above") -> Dict:
    """The result a driver wrote, or one clear error naming the measurement and where its log is."""
    if code != 0 or not Path(job["out"]).is_file():
        raise SystemExit(f"{what} failed (exit code {code}); see {log}")
    return json.loads(Path(job["out"]).read_text(encoding="utf-8"))


#: Dense (no sparsity) bf16 tensor-core peak in FLOP/s by a fragment of ``torch.cuda.get_device_name()``, from
#: NVIDIA's data sheets; the first fragment found wins, so the specific names come before "H100".
BF16_PEAK_FLOPS: Tuple[Tuple[str, float], ...] = (
    ("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100 NVL", 835.0e12), ("H100", 989.4e12),
    ("A100", 312.0e12), ("L40S", 362.05e12), ("A10G", 70.0e12))


def bf16_peak_flops(device_name: Optional[str]) -> Optional[float]:
    """The bf16 dense peak of a named GPU, or None (a CPU, an unknown card): then no utilisation is claimed."""
    for fragment, peak in BF16_PEAK_FLOPS:
        if device_name and fragment.lower() in device_name.lower():
            return peak
    return None


def count_flops(step: Callable[[], object]) -> int:
    """Model FLOPs of one call of ``step`` (forward and backward convolutions and matrix products, as
    ``torch.utils.flop_counter`` counts them; elementwise ops and the optimizer are left out, the usual MFU
    convention). Why a counter and not a formula: the trainers differ (deep supervision, pyramid head, three
    encoders), and the counter sees what really ran."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def utilisation(flops_per_step: Optional[float], step_s: float,
                device_name: Optional[str]) -> Dict[str, Optional[float]]:
    """Achieved TFLOP/s of a step and its model-FLOPs utilisation against the device's bf16 peak (None where the
    peak is unknown, e.g. on a CPU)."""
    if not flops_per_step or step_s <= 0:
        return {"tflops_per_s": None, "mfu": None}
    achieved = flops_per_step / step_s
    peak = bf16_peak_flops(device_name)
    return {"tflops_per_s": achieved / 1e12, "mfu": achieved / peak if peak else None}
