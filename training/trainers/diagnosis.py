"""Multi-label diagnosis from all views: per-view encoders, pooled features fused across views.

Whole-exam diagnosis (the default, ``--diagnosis-input whole``): every batch carries each view's whole volume
(``batch['whole']``, padded to the encoder's total stride and the batch's largest exam) and the encoders run over
all of it, with gradient checkpointing per stage (``gradient_checkpointing``; ``"auto"``: only for batches above
``checkpoint_min_voxels`` of the model, about 2 M voxels) so that memory holds the stage outputs of
``whole_batch_size`` exams, not every activation; smaller exams skip the recomputation (an encoder forward per
step: measured, about 40 % of the multitask step's extra time over a segmentation step on CPU).
``--diagnosis-input crop`` trains the old centre-crop model.

Loss: masked BCE on the fused logits (unknown labels excluded, positives weighted by training prevalence) plus an
auxiliary BCE on each view's own logits, so every view alone stays predictive and a missing view at inference
degrades the answer instead of breaking it.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch

from orthonet.training import distributed as dist
from orthonet.training.data.factory import make_multiview_loader
from orthonet.training.losses import MaskedBCEWithLogitsLoss, compute_pos_weight
from orthonet.training.online_eval import DiagnosisCollector
from orthonet.training.options import check_fuse_views
from orthonet.training.runtime import autocast
from orthonet.training.trainers.base import BaseTrainer


class DiagTrainer(BaseTrainer):
    """Diagnosis only (no decoder). AdamW with poly decay: the freshly initialised fusion head trains poorly with
    nnU-Net's SGD at 1e-2, while pretrained encoders still get their lower warm-up LR."""

    task = "diag"
    initial_lr: float = 1e-3
    weight_decay: float = 1e-2
    aux_view_weight: float = 0.5
    diagnosis_jitter: float = 0.1
    light_augmentation: bool = True   # mirroring + intensity jitter only for the diagnosis views (see factory)
    grad_clip: float = 5.0
    whole_batch_size: int = 2                 # exams per batch in whole-exam mode
    gradient_checkpointing: Union[bool, str] = "auto"   # per encoder stage, whole-exam training only
    max_whole_shape: Optional[Sequence[int]] = None   # cap on a training volume (random cut); None: no cap
    whole_intensity_jitter: float = 0.1

    @property
    def whole_exam(self) -> bool:
        return self.model_cfg.diagnosis_input == "whole"

    def build_model(self):
        model = super().build_model()
        if self.model_cfg.diagnosis_input == "whole":
            model.checkpoint_encoders = self.gradient_checkpointing   # True, False or "auto"
        return model

    def select_training_cases(self, train: Sequence[str], seg_labelled: Set[str]) -> List[str]:
        return [c for c in train if c in self.keep_labels and c in self.diagnoses
                and not np.all(np.isnan(self.diagnoses[c]))]

    def select_validation_cases(self, val: Sequence[str], seg_labelled: Set[str]) -> List[str]:
        return [c for c in val if c in self.diagnoses and not np.all(np.isnan(self.diagnoses[c]))]

    def build_optimizer(self, model, pretrained_names):
        from orthonet.training.schedules import split_param_groups, warmup_poly_schedule
        groups = split_param_groups(model, pretrained_names)
        optimizer = torch.optim.AdamW(groups, lr=self.initial_lr, weight_decay=self.weight_decay)
        warmup = max(1, int(round(self.warmup_fraction * self.total_steps()))) if pretrained_names else 0
        return optimizer, warmup_poly_schedule(optimizer, self.total_steps(), warmup, self.pretrained_lr_multiplier)

    def diagnosis_loss(self) -> MaskedBCEWithLogitsLoss:
        labels = np.stack([self.diagnoses[c] for c in self.train_cases]) if self.train_cases else None
        return MaskedBCEWithLogitsLoss(None if labels is None else compute_pos_weight(labels))

    def multiview_loader(self, cases, train: bool, seed: int):
        check_fuse_views(self.task, self.opts.fuse_views)
        seg_view = self.segmentation_view if self.task == "multitask" else None
        whole = self.model_cfg.views if self.whole_exam else ()
        cap = {v: list(self.max_whole_shape) for v in whole} if self.max_whole_shape else None
        return make_multiview_loader(self.store, cases, self.plans, self.opts.configuration, self.model_cfg.views,
                                     segmentation_view=seg_view, diagnoses=self.diagnoses,
                                     n_diagnoses=len(self.spec.diagnoses), keep_labels=self.keep_labels if train
                                     else None, train=train, deep_supervision=self.deep_supervision,
                                     oversample_foreground=self.oversample_foreground, jitter=self.diagnosis_jitter,
                                     ignore_label=self.spec.ignore_label, mirror_axes=self.mirror_axes,
                                     num_workers=self.num_workers if train else 0, seed=seed,
                                     light_augmentation_views=self.model_cfg.views if self.light_augmentation
                                     else (), whole_views=whole, max_whole_shape=cap,
                                     whole_intensity_jitter=self.whole_intensity_jitter,
                                     batch_size=self.whole_batch_size if self.whole_exam else None,
                                     fuse_views=self.opts.fuse_views and seg_view is not None,
                                     **self.loader_options(train))

    def build_train_loader(self):
        self.bce = self.diagnosis_loss().to(self.device)
        return self.multiview_loader(self.train_cases, True, self.opts.seed + 1000 * self.epoch + dist.rank())

    def to_device(self, x):
        """As the base trainer, but a batch's ``whole_shape`` (each exam's unpadded size) stays on the host: the
        whole-exam encoder's control flow reads it (crop extents, padding), and on a GPU every such read would be
        a device-to-host synchronisation per view per step."""
        if isinstance(x, dict) and "whole_shape" in x:
            moved = super().to_device({k: v for k, v in x.items() if k != "whole_shape"})
            return {k: (x[k] if k == "whole_shape" else moved[k]) for k in x}
        return super().to_device(x)

    def forward(self, batch: Dict):
        return self.run_model(self.network, batch)

    def run_model(self, network, batch: Dict):
        """One forward of ``network`` (the DDP wrapper in training, the bare model in validation)."""
        if self.whole_exam:
            return network(batch["whole"], batch["present"], batch["whole_shape"])
        return network(batch["data"], batch["present"])

    def aux_view_loss(self, batch: Dict, outputs: Dict, reference: torch.Tensor) -> torch.Tensor:
        """Mean auxiliary BCE over the views present in the batch, each on its own exams only.

        A view absent from every exam of the batch still adds its logits with weight 0: DDP runs with
        ``find_unused_parameters=False``, so each rank's graph must reach every parameter even when its batch lacks
        a view (incomplete exams are the normal clinical case). ``reference`` (the fused loss) gives the zero
        when no view is given at all."""
        target = batch["diagnosis"]
        terms: List[torch.Tensor] = []
        counted: List[torch.Tensor] = []
        # masks, not `if present.any()` / `logits[present]`: both read the device and stall the GPU every step.
        # An absent exam's labels become unknown (NaN), which the masked BCE leaves out of its mean; a view absent
        # from the whole batch gives a graph-connected zero and does not count in the mean over views.
        for view, logits in outputs["view_logits"].items():
            present = batch["present"][view].to(logits.device).bool()
            own = torch.where(present[:, None], target.to(logits.device).float(),
                              torch.full_like(logits, float("nan"), dtype=torch.float32))
            terms.append(self.bce(logits, own))
            counted.append(present.any().float())
        if not terms:
            return reference * 0.0
        return torch.stack(terms).sum() / torch.stack(counted).sum().clamp_min(1)

    def diagnosis_terms(self, batch: Dict, outputs: Dict) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        fused = self.bce(outputs["logits"], batch["diagnosis"])
        aux_loss = self.aux_view_loss(batch, outputs, fused)
        return fused + self.aux_view_weight * aux_loss, {"bce": fused.detach(), "aux_bce": aux_loss.detach()}

    def compute_loss(self, batch: Dict, outputs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        return self.diagnosis_terms(batch, outputs)

    def validation_batches(self):
        """(batch, outputs) over every validation case once (deterministic centre crops, no augmentation)."""
        loader = self.multiview_loader(self.val_cases, False, self.opts.seed + 7)
        with torch.no_grad():
            for batch in loader:
                batch = self.to_device(batch)
                with autocast(self.device):
                    out = self.run_model(self.model, batch)
                yield batch, out

    def online_validation(self) -> Dict:
        collector = DiagnosisCollector(self.spec.diagnoses)
        losses = []
        for batch, out in self.validation_batches():
            losses.append(float(self.bce(out["logits"], batch["diagnosis"])))
            collector.add(out["logits"], batch["diagnosis"], batch["keys"])
        macro = collector.macro_auc()
        val_loss = float(np.mean(losses)) if losses else float("nan")
        score = macro if np.isfinite(macro) else -val_loss
        return {"val_loss": val_loss, "auc": collector.auc(), "macro_auc": macro, "score": score}
