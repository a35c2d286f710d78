"""``ortho_make_synthetic``: generate a realistic multi-view knee / ankle / shoulder dataset.

Example: ``ortho_make_synthetic --joint knee -d 101 --train 20 --test 5 --unlabeled 10 --seed 0 --size small``
writes ``$ORTHO_raw/Dataset101_Knee``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

from orthonet.cli_utils import run_cli
from orthonet.errors import OrthoError
from orthonet.paths import raw_root
from orthonet.synthetic.acquisition import PRESETS
from orthonet.synthetic.joints import get_joint, joint_names
from orthonet.synthetic.writer import make_dataset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ortho_make_synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--joint", default="knee", choices=list(joint_names()), help="which joint (default knee)")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="dataset id: writes DatasetXXX_Name")
    p.add_argument("--name", default=None, help="dataset name (default Knee / Ankle / Shoulder)")
    p.add_argument("--train", type=int, default=20, help="labelled training cases (default 20)")
    p.add_argument("--test", type=int, default=5, help="test cases; ground truth goes to labelsTs/ and "
                                                      "diagnosesTs.csv (default 5)")
    p.add_argument("--unlabeled", type=int, default=0, help="unlabeled cases for pretraining (default 0)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--size", default="default", choices=sorted(PRESETS),
                   help="resolution preset: default (realistic), small (demo), tiny (tests)")
    p.add_argument("--centers", type=int, default=2, help="number of scanner sites (default 2)")
    p.add_argument("--in-plane-mm", type=float, default=None, help="override the in-plane pixel spacing")
    p.add_argument("--slice-mm", type=float, default=None, help="override the slice thickness")
    p.add_argument("-o", "--out-root", default=None, help="folder to write into (default $ORTHO_raw)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="worker processes (default 1); the "
                                                                       "result does not depend on it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.dataset_id <= 999:
        raise OrthoError(f"dataset id must be between 1 and 999 (got {args.dataset_id})")
    model = get_joint(args.joint)
    name = args.name or model.dataset_name
    if "_" in name or "/" in name or not name:
        raise OrthoError(f"dataset name '{name}' may not be empty or contain '_' or '/'",
                         fix="use letters and digits, e.g. --name Knee")
    root = Path(args.out_root).expanduser() if args.out_root else raw_root()
    out_dir = root / f"Dataset{args.dataset_id:03d}_{name}"
    t0 = time.perf_counter()
    make_dataset(out_dir, joint=model.name, n_train=args.train, n_test=args.test, n_unlabeled=args.unlabeled,
                 seed=args.seed, size=args.size, n_centers=args.centers, num_processes=args.num_processes,
                 overwrite=args.overwrite, progress=not args.quiet, in_plane_mm=args.in_plane_mm,
                 slice_mm=args.slice_mm)
    n = args.train + args.test + args.unlabeled
    print(f"wrote {out_dir} ({n} cases, {time.perf_counter() - t0:.1f} s)")
    return 0


cli = run_cli(main)

if __name__ == "__main__":
    from orthonet.cli_utils import entry_point
    entry_point(cli)
