"""Self-supervised diffusion pretraining of one view's U-Net (``ortho_pretrain``), and loading its EMA denoiser.

Why a trainer of its own: pretraining has no labels, no folds and no validation; what it shares with the task
trainers are the small parts (data loaders, schedules, checkpoints, DDP helpers, runtime), which it composes.
Each piece is a method a subclass can replace alone: :meth:`DiffusionPretrainer.build_schedule` (e.g. a linear
noise schedule), :meth:`~DiffusionPretrainer.compute_loss` (e.g. a weighted loss), ``prediction_type`` in the
settings (epsilon or v), :meth:`~DiffusionPretrainer.build_optimizer`, :meth:`~DiffusionPretrainer.build_loader` ...

Reproducibility and resume (docs/pretraining.md): training runs in *segments* of ``save_every`` steps. At the start
of each segment the data loader and the diffusion-noise generator are re-seeded from ``(seed, rank, step)``, and
``checkpoint_latest.pt`` is written at every segment end. A run resumed with ``--c`` therefore continues with exactly
the batches, noise and optimizer state an uninterrupted run would have had (bit-identical on CPU).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from orthonet.diffusion import DEFAULT_T, EMA, PREDICTION_TYPES, NoiseSchedule, diffusion_loss, extract_features
from orthonet.diffusion.ema import unwrap
from orthonet.errors import OrthoError
from orthonet.logging_utils import get_logger
from orthonet.networks import DiffusionUNet, network_spec
from orthonet.paths import preprocessed_dataset_dir, resolve_dataset_name
from orthonet.planners.plans import DEFAULT_PLANS_NAME, data_folder, load_plans
from orthonet.training import distributed as dist_utils
from orthonet.training.checkpoint import apply_checkpoint, load_checkpoint, save_checkpoint
from orthonet.training.data import BatchLoader, PreprocessedCaseStore
from orthonet.training.data.factory import make_pretraining_loader
from orthonet.training.pretrained import network_hash, pretrain_view_dir, save_encoder_file
from orthonet.training.progress import loss_curve_png
from orthonet.training.runtime import autocast, default_num_workers, memory_format_for, seed_everything
from torch.optim.lr_scheduler import LambdaLR

from orthonet.training.schedules import cosine_warmup_schedule

PathLike = Union[str, Path]
CHECKPOINT_KIND = "orthonet-diffusion-pretraining"
LATEST, FINAL, ENCODER = "checkpoint_latest.pt", "checkpoint_final.pt", "encoder.pt"
#: The splits pretraining may read (never ``Ts``: test images are not preprocessed, and we check anyway).
PRETRAIN_SPLITS = ("Tr", "Unlabeled")


# ------------------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------------------
@dataclass
class PretrainSettings:
    """Everything that shapes a pretraining run besides the plan (stored in every checkpoint).

    ``lr`` is the single-process learning rate; under DDP it is scaled by ``lr_scaling`` ('sqrt' by default, see
    :func:`orthonet.training.distributed.scale_lr`) because the effective batch grows with the number of ranks.
    ``batch_size`` is per rank (None: the plan's batch size).
    """

    steps: int = 50_000
    batch_size: Optional[int] = None
    lr: float = 2e-4
    lr_scaling: str = "sqrt"
    weight_decay: float = 1e-4
    warmup_steps: int = 500            # capped at steps // 10
    min_lr_factor: float = 0.1         # cosine decay ends at lr * min_lr_factor
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    prediction_type: str = "epsilon"
    noise_schedule: str = "cosine"
    timesteps: int = 1000
    feature_timestep: int = DEFAULT_T  # encoder.pt folds the FiLM at this t
    save_every: int = 500
    log_every: int = 50
    num_workers: Optional[int] = None  # None: orthonet.training.runtime.default_num_workers()
    seed: int = 12345
    mirror_axes: Optional[List[int]] = None   # None: every spatial axis
    patch_size: Optional[List[int]] = None    # None: the plan's; smaller patches make CPU pretraining affordable
    intensity_jitter: float = 0.1
    progress: bool = True

    def validate(self) -> "PretrainSettings":
        if self.steps < 1:
            raise OrthoError(f"--steps must be at least 1 (got {self.steps})")
        if self.save_every < 1:
            raise OrthoError(f"--save-every must be at least 1 (got {self.save_every})")
        if self.batch_size is not None and self.batch_size < 1:
            raise OrthoError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if not self.lr > 0:
            raise OrthoError(f"--lr must be positive (got {self.lr})")
        if self.prediction_type not in PREDICTION_TYPES:
            raise OrthoError(f"unknown prediction type '{self.prediction_type}'",
                             fix=f"use one of {', '.join(PREDICTION_TYPES)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise OrthoError(f"--ema-decay must lie in [0, 1) (got {self.ema_decay})")
        if self.patch_size is not None and (not self.patch_size or any(int(p) < 1 for p in self.patch_size)):
            raise OrthoError(f"--patch-size must be positive integers (got {self.patch_size})")
        if not 0 <= self.feature_timestep < self.timesteps:
            raise OrthoError(f"feature timestep {self.feature_timestep} is outside [0, {self.timesteps - 1}]")
        return self

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "PretrainSettings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def segment_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the data loader and noise generator for the segment starting at ``step`` on ``rank``."""
    digest = hashlib.sha256(f"{int(seed)}/{int(rank)}/{int(step)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2 ** 63)


def share_aliases(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Make keys that alias one tensor in ``model`` (DNA's ``all_modules.N`` duplicates) share one tensor again in
    ``state_dict`` (e.g. after folding, which clones each key), so ``torch.save`` stores it once."""
    first: Dict[int, str] = {}
    out = dict(state_dict)
    for k, v in model.state_dict(keep_vars=True).items():
        if k not in out:
            continue
        ident = id(v)
        if ident in first and tuple(out[first[ident]].shape) == tuple(out[k].shape):
            out[k] = out[first[ident]]
        else:
            first.setdefault(ident, k)
    return out


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (in state-dict order): equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for k, v in unwrap(model).state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------------------
class DiffusionPretrainer:
    """Pretrain the denoiser of one view and configuration; writes checkpoints, ``encoder.pt``, ``loss.png`` and
    ``log.txt`` to ``output_dir`` (rank 0 only).

    Call :meth:`run`. Override one ``build_*``/``compute_loss`` method to change one thing.
    """

    def __init__(self, plans: Dict, configuration: str, view: str, preprocessed_dir: PathLike,
                 output_dir: PathLike, settings: Optional[PretrainSettings] = None,
                 device: Union[str, torch.device] = "cpu"):
        self.plans = plans
        self.dataset_name = plans["dataset_name"]
        self.plans_name = plans.get("plans_name", DEFAULT_PLANS_NAME)
        self.configuration = configuration
        self.view = view
        self.preprocessed_dir = Path(preprocessed_dir)
        self.output_dir = Path(output_dir)
        self.settings = (settings or PretrainSettings()).validate()
        self.device = torch.device(device)
        self.spec = network_spec(plans, view, configuration)
        self.view_plan = plans["views"][view]
        self.config_plan = self.view_plan["configurations"][configuration]
        self.input_channels = int(self.view_plan["num_input_channels"])
        self.rank = dist_utils.rank()
        self.world_size = dist_utils.world_size()
        self.is_main = dist_utils.is_main_process()
        self.batch_size = int(self.settings.batch_size or self.config_plan["batch_size"])
        self.lr = dist_utils.scale_lr(self.settings.lr, self.world_size, self.settings.lr_scaling)
        self.step = 0
        self.loss_history: List[float] = []
        self.logger = get_logger(f"pretrain.{self.output_dir.resolve()}",
                                 self.output_dir / "log.txt" if self.is_main else None, console=False)
        self._first_batch_digest: Optional[str] = None

    # ---- pieces a subclass may replace -------------------------------------------------------------------
    def build_network(self) -> DiffusionUNet:
        """The plan's U-Net for this view with timestep FiLM (docs/networks.md)."""
        return DiffusionUNet(self.spec, self.input_channels)

    def build_schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.settings.timesteps, self.settings.noise_schedule)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters; no weight decay on 1-D parameters (norm affines, biases)."""
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.settings.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr, betas=(0.9, 0.999))

    def build_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> LambdaLR:
        """Linear warm-up, then cosine decay to ``lr * min_lr_factor`` (a pure function of the step)."""
        warmup = min(self.settings.warmup_steps, self.settings.steps // 10)
        return cosine_warmup_schedule(optimizer, self.settings.steps, warmup, self.settings.min_lr_factor)

    def build_ema(self, model: nn.Module) -> EMA:
        return EMA(model, decay=self.settings.ema_decay, warmup=True)

    def training_cases(self, store: PreprocessedCaseStore) -> List[str]:
        """Every preprocessed case of this view from imagesTr and imagesUnlabeled (never imagesTs)."""
        cases = [c for c in store.cases(views=[self.view]) if store.split_of(c, [self.view]) in PRETRAIN_SPLITS]
        if not cases:
            raise OrthoError(f"no preprocessed images of view '{self.view}' ({self.configuration}) to pretrain on",
                             store.folder, fix=f"run `ortho_plan_and_preprocess -d {self.dataset_name} -c "
                                               f"{self.configuration}` first")
        return cases

    def build_loader(self, store: PreprocessedCaseStore, cases: Sequence[str], seed: int) -> BatchLoader:
        """Random patches of the plan's patch size with light augmentation (mirroring, intensity jitter)."""
        workers = default_num_workers() if self.settings.num_workers is None else int(self.settings.num_workers)
        return make_pretraining_loader(store, cases, self.plans, self.view, self.configuration,
                                       batch_size=self.batch_size, mirror_axes=self.settings.mirror_axes,
                                       intensity_jitter=self.settings.intensity_jitter, num_workers=workers,
                                       seed=seed, pin_memory=self.device.type == "cuda",
                                       patch_size=self.spec_patch())

    def compute_loss(self, model: nn.Module, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """MSE between the network output and the epsilon / v target at uniformly drawn t."""
        return diffusion_loss(model, self.schedule, x0, self.settings.prediction_type, generator=generator)

    def on_step_end(self, step: int, loss: float) -> None:
        """Called after every optimizer step (``step`` = steps done). A hook for subclasses; does nothing."""

    # ---- identity ----------------------------------------------------------------------------------------
    def identity(self) -> Dict:
        """What the weights are: stored in every checkpoint, checked on resume, used to rebuild the denoiser."""
        return {"kind": CHECKPOINT_KIND, "dataset_name": self.dataset_name, "plans_name": self.plans_name,
                "configuration": self.configuration, "view": self.view,
                "network_json": json.dumps(self.spec, sort_keys=True), "network_hash": network_hash(self.spec),
                "input_channels": self.input_channels, "time_embed_dim": int(unwrap(self.model).time_embed_dim),
                "prediction_type": self.settings.prediction_type,
                "noise_schedule": {"kind": self.schedule.kind, "T": self.schedule.T},
                "feature_timestep": int(self.settings.feature_timestep),
                "patch_size": self.spec_patch()}

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def check_patch(self) -> None:
        """A custom ``--patch-size`` must have the plan's dimensionality and fit the network's strides (the U-Net's
        skip connections need every axis divisible by its total stride)."""
        if self.settings.patch_size is None:
            return
        from orthonet.networks.whole_exam import total_stride
        patch, planned = self.spec_patch(), [int(p) for p in self.config_plan["patch_size"]]
        stride = total_stride(self.spec)
        if len(patch) != len(planned) or any(p % s for p, s in zip(patch, stride)):
            fitted = [max(s, (p + s - 1) // s * s) for p, s in zip(patch + planned[len(patch):], stride)]
            raise OrthoError(f"--patch-size {patch} does not fit the {self.view} network: it needs "
                             f"{len(planned)} numbers, each a multiple of the network's total stride {stride}",
                             fix=f"use e.g. --patch-size {' '.join(map(str, fitted))} (the plan's patch is "
                                 f"{' '.join(map(str, planned))})")

    def setup(self) -> None:
        """Build network, EMA, optimizer, LR schedule and the case list (same initial weights on every rank)."""
        self.check_patch()
        seed_everything(self.settings.seed)
        model = self.build_network()
        self.ema = self.build_ema(model)
        model = model.to(self.device, memory_format=memory_format_for(len(self.spec_patch()) + 2, self.device))
        self.model = dist_utils.wrap_ddp(model, self.device)
        self.schedule = self.build_schedule()
        self.optimizer = self.build_optimizer(self.model)
        self.lr_scheduler = self.build_lr_scheduler(self.optimizer)
        self.store = PreprocessedCaseStore(data_folder(self.preprocessed_dir, self.plans, self.view,
                                                       self.configuration), [self.view])
        self.cases = self.training_cases(self.store)

    def spec_patch(self) -> List[int]:
        """The pretraining patch: ``settings.patch_size`` when set, else the plan's."""
        return [int(p) for p in (self.settings.patch_size or self.config_plan["patch_size"])]

    def resume(self, checkpoint: PathLike) -> None:
        """Continue from a checkpoint of this view (model, EMA, optimizer, LR step, RNG states, loss history)."""
        ckpt = load_checkpoint(checkpoint, map_location=self.device)
        extra = ckpt.get("extra") or {}
        if extra.get("kind") != CHECKPOINT_KIND:
            raise OrthoError("not a diffusion-pretraining checkpoint", checkpoint,
                             fix="delete the folder to start over, or point at a Pretrain__ folder")
        mine = self.identity()
        for key in ("network_hash", "input_channels", "prediction_type", "noise_schedule", "view"):
            if extra.get(key) != mine[key]:
                raise OrthoError(f"cannot continue: the checkpoint was trained with {key} = {extra.get(key)!r}, "
                                 f"this run uses {mine[key]!r}", checkpoint,
                                 fix="restore the plans/options of that run, or delete the view folder (or omit "
                                     "--c) to start over")
        apply_checkpoint(ckpt, self.model, self.optimizer, self.lr_scheduler, self.ema, restore_rng=True)
        self.step = int(ckpt["step"])
        history = extra.get("loss_history")
        self.loss_history = [] if history is None else [float(v) for v in history.tolist()]
        self.loss_history = self.loss_history[:self.step]
        old_steps = (extra.get("settings") or {}).get("steps")
        if old_steps is not None and int(old_steps) != self.settings.steps:
            self.log(f"note: the checkpoint was made for {old_steps} steps, continuing towards {self.settings.steps} "
                     "(the cosine LR schedule follows the new total)")
        self.log(f"resumed from {Path(checkpoint).name} at step {self.step}")

    def run(self, resume: bool = False) -> Optional[Path]:
        """Train to ``settings.steps``; returns the ``encoder.pt`` path (rank 0) or None (other ranks)."""
        self.setup()
        latest, final = self.output_dir / LATEST, self.output_dir / FINAL
        if resume:
            source = latest if latest.is_file() else (final if final.is_file() else None)
            if source is None:
                self.log("--c: no checkpoint to continue from, starting from scratch")
            else:
                self.resume(source)
        elif self.is_main and (latest.is_file() or final.is_file()):
            self.log("note: starting from scratch; existing checkpoints in this folder will be overwritten "
                     "(use --c to continue instead)")
        self.log_header()
        s = self.settings
        bar = tqdm(total=s.steps, initial=min(self.step, s.steps), desc=f"pretrain {self.view}", unit="step",
                   disable=not (self.is_main and s.progress), dynamic_ncols=True)
        loader, t_start, steps_start, t_log = None, time.time(), self.step, time.time()
        try:
            while self.step < s.steps:
                if loader is None or self.step % s.save_every == 0:
                    if loader is not None:
                        loader.close()
                    seed = segment_seed(s.seed, self.rank, self.step)
                    loader = self.build_loader(self.store, self.cases, seed)
                    self.generator = torch.Generator().manual_seed(seed)
                loss = self.train_step(next(loader))
                self.step += 1
                bar.update(1)
                if self.step % 10 == 0 or self.step == s.steps:
                    bar.set_postfix(loss=f"{np.mean(self.loss_history[-50:]):.4f}")
                if self.step % s.log_every == 0:
                    rate = s.log_every * self.batch_size * self.world_size / max(1e-9, time.time() - t_log)
                    self.log(f"step {self.step}/{s.steps}  loss {np.mean(self.loss_history[-s.log_every:]):.5f}  "
                             f"lr {self.optimizer.param_groups[0]['lr']:.3g}  {rate:.2f} patches/s")
                    t_log = time.time()
                if self.step % s.save_every == 0 and self.step < s.steps:
                    self.save(latest)
                self.on_step_end(self.step, loss)
        finally:
            bar.close()
            if loader is not None:
                loader.close()
        elapsed = time.time() - t_start
        done = self.step - steps_start
        self.throughput = done * self.batch_size * self.world_size / max(elapsed, 1e-9)
        self.log(f"finished {self.step} steps ({done} in this run, {elapsed:.1f} s, {self.throughput:.2f} patches/s "
                 f"over {self.world_size} rank(s))")
        ranks = self.rank_report()
        self.save(final, ranks)
        if self.is_main:
            for stale in (latest,):
                if stale.is_file():
                    stale.unlink()
            return self.export_encoder()
        return None

    def train_step(self, batch: Dict) -> float:
        """One optimizer step on one batch; returns the loss (mean over ranks)."""
        x0 = batch["data"].to(self.device, non_blocking=True)
        x0 = x0.contiguous(memory_format=memory_format_for(x0.ndim, self.device))
        if self._first_batch_digest is None:
            self._first_batch_digest = hashlib.sha256(x0.detach().cpu().numpy().tobytes()).hexdigest()[:16]
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device):
            loss = self.compute_loss(self.model, x0, self.generator)
        loss.backward()
        # one device-to-host read per step, after backward is queued: the rank-mean loss, which every rank then
        # sees, so a NaN on any rank stops all of them before the optimizer touches the weights
        value = float(dist_utils.all_reduce_mean(loss.detach().float()).item())
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            raise OrthoError(f"the diffusion loss became {value} at step {self.step} (view {self.view})",
                             self.output_dir, fix="lower --lr, or continue with --c from the last checkpoint")
        if self.settings.grad_clip and self.settings.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.ema.update(self.model)
        self.loss_history.append(value)
        return value

    # ---- outputs -----------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.is_main:
            self.logger.info(message)
            if not self.settings.progress:
                print(message, flush=True)

    def log_header(self) -> None:
        s = self.settings
        self.log(f"=== diffusion pretraining: {self.dataset_name} {self.plans_name} {self.configuration} view "
                 f"'{self.view}' ===")
        self.log(f"{len(self.cases)} cases (imagesTr + imagesUnlabeled), patch {self.spec_patch()}, batch "
                 f"{self.batch_size} per rank x {self.world_size} rank(s) = {self.batch_size * self.world_size}, "
                 f"lr {self.lr:.3g} (base {s.lr:g}, '{s.lr_scaling}' scaling), {s.steps} steps, device {self.device}")
        self.log(f"diffusion: T={self.schedule.T} {self.schedule.kind} schedule, {s.prediction_type}-prediction, "
                 f"MSE, AdamW (wd {s.weight_decay:g}), EMA {s.ema_decay:g}, grad clip {s.grad_clip:g}, seed {s.seed}")
        self.log("settings: " + json.dumps(s.to_dict(), sort_keys=True))

    def rank_report(self) -> Dict:
        """Per-rank digests of the weights and of each rank's first batch (DDP sanity: weights must agree, data
        must differ). Gathered on every rank; stored in the final checkpoint."""
        digest = weights_digest(self.model)
        gathered = dist_utils.all_gather_objects({"rank": self.rank, "weights": digest,
                                                  "first_batch": self._first_batch_digest})
        if len({g["weights"] for g in gathered}) != 1:
            raise RuntimeError(f"DDP ranks disagree on the weights after training: {gathered}")
        return {"world_size": self.world_size, "ranks": gathered}

    def save(self, path: Path, rank_report: Optional[Dict] = None) -> None:
        """Atomic checkpoint (rank 0 only) plus the loss curve."""
        if not self.is_main:
            return
        extra = dict(self.identity())
        extra.update({"settings": self.settings.to_dict(), "world_size": self.world_size, "lr": self.lr,
                      "loss_history": torch.tensor(self.loss_history, dtype=torch.float32)})
        if rank_report is not None:
            extra["rank_report"] = rank_report
        save_checkpoint(path, self.model, self.optimizer, self.lr_scheduler, self.ema, step=self.step, extra=extra)
        if self.loss_history:
            loss_curve_png(self.loss_history, self.output_dir / "loss.png",
                           title=f"diffusion loss, {self.view} ({self.configuration})")

    def ema_denoiser(self) -> DiffusionUNet:
        """A copy of the denoiser holding the EMA weights (eval mode, on the CPU)."""
        model = copy.deepcopy(unwrap(self.model)).cpu().float()
        self.ema.copy_to(model)
        return model.eval()

    def export_encoder(self) -> Path:
        """``encoder.pt``: EMA encoder + decoder, FiLM folded at the feature timestep, plus the plan identity."""
        model = self.ema_denoiser()
        t = int(self.settings.feature_timestep)
        path = self.output_dir / ENCODER
        folded = share_aliases(model, model.folded_state_dict(t))
        encoder = {k: v for k, v in folded.items() if k.startswith("encoder.")}
        decoder = {k: v for k, v in folded.items() if k.startswith("decoder.") and not k.startswith("decoder.encoder.")}
        save_encoder_file(path, encoder_state_dict=encoder, decoder_state_dict=decoder, view=self.view,
                          dataset_name=self.dataset_name,
                          plans_name=self.plans_name, configuration=self.configuration, network=self.spec,
                          input_channels=self.input_channels, feature_timestep=t,
                          prediction_type=self.settings.prediction_type, steps=self.step)
        self.log(f"wrote {path} (EMA weights, time conditioning folded at t={t})")
        return path


# ------------------------------------------------------------------------------------------------------------
# loading a trained denoiser (sampling, features)
# ------------------------------------------------------------------------------------------------------------
@dataclass
class PretrainedDenoiser:
    """The EMA denoiser of one view plus what is needed to use it (schedule, prediction type, plan identity)."""

    model: DiffusionUNet
    schedule: NoiseSchedule
    prediction_type: str
    feature_timestep: int
    step: int
    identity: Dict = field(default_factory=dict)
    checkpoint: Optional[Path] = None


def pretrain_checkpoint_path(dataset: Union[int, str], configuration: str, view: str,
                             plans_name: str = DEFAULT_PLANS_NAME, which: str = "auto") -> Path:
    """``checkpoint_final.pt`` (``which='final'``), ``checkpoint_latest.pt`` ('latest') or the final one if it
    exists, else the latest ('auto')."""
    folder = pretrain_view_dir(resolve_dataset_name(dataset), plans_name, configuration, view)
    candidates = {"final": [FINAL], "latest": [LATEST], "auto": [FINAL, LATEST]}
    if which not in candidates:
        raise OrthoError(f"unknown checkpoint '{which}'", fix="use final, latest or auto")
    for name in candidates[which]:
        if (folder / name).is_file():
            return folder / name
    raise OrthoError(f"no pretraining checkpoint for view '{view}' ({configuration}, {plans_name})", folder,
                     fix=f"run `ortho_pretrain {dataset} {configuration} -v {view}` first")


def load_denoiser_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu") -> PretrainedDenoiser:
    """Rebuild the denoiser from a pretraining checkpoint (from the network entry stored in it, so later plan
    edits cannot break it) and load the EMA weights."""
    ckpt = load_checkpoint(path, map_location="cpu")
    extra = ckpt.get("extra") or {}
    if extra.get("kind") != CHECKPOINT_KIND or ckpt.get("ema") is None:
        raise OrthoError("not a diffusion-pretraining checkpoint (no EMA weights)", path,
                         fix="point at …/Pretrain__<plans>__<config>/<view>/checkpoint_final.pt")
    spec = json.loads(extra["network_json"])
    model = DiffusionUNet(spec, int(extra["input_channels"]), time_embed_dim=int(extra["time_embed_dim"]))
    ema = EMA(model)
    ema.load_state_dict(ckpt["ema"])
    ema.copy_to(model)
    sched = extra.get("noise_schedule") or {"kind": "cosine", "T": 1000}
    return PretrainedDenoiser(model.to(device).eval(), NoiseSchedule(int(sched["T"]), sched["kind"]),
                              extra["prediction_type"], int(extra["feature_timestep"]), int(ckpt["step"] or 0),
                              {k: v for k, v in extra.items() if k not in ("loss_history", "rank_report")},
                              Path(path))


def load_pretrained_denoiser(dataset: Union[int, str], configuration: str, view: str,
                             plans_name: str = DEFAULT_PLANS_NAME, device: Union[str, torch.device] = "cpu",
                             which: str = "auto") -> DiffusionUNet:
    """The EMA denoiser of ``ortho_pretrain DATASET CONFIGURATION`` for ``view`` (eval mode).

    Use it with :func:`orthonet.diffusion.extract_features`, or through :class:`PretrainedFeatures`.
    """
    return load_denoiser_checkpoint(pretrain_checkpoint_path(dataset, configuration, view, plans_name, which),
                                    device).model


class PretrainedFeatures:
    """Dataset-level diffusion features: ``PretrainedFeatures(101, '3d_fullres')(volume, 'sagittal', t, levels)``.

    ``volume`` is a *preprocessed* array of that view ((C, *spatial) or (B, C, *spatial): the plan's orientation,
    spacing and normalisation, e.g. from the preprocessed ``.b2nd`` files). Defaults: ``t = 100`` of 1000
    (:data:`orthonet.diffusion.DEFAULT_T`; a list such as ``[50, 150, 250]`` concatenates timesteps) and the last
    three encoder stages. Each view's denoiser is loaded on first use and kept.
    """

    def __init__(self, dataset: Union[int, str], configuration: str = "3d_fullres",
                 plans_name: str = DEFAULT_PLANS_NAME, device: Union[str, torch.device] = "cpu", which: str = "auto"):
        self.dataset, self.configuration, self.plans_name = dataset, configuration, plans_name
        self.device, self.which = device, which
        self._denoisers: Dict[str, PretrainedDenoiser] = {}

    def denoiser(self, view: str) -> PretrainedDenoiser:
        if view not in self._denoisers:
            path = pretrain_checkpoint_path(self.dataset, self.configuration, view, self.plans_name, self.which)
            self._denoisers[view] = load_denoiser_checkpoint(path, self.device)
        return self._denoisers[view]

    def __call__(self, volume: Union[np.ndarray, torch.Tensor], view: str,
                 t: Union[None, int, Sequence[int]] = DEFAULT_T, levels: Optional[Sequence[int]] = None,
                 include_decoder: bool = False, seed: int = 0) -> List[torch.Tensor]:
        d = self.denoiser(view)
        x = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume).float()
        return extract_features(d.model, x, t=t, levels=levels, seed=seed, include_decoder=include_decoder,
                                schedule=d.schedule)


# ------------------------------------------------------------------------------------------------------------
# whole-dataset entry point (what the CLI calls)
# ------------------------------------------------------------------------------------------------------------
def pretrain_views(dataset: Union[int, str], configuration: str, views: Optional[Sequence[str]] = None,
                   settings: Optional[PretrainSettings] = None, plans_name: str = DEFAULT_PLANS_NAME,
                   device: Union[str, torch.device] = "cpu", resume: bool = False,
                   trainer_class: type = DiffusionPretrainer) -> Dict[str, Optional[Path]]:
    """Pretrain one denoiser per view (all planned views of the configuration by default), one after another.

    Returns ``{view: encoder.pt path}`` (None on non-main DDP ranks).
    """
    name = resolve_dataset_name(dataset)
    pre = preprocessed_dataset_dir(name)
    plans = load_plans(pre, plans_name)
    planned = [v for v, vp in plans["views"].items() if configuration in vp["configurations"]]
    if not planned:
        raise OrthoError(f"configuration '{configuration}' is planned for no view of {name}",
                         pre / f"{plans_name}.json", fix="pick a planned configuration (e.g. 3d_fullres)")
    views = list(views) if views else planned
    unknown = [v for v in views if v not in planned]
    if unknown:
        raise OrthoError(f"view(s) {unknown} have no '{configuration}' configuration in the plans "
                         f"(planned: {planned})", pre / f"{plans_name}.json", fix="choose from the planned views")
    out: Dict[str, Optional[Path]] = {}
    for view in views:
        trainer = trainer_class(plans, configuration, view, pre, pretrain_view_dir(name, plans_name, configuration,
                                                                                  view), settings, device)
        out[view] = trainer.run(resume=resume)
        dist_utils.barrier()
    return out


def split_views_arg(views: Optional[Sequence[str]]) -> Optional[List[str]]:
    """``-v sagittal coronal`` and ``-v sagittal,coronal`` both work."""
    if not views:
        return None
    return [v for item in views for v in str(item).split(",") if v]


def loss_drop(history: Sequence[float], window: int = 10) -> Tuple[float, float]:
    """(mean of the first ``window`` losses, mean of the last ``window``): a quick 'is it learning' figure."""
    h = np.asarray(history, dtype=float)
    w = max(1, min(window, h.size // 2))
    return float(h[:w].mean()), float(h[-w:].mean())


__all__ = ["PretrainSettings", "DiffusionPretrainer", "PretrainedDenoiser", "PretrainedFeatures",
           "load_pretrained_denoiser", "load_denoiser_checkpoint", "pretrain_checkpoint_path", "pretrain_views",
           "segment_seed", "weights_digest", "split_views_arg", "loss_drop"]
