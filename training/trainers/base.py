"""The training loop every orthonet task shares, composed of small replaceable parts.

A trainer is configured from plans.json (patch, batch, network), dataset.json (labels, diagnoses) and the run's
:class:`~orthonet.training.options.TrainOptions`. Everything a user may want to change is one overridable method or one
class attribute: subclass :class:`SegTrainer` and set ``num_epochs = 300``, or override ``build_loss`` — and pass
the subclass with ``-tr``. The parts themselves live in their own modules (data loaders, losses, schedules,
checkpoints, progress logging, distributed helpers); this file only wires them together.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from orthonet.dataset import DatasetSpec, parse_dataset_json, parse_diagnoses
from orthonet.errors import OrthoError
from orthonet.fileio import load_json, save_json
from orthonet.networks import load_pretrained_decoder, load_pretrained_encoder
from orthonet.paths import preprocessed_root, raw_root
from orthonet.training import distributed as dist
from orthonet.training.checkpoint import apply_checkpoint, load_checkpoint, save_checkpoint
from orthonet.training.data.dataset import PreprocessedCaseStore
from orthonet.networks.heads import WHOLE_EXAM_POOLING
from orthonet.training.data.factory import training_mirror_axes
from orthonet.training.model_factory import (ModelConfig, build_model, segmentation_view_of, task_model_views,
                                             views_for)
from orthonet.training.options import TrainOptions, fold_dir_name, model_dir, model_folder_name
from orthonet.training.pretrained import PretrainedSource, find_pretrained, load_encoder_file, network_hash
from orthonet.training.progress import ProgressLogger
from orthonet.training.runtime import (autocast, compile_network, default_num_workers, host_values,
                                       memory_format_for, resolve_device, seed_everything)
from orthonet.training.schedules import scheduler_step, split_param_groups, warmup_poly_schedule
from orthonet.training.splits import get_fold, label_fraction_subset, load_or_create_splits


class BaseTrainer:
    """Shared loop: configure → build → (resume) → epochs of training + online validation → final validation."""

    task: str = ""
    # ---- hyper-parameters: change one in a subclass -------------------------------------------------------
    num_epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations: int = 50
    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    grad_clip: float = 12.0
    pretrained_lr_multiplier: float = 0.1      # pretrained weights start at this fraction of the LR ...
    warmup_fraction: float = 0.05              # ... and reach the full LR after this fraction of all steps
    oversample_foreground: float = 0.33
    deep_supervision: bool = True
    best_score_smoothing: float = 0.9          # nnU-Net's EMA of the validation score for checkpoint_best
    load_pretrained_decoder: bool = True
    freeze_pretrained_encoders: bool = False   # keep loaded encoders fixed (features as pretrained, no warm-up)
    seg_head: str = "unet"                     # 'unet' (the plan's decoder) | 'pyramid' (per-voxel MLP on all levels)
    fusion_head_kwargs: Dict = {}
    mirror_axes: Optional[Tuple[int, ...]] = None   # spatial axes augmentation mirrors (None: all); stored for TTA

    def __init__(self, options: TrainOptions):
        self.opts = options
        self.dist_info = dist.init_distributed(options.device)
        self.device = resolve_device(options.device)
        self.is_main = dist.is_main_process()
        self.preprocessed_dir = preprocessed_root() / options.dataset_name
        self.plans = load_json(self.preprocessed_dir / f"{options.plans_name}.json", "plans file")
        self.spec = self._load_spec()
        if options.epochs is not None:
            self.num_epochs = int(options.epochs)
        if options.iterations_per_epoch is not None:
            self.iterations_per_epoch = int(options.iterations_per_epoch)
        if options.val_iterations is not None:
            self.val_iterations = int(options.val_iterations)
        self.num_workers = default_num_workers() if options.num_workers is None else int(options.num_workers)
        self.output_dir = model_dir(options.dataset_name, self.folder_name()) / fold_dir_name(options.fold)
        self.progress = ProgressLogger(self.output_dir, enabled=self.is_main,
                                       title=f"{type(self).__name__} {options.dataset_name} fold {options.fold}")
        self.model: Optional[nn.Module] = None
        self.network: Optional[nn.Module] = None   # DDP-wrapped (or the model itself)
        self.optimizer = None
        self.scheduler = None
        self.epoch = 0
        self.best_score: Optional[float] = None
        self.smoothed_score: Optional[float] = None
        self.pretrained_report: Dict = {}
        self.pretrained_parameters: List[str] = []   # trained at the pretrained LR (restored by --c)
        self.frozen_views: List[str] = []

    # ==================================================================================================
    # configuration
    # ==================================================================================================
    def folder_name(self) -> str:
        return model_folder_name(type(self).__name__, self.opts.plans_name, self.opts.configuration,
                                 self.opts.label_fraction, self.opts.pretrained)

    def _load_spec(self) -> DatasetSpec:
        """dataset.json from the preprocessed folder (copied there by planning); diagnoses.csv from raw."""
        spec, problems = parse_dataset_json(self.preprocessed_dir)
        if spec is None or problems:
            raw_dir = raw_root() / self.opts.dataset_name
            spec, problems = parse_dataset_json(raw_dir)
            if spec is None or problems:
                raise OrthoError("dataset.json is missing or invalid:\n  " + "\n  ".join(problems),
                                 self.preprocessed_dir / "dataset.json",
                                 fix="rerun `ortho_plan_and_preprocess` for this dataset")
        return spec

    def read_diagnoses(self) -> Dict[str, np.ndarray]:
        """Training diagnoses (NaN = unknown) from the raw dataset's diagnoses.csv (or its preprocessed copy)."""
        if not self.spec.diagnoses:
            return {}
        for folder in (raw_root() / self.opts.dataset_name, self.preprocessed_dir):
            spec, _ = parse_dataset_json(folder)
            if spec is not None and spec.diagnoses_csv.is_file():
                table, problems = parse_diagnoses(spec)
                if problems:
                    raise OrthoError("diagnoses.csv has problems:\n  - " + "\n  - ".join(problems),
                                     spec.diagnoses_csv, fix="run `ortho_verify_dataset` and fix the listed rows")
                return table
        raise OrthoError("diagnoses.csv not found in the raw or preprocessed dataset folder",
                         raw_root() / self.opts.dataset_name / "diagnoses.csv",
                         fix="restore the raw dataset (ORTHO_raw) or train with --task seg")

    def data_folder(self) -> Path:
        views = views_for(self.plans, self.opts.configuration, self.task)
        ident = self.plans["views"][views[0]]["configurations"][self.opts.configuration]["data_identifier"]
        return self.preprocessed_dir / ident

    def model_views(self) -> List[str]:
        return task_model_views(self.plans, self.opts.configuration, self.task, self.segmentation_view,
                                self.opts.fuse_views)

    @property
    def segmentation_view(self) -> Optional[str]:
        return segmentation_view_of(self.plans, self.spec)

    def configure_data(self) -> None:
        """Store, splits (once, fixed seed, stratified), this fold's cases and the label-fraction subset."""
        views = self.model_views()
        seg_view = self.segmentation_view if self.task in ("seg", "multitask") else None
        self.store = PreprocessedCaseStore(self.data_folder(), views, seg_view)
        self.diagnoses = self.read_diagnoses() if self.task in ("diag", "multitask") else {}
        all_cases = self.store.cases(split="Tr", views=[views[0]] if seg_view is None else [seg_view])
        if not all_cases:
            raise OrthoError("no preprocessed training cases found", self.store.folder,
                             fix="run `ortho_plan_and_preprocess` for this configuration")
        diag_all = self.read_diagnoses() if self.spec.diagnoses else {}
        splits = load_or_create_splits(self.preprocessed_dir, all_cases, diag_all or None)
        train, val = get_fold(splits, self.opts.fold)
        present = set(all_cases)
        train = [c for c in train if c in present]
        val = [c for c in val if c in present]
        seg_labelled = set(self.store.labelled_cases()) if seg_view else set()
        kept = label_fraction_subset(train, self.opts.label_fraction, self.diagnoses or None,
                                     seg_labelled if seg_view else None, seed=self.opts.seed)
        self.keep_labels: Set[str] = set(kept)
        self.train_cases = self.select_training_cases(train, seg_labelled)
        self.val_cases = self.select_validation_cases(val, seg_labelled)
        if not self.train_cases:
            raise OrthoError(f"fold {self.opts.fold} has no usable training cases for task '{self.task}'",
                             self.store.folder, fix="check labels/diagnoses or use a larger label fraction")
        if not self.val_cases:
            self.val_cases = list(self.train_cases)
        self.log(f"fold {self.opts.fold}: {len(self.train_cases)} training cases (label fraction "
                 f"{self.opts.label_fraction:g}: {len(self.keep_labels)} of {len(train)} keep labels), "
                 f"{len(self.val_cases)} validation cases")

    def select_training_cases(self, train: Sequence[str], seg_labelled: Set[str]) -> List[str]:
        """Cases whose (kept) labels the task can learn from; the others were already used by pretraining."""
        raise NotImplementedError

    def select_validation_cases(self, val: Sequence[str], seg_labelled: Set[str]) -> List[str]:
        raise NotImplementedError

    def model_config(self) -> ModelConfig:
        views = self.model_views()
        channels = {v: int(self.plans["views"][v].get("num_input_channels", self.spec.num_channels(v)))
                    for v in views}
        head_kwargs = dict(self.fusion_head_kwargs)
        whole = self.task != "seg" and self.opts.diagnosis_input == "whole"
        if whole:
            head_kwargs.setdefault("pooling", list(WHOLE_EXAM_POOLING))
        feature_t = dict(self.opts.feature_t or {})
        if "*" in feature_t:                      # one timestep for every view
            t = feature_t.pop("*")
            feature_t = {**{v: t for v in views}, **feature_t}
        return ModelConfig(task=self.task, configuration=self.opts.configuration, views=views,
                           segmentation_view=self.segmentation_view if self.task != "diag" else None,
                           channels_by_view=channels, num_classes=self.spec.num_classes,
                           n_diagnoses=len(self.spec.diagnoses), deep_supervision=self.deep_supervision,
                           fusion=self.opts.fusion, fuse_views=self.opts.fuse_views,
                           levels=list(self.opts.diagnosis_levels) if self.opts.diagnosis_levels else None,
                           head_kwargs=head_kwargs, seg_head=self.seg_head,
                           diagnosis_input="whole" if whole else "crop",
                           feature_t={v: t for v, t in feature_t.items() if v in views},
                           coarsen_levels=list(self.opts.diagnosis_coarsen_levels or []) if whole else [],
                           allowed_mirroring_axes=self.mirrored_axes(views, whole))

    def mirrored_axes(self, views: Sequence[str], whole: bool) -> Dict[str, List[int]]:
        """Per view, what this trainer's augmentation mirrors (``mirror_axes`` through the loaders' rules), stored
        with the model so prediction mirrors only there."""
        return training_mirror_axes(self.plans, self.opts.configuration, views, self.mirror_axes,
                                    segmentation_view=self.segmentation_view if self.task != "diag" else None,
                                    whole_views=views if whole else (), fuse_views=self.opts.fuse_views)

    # ==================================================================================================
    # building blocks (override one to change it)
    # ==================================================================================================
    def build_model(self) -> nn.Module:
        return build_model(self.plans, self.model_cfg)

    def load_pretrained(self, model: nn.Module) -> List[str]:
        """Load diffusion-pretrained encoders (and decoder where shapes match); return the loaded parameter names.

        Every file is checked (network hash, view, every tensor key and shape) and ``pretrained_report`` (the log
        and run_config.json) names the file that went into each view; a requested start that cannot load is an
        OrthoError (raised by :func:`find_pretrained` or here), never a silent run from scratch."""
        source: Optional[PretrainedSource] = find_pretrained(self.opts.pretrained, self.plans,
                                                             self.opts.configuration, self.model_cfg.views)
        if source is None:
            reason = "--pretrained none" if self.opts.pretrained == "none" else \
                "--pretrained auto: no ortho_pretrain encoders for this dataset and its plans were not transferred"
            self.log(f"{reason}: training from scratch")
            self.pretrained_report = {"source": None, "start": "scratch", "reason": reason}
            return []
        loaded_names: List[str] = []
        report = {"source": source.description, "start": "pretrained", "views": {}}
        for view in self.model_cfg.views:
            if view in source.files:
                names, report["views"][view] = self._load_view_weights(model, view, source.files[view],
                                                                       source.expected_views.get(view, view))
                loaded_names += names
        report["scratch_views"] = [v for v in self.model_cfg.views if v not in report["views"]]
        if not report["views"]:
            raise OrthoError(f"--pretrained {self.opts.pretrained}: no encoder fits the model's views "
                             f"{self.model_cfg.views}", fix="pass encoders of these views, or --pretrained none")
        for view in report["scratch_views"]:
            self.log(f"view '{view}': no pretrained encoder in {source.description}: its encoder starts from scratch")
        if self.freeze_pretrained_encoders:
            self.freeze_encoders(model, list(report["views"]))
            report["frozen_encoders"] = list(self.frozen_views)
        self.pretrained_report = report
        param_names = {n for n, p in model.named_parameters() if p.requires_grad}   # frozen ones leave the optimizer
        return [n for n in loaded_names if n in param_names]

    def _load_view_weights(self, model: nn.Module, view: str, path: Path, expected_view: str
                           ) -> Tuple[List[str], Dict]:
        """One view's encoder.pt into the model, all checks first; (loaded parameter names, its report entry)."""
        payload = load_encoder_file(path)
        expected = network_hash(self.plans["views"][view]["configurations"][self.opts.configuration]["network"])
        if payload["network_hash"] != expected:
            raise OrthoError(f"pretrained encoder for view '{view}' was trained for another network topology",
                             path, fix="pretrain with these plans, transfer plans with --plans-from, or use "
                                       "--pretrained none")
        if payload["view"] not in (expected_view, view):
            raise OrthoError(f"the encoder.pt for view '{view}' was pretrained for view '{payload['view']}' "
                             f"(expected '{expected_view}')", path,
                             fix="keep each encoder.pt in its own view's folder (rerun ortho_pretrain to rewrite it)")
        enc = load_pretrained_encoder(model, payload["encoder_state_dict"], view=view)
        if not enc.complete:
            raise OrthoError(f"pretrained encoder for view '{view}' does not fit: {enc.summary()}", path,
                             fix="pretrain with the same plans and number of channels")
        names = [f"encoders.{view}." + k for k in enc.loaded]
        entry = {"file": str(path), "pretrained_view": payload["view"], "pretrained_dataset": payload["dataset_name"],
                 "network_hash": payload["network_hash"], "encoder_tensors": len(enc.loaded),
                 "steps": payload.get("steps")}
        if (self.load_pretrained_decoder and view == self.model_cfg.segmentation_view
                and getattr(model, "decoder", None) is not None and payload.get("decoder_state_dict")):
            dec = load_pretrained_decoder(model, payload["decoder_state_dict"])
            names += ["decoder." + k for k in dec.loaded]
            entry["decoder_tensors"] = len(dec.loaded)
        decoder = f", decoder {entry['decoder_tensors']}" if "decoder_tensors" in entry else ""
        self.log(f"view '{view}' <- {path} ({payload['dataset_name']} '{payload['view']}' encoder, "
                 f"{len(enc.loaded)} tensors{decoder})")
        return names, entry

    def freeze_encoders(self, model: nn.Module, views: Sequence[str]) -> None:
        """Stop training the encoders of ``views`` (their parameters leave the optimizer)."""
        for view in views:
            model.encoders[view].requires_grad_(False)
        self.frozen_views = sorted(set(self.frozen_views) | set(views))
        if views:
            self.log(f"pretrained encoder(s) frozen: {', '.join(sorted(views))}")

    def _restore_pretrained(self, model: nn.Module) -> List[str]:
        """``--c`` / ``--val`` do not reload pretrained weights (the checkpoint has them): restore what the run
        froze, recorded and trained at the pretrained learning rate, so the optimizer's parameter groups match its
        saved state and run_config.json still names the loaded files. Without a checkpoint it is a new run."""
        for name in ("checkpoint_latest.pt", "checkpoint_final.pt", "checkpoint_best.pt"):
            if (self.output_dir / name).is_file():
                extra = load_checkpoint(self.output_dir / name, map_location="cpu").get("extra") or {}
                self.freeze_encoders(model, extra.get("frozen_encoders") or [])
                self.pretrained_report = extra.get("pretrained_report") or {"source": extra.get("pretrained")}
                return list(extra.get("pretrained_parameters") or [])
        return self.load_pretrained(model)

    def total_steps(self) -> int:
        return self.num_epochs * self.iterations_per_epoch

    def build_optimizer(self, model: nn.Module, pretrained_names: Sequence[str]):
        """SGD with Nesterov momentum and poly LR (nnU-Net); pretrained weights warm up from a lower LR."""
        groups = split_param_groups(model, pretrained_names)
        optimizer = torch.optim.SGD(groups, lr=self.initial_lr, momentum=self.momentum, nesterov=True,
                                    weight_decay=self.weight_decay)
        warmup = max(1, int(round(self.warmup_fraction * self.total_steps()))) if pretrained_names else 0
        scheduler = warmup_poly_schedule(optimizer, self.total_steps(), warmup, self.pretrained_lr_multiplier)
        return optimizer, scheduler

    def build_train_loader(self):
        raise NotImplementedError

    def compute_loss(self, batch: Dict, outputs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def forward(self, batch: Dict):
        raise NotImplementedError

    def online_validation(self) -> Dict:
        """Per-epoch validation: returns metrics for the progress log plus ``score`` (higher is better)."""
        raise NotImplementedError

    def final_validation(self) -> Dict:
        from orthonet.training.final_validation import run_final_validation
        return run_final_validation(self)

    # ==================================================================================================
    # the loop
    # ==================================================================================================
    def log(self, message: str) -> None:
        self.progress.log(message)

    def loader_options(self, train: bool) -> Dict:
        """Extra BatchLoader arguments: page-locked batches on CUDA, so ``to_device``'s non_blocking copies
        overlap the step (with pageable memory they are synchronous); in-process validation loaders need none."""
        return {"pin_memory": train and self.device.type == "cuda"}

    def to_device(self, x):
        if isinstance(x, torch.Tensor):
            fmt = memory_format_for(x.ndim, self.device) if x.is_floating_point() and x.ndim >= 4 else None
            x = x.to(self.device, non_blocking=True)
            return x.contiguous(memory_format=fmt) if fmt is not None else x
        if isinstance(x, dict):
            return {k: self.to_device(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(self.to_device(v) for v in x)
        return x

    def setup(self) -> None:
        seed_everything(self.opts.seed + dist.rank())
        self.configure_data()
        self.model_cfg = self.model_config()
        model = self.build_model()
        resumed = self.opts.continue_training or self.opts.validation_only   # weights come from a checkpoint
        pretrained = self._restore_pretrained(model) if resumed else self.load_pretrained(model)
        self.pretrained_parameters = list(pretrained)
        model.to(self.device)
        if self.device.type == "cuda":
            model.to(memory_format=memory_format_for(5 if self.is_3d else 4, self.device))
        self.model = model
        self.network = dist.wrap_ddp(model, self.device) if dist.is_distributed() else model
        if self.opts.compile:
            self.network = compile_network(self.network, self.log)
        self.optimizer, self.scheduler = self.build_optimizer(model, pretrained)
        if self.is_main:
            self._write_run_files()

    @property
    def is_3d(self) -> bool:
        view = self.model_cfg.views[0]
        return len(self.plans["views"][view]["configurations"][self.opts.configuration]["patch_size"]) == 3

    def _write_run_files(self) -> None:
        """Copies next to the weights so prediction needs only the results folder (as nnU-Net)."""
        parent = self.output_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        save_json(self.plans, parent / "plans.json")
        src = self.preprocessed_dir / "dataset.json"
        if src.is_file():
            save_json(load_json(src), parent / "dataset.json")
        splits = self.preprocessed_dir / "splits_final.json"
        if splits.is_file():
            save_json(load_json(splits), parent / "splits_final.json")
        save_json({"trainer": type(self).__name__, "options": self.opts.to_dict(),
                   "model_config": self.model_cfg.to_dict(), "pretrained": self.pretrained_report,
                   "train_cases": self.train_cases, "val_cases": self.val_cases,
                   "labelled_training_cases": sorted(self.keep_labels),
                   "num_epochs": self.num_epochs, "iterations_per_epoch": self.iterations_per_epoch,
                   "seed": self.opts.seed, "world_size": dist.world_size()},
                  self.output_dir / "run_config.json")

    def checkpoint_extra(self) -> Dict:
        return {"model_config": self.model_cfg.to_dict(), "trainer": type(self).__name__,
                "dataset_name": self.opts.dataset_name, "plans_name": self.opts.plans_name,
                "configuration": self.opts.configuration, "fold": str(self.opts.fold),
                "best_score": self.best_score, "smoothed_score": self.smoothed_score,
                "num_epochs": self.num_epochs, "iterations_per_epoch": self.iterations_per_epoch,
                "pretrained": self.pretrained_report.get("source"), "frozen_encoders": list(self.frozen_views),
                "pretrained_report": self.pretrained_report,
                "pretrained_parameters": list(self.pretrained_parameters)}

    def save(self, name: str) -> None:
        if self.is_main:
            save_checkpoint(self.output_dir / name, self.model, self.optimizer, self.scheduler,
                            epoch=self.epoch, step=scheduler_step(self.scheduler), extra=self.checkpoint_extra())

    def resume(self) -> bool:
        """Continue from checkpoint_latest (or final/best); False when there is nothing to resume."""
        for name in ("checkpoint_latest.pt", "checkpoint_final.pt", "checkpoint_best.pt"):
            path = self.output_dir / name
            if path.is_file():
                ckpt = load_checkpoint(path, map_location=self.device)
                apply_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
                extra = ckpt.get("extra") or {}
                self.epoch = int(ckpt.get("epoch") or 0) + 1
                self.best_score = extra.get("best_score")
                self.smoothed_score = extra.get("smoothed_score")
                self.pretrained_report = extra.get("pretrained_report") or {"source": extra.get("pretrained")}
                self.progress.truncate(self.epoch)
                self.log(f"resumed from {path.name} at epoch {self.epoch} (step {scheduler_step(self.scheduler)})")
                return True
        self.log("--c: no checkpoint to resume from; starting a new run")
        return False

    def train_step(self, batch: Dict) -> Dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device):
            outputs = self.forward(batch)
        loss, parts = self.compute_loss(batch, outputs)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip) if self.grad_clip else None
        # the step's one device-to-host read: the loss, its parts and the gradient norm together, after backward
        # and clipping are queued. The norm is of the all-reduced gradients, so under DDP every rank sees a NaN
        # on any rank and all stop together, before the optimizer touches the weights.
        values = host_values({"loss": loss, **parts, **({} if norm is None else {"grad_norm": norm})})
        grad_norm = values.pop("grad_norm", 0.0)
        if not (math.isfinite(values["loss"]) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise OrthoError(f"training loss became {values['loss']} (gradient norm {grad_norm}) at epoch "
                             f"{self.epoch} (cases {batch.get('keys')})",
                             fix="lower the learning rate (subclass the trainer) or check the data of these cases")
        self.optimizer.step()
        self.scheduler.step()
        return values

    def update_best(self, score: Optional[float]) -> bool:
        if score is None or not math.isfinite(score):
            return False
        a = self.best_score_smoothing
        self.smoothed_score = score if self.smoothed_score is None else a * self.smoothed_score + (1 - a) * score
        if self.best_score is None or self.smoothed_score > self.best_score:
            self.best_score = self.smoothed_score
            return True
        return False

    def run(self) -> Dict:
        """Train (or resume, or only validate) and return the final validation summary."""
        self.setup()
        if self.opts.validation_only:
            ckpt = load_checkpoint(self._final_or_latest(), map_location=self.device)
            apply_checkpoint(ckpt, self.model, restore_rng=False)
            return self.final_validation() if self.is_main else {}
        if self.opts.continue_training:
            self.resume()
        if self.epoch >= self.num_epochs and (self.output_dir / "checkpoint_final.pt").is_file():
            self.log("training already finished; running the final validation")
        else:
            self.train_epochs()
        result = self.final_validation() if (self.opts.final_validation and self.is_main) else {}
        dist.barrier()
        return result

    def _final_or_latest(self) -> Path:
        for name in ("checkpoint_final.pt", "checkpoint_best.pt", "checkpoint_latest.pt"):
            if (self.output_dir / name).is_file():
                return self.output_dir / name
        raise OrthoError("no checkpoint to validate", self.output_dir, fix="train this fold first (ortho_train)")

    def train_epochs(self) -> None:
        loader = self.build_train_loader()
        self.log(f"training {type(self).__name__} ({self.task}) on {self.device}: {self.num_epochs} epochs x "
                 f"{self.iterations_per_epoch} iterations, world size {dist.world_size()}")
        try:
            while self.epoch < self.num_epochs:
                start = time.time()
                self.network.train()
                totals: Dict[str, List[float]] = {}
                bar = tqdm(range(self.iterations_per_epoch), desc=f"epoch {self.epoch}", leave=False,
                           disable=not self.is_main)
                for _ in bar:
                    parts = self.train_step(self.to_device(next(loader)))
                    for k, v in parts.items():
                        totals.setdefault(k, []).append(v)
                    bar.set_postfix(loss=f"{parts['loss']:.4f}")
                train_metrics = {f"train_{k}": float(np.mean(v)) for k, v in totals.items()}
                for k in list(train_metrics):
                    train_metrics[k] = float(dist.all_reduce_mean(torch.tensor(train_metrics[k])).item())
                self.network.eval()
                val = self.online_validation() if self.is_main else {}
                is_best = self.update_best(val.get("score")) if self.is_main else False
                lr = self.optimizer.param_groups[-1]["lr"]
                if self.is_main:
                    # checkpoint first: a kill between the two leaves a checkpoint at least as new as the log
                    if is_best:
                        self.save("checkpoint_best.pt")
                    self.save("checkpoint_latest.pt")
                    record = {k: v for k, v in val.items() if k != "score"}
                    self.progress.log_epoch(self.epoch, lr=lr, epoch_time=time.time() - start, **train_metrics,
                                            **record, score=val.get("score"), smoothed_score=self.smoothed_score)
                    self.log(self._epoch_line(train_metrics, val, lr, time.time() - start))
                dist.barrier()
                self.epoch += 1
        finally:
            if hasattr(loader, "close"):
                loader.close()
        self.epoch = self.num_epochs - 1
        self.save("checkpoint_final.pt")
        self.epoch = self.num_epochs

    def _epoch_line(self, train: Dict, val: Dict, lr: float, seconds: float) -> str:
        bits = [f"epoch {self.epoch}", f"train loss {train.get('train_loss', float('nan')):.4f}"]
        for key in ("val_loss", "mean_dice", "macro_auc"):
            if key in val and val[key] is not None:
                bits.append(f"{key.replace('_', ' ')} {val[key]:.4f}")
        bits += [f"lr {lr:.2e}", f"{seconds:.1f}s"]
        return ", ".join(bits)
