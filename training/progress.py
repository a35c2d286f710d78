"""Per-epoch training record: a JSON of scalars, ``progress.png`` and a log file.

Why a JSON next to the PNG: a resumed run (``--c``) reloads it and continues the curves instead of starting a new
plot, and users can re-plot or compare runs without parsing log text. Records are dicts such as::

    {"epoch": 3, "train_loss": 0.71, "val_loss": 0.80, "lr": 0.0098, "epoch_time": 41.2,
     "dice": {"femur": 0.91, "tibia": 0.88}, "auc": {"acl_tear": 0.77}}

Scalars are plotted by name (``*loss*`` in the loss panel, ``lr`` in the LR panel); the ``dice`` and ``auc`` dicts
get one line per structure / diagnosis plus their mean.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from orthonet.fileio import atomic_path, load_json, save_json
from orthonet.logging_utils import get_logger

PathLike = Union[str, Path]


def _matplotlib():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, dict):
        return {str(k): _finite_or_none(x) for k, x in v.items()}
    return v


def _nanmean(values) -> float:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else float("nan")


class ProgressLogger:
    """Collects per-epoch scalars in ``out_dir/progress.json``, plots ``progress.png``, logs to ``log.txt``.

    ``enabled=False`` (non-main DDP ranks) turns every method into a no-op.
    """

    def __init__(self, out_dir: PathLike, enabled: bool = True, json_name: str = "progress.json",
                 png_name: str = "progress.png", log_name: str = "log.txt", console: bool = True,
                 title: Optional[str] = None):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.json_path = self.out_dir / json_name
        self.png_path = self.out_dir / png_name
        self.log_path = self.out_dir / log_name
        self.title = title
        self.records: List[Dict[str, Any]] = []
        self._logger = None
        if enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._logger = get_logger(f"progress.{self.out_dir.resolve()}", self.log_path, console=console)
            if self.json_path.is_file():
                data = load_json(self.json_path, "progress file")
                self.records = list(data.get("epochs", [])) if isinstance(data, dict) else []

    # ---- recording ---------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        """One timestamped line in the log file (and on the console)."""
        if self._logger is not None:
            self._logger.info(message)

    def truncate(self, first_epoch_to_drop: int) -> None:
        """Forget epochs >= ``first_epoch_to_drop`` (on resume from a checkpoint older than the last record)."""
        if self.enabled:
            self.records = [r for r in self.records if int(r.get("epoch", -1)) < first_epoch_to_drop]

    def log_epoch(self, epoch: int, plot: bool = True, **metrics: Any) -> Dict[str, Any]:
        """Record one epoch (replacing an existing record of the same epoch), save JSON (atomic), re-plot."""
        record = {"epoch": int(epoch), **{k: _finite_or_none(v) for k, v in metrics.items()}}
        if not self.enabled:
            return record
        self.records = [r for r in self.records if int(r.get("epoch", -1)) != int(epoch)]
        self.records.append(record)
        self.records.sort(key=lambda r: r["epoch"])
        save_json({"epochs": self.records}, self.json_path)
        if plot:
            self.plot()
        return record

    def series(self, key: str, sub: Optional[str] = None) -> (List[int], List[float]):
        """(epochs, values) of a scalar, or of one entry of a dict-valued metric (``series('dice', 'femur')``)."""
        xs, ys = [], []
        for r in self.records:
            v = r.get(key)
            if sub is not None:
                v = v.get(sub) if isinstance(v, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                xs.append(r["epoch"])
                ys.append(float(v))
        return xs, ys

    def _dict_keys(self, key: str) -> List[str]:
        keys: List[str] = []
        for r in self.records:
            if isinstance(r.get(key), dict):
                keys.extend(k for k in r[key] if k not in keys)
        return keys

    # ---- plotting ----------------------------------------------------------------------------------------
    def plot(self) -> Optional[Path]:
        """Write ``progress.png``: losses, learning rate, Dice per structure + mean, AUC per diagnosis + mean."""
        if not self.enabled or not self.records:
            return None
        plt = _matplotlib()
        scalar_keys: List[str] = []
        for r in self.records:
            for k, v in r.items():
                if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and k not in scalar_keys:
                    scalar_keys.append(k)
        loss_keys = [k for k in scalar_keys if "loss" in k]
        panels = []
        if loss_keys:
            panels.append(("loss", loss_keys))
        if "lr" in scalar_keys:
            panels.append(("learning rate", ["lr"]))
        for key, title in (("dice", "Dice (validation)"), ("auc", "AUC (validation)")):
            if self._dict_keys(key):
                panels.append((title, key))
        if not panels:
            return None
        fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
        for ax, (title, what) in zip(axes[:, 0], panels):
            if isinstance(what, list):
                for k in what:
                    ax.plot(*self.series(k), marker=".", label=k)
            else:
                names = self._dict_keys(what)
                for n in names:
                    ax.plot(*self.series(what, n), alpha=0.6, lw=1, label=n)
                xs = [r["epoch"] for r in self.records if isinstance(r.get(what), dict)]
                means = [_nanmean(r[what].values()) for r in self.records if isinstance(r.get(what), dict)]
                ax.plot(xs, means, color="black", lw=2.5, label="mean")
                ax.set_ylim(-0.02, 1.02)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=min(4, max(1, len(ax.get_lines()) // 6 + 1)), loc="best")
        if self.title:
            fig.suptitle(self.title)
        fig.tight_layout()
        with atomic_path(self.png_path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=90, format="png")
        plt.close(fig)
        return self.png_path


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (shorter windows at the start), for noisy per-step loss curves."""
    v = np.asarray(values, dtype=float)
    if v.size == 0 or window <= 1:
        return v
    c = np.cumsum(np.r_[0.0, v])
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def loss_curve_png(values: Sequence[float], path: PathLike, title: str = "training loss",
                   steps: Optional[Sequence[int]] = None, window: Optional[int] = None, log_y: bool = True) -> Path:
    """Plot a per-step loss (raw and smoothed) to ``path`` atomically (pretraining's loss curve)."""
    plt = _matplotlib()
    v = np.asarray(values, dtype=float)
    x = np.arange(v.size) if steps is None else np.asarray(steps)
    window = window or max(1, v.size // 50)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(x, v, alpha=0.3, lw=0.8, label="loss")
    if v.size:
        ax.plot(x, moving_average(v, window), lw=2, label=f"moving average ({window})")
    if log_y and v.size and np.all(v[np.isfinite(v)] > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return Path(path)
