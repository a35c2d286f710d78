"""``ortho_predict``'s orchestration: discover -> preprocess (background) -> ensemble prediction -> export ->
diagnoses tables -> overview PNGs -> report.html.

The pieces live in their own modules and can be swapped one at a time:

========================  =========================================  ===========================================
step                      function                                   module
========================  =========================================  ===========================================
which models/thresholds   :func:`resolve_models`                     :mod:`orthonet.inference.model_selection`
find the cases            :func:`discover_inputs`                    :mod:`orthonet.inference.input_discovery`
read + preprocess         :func:`prepare_case`                       :mod:`orthonet.inference.prepare`
sliding window, TTA,      :func:`predict_preprocessed_case`          :mod:`orthonet.inference.predict_core` (the same code
diagnosis crops                                                      the trainers' final validation runs)
saliency (--explain)      :func:`ensemble_grad_cam`                  :mod:`orthonet.inference.explain`
back to the input grid    :func:`restore_original_geometry`          :mod:`orthonet.preprocessing.export`
files                     :func:`write_case_outputs`                 :mod:`orthonet.inference.outputs`
picture                   :func:`render_overview`                    :mod:`orthonet.inference.overview`
tables, report            ``write_diagnoses_csv/json``, ``write_report``  :mod:`orthonet.inference.diagnoses_table`, ``report``
========================  =========================================  ===========================================

Memory is bounded per case: the sliding window streams tiles into one accumulator per case, and at most
``num_processes + 1`` prepared cases wait in the pipeline. Problems are per case: a corrupt file or a missing
view is reported (console, ``predict_log.txt``, ``problems.json``, ``report.html``) and every other case is
still predicted.
"""
from __future__ import annotations

import itertools
import logging
import os
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from orthonet.inference.diagnoses_table import (CaseDiagnoses, make_case_diagnoses, write_diagnoses_csv,
                                                write_diagnoses_json)
from orthonet.inference.explain import ensemble_attention, ensemble_grad_cam, saliency_images
from orthonet.inference.input_discovery import InputCase, discover_inputs, input_case_from_images, restrict_to_models
from orthonet.inference.model_selection import ModelSelection, ModelSpec, resolve_models
from orthonet.inference.outputs import clear_case_outputs, first_file, overview_file_name, write_case_outputs
from orthonet.inference.overview import render_overview
from orthonet.inference.predict_core import LoadedModel, load_trained_model, predict_preprocessed_case
from orthonet.inference.prepare import PreparedCase, prepare_case
from orthonet.inference.report import case_report, write_report
from orthonet.dataset import DatasetSpec
from orthonet.errors import OrthoError
from orthonet.fileio import save_json
from orthonet.imageio import array_to_image
from orthonet.logging_utils import get_logger
from orthonet.preprocessing.export import original_geometry, restore_original_geometry
from orthonet.training.model_factory import has_diagnosis, has_segmentation
from orthonet.training.runtime import resolve_device

PathLike = Union[str, Path]
LOG_FILE = "predict_log.txt"


@dataclass
class PredictionSettings:
    """How to predict (not which model: that is :class:`ModelSelection`)."""

    tta: bool = True                    # mirroring test-time augmentation
    step_size: float = 0.5              # sliding-window step as a fraction of the patch
    save_probabilities: bool = False    # keep the softmax on the original grid (written as .npz)
    explain: bool = False               # saliency maps (orthonet.inference.explain)
    explain_method: str = "hirescam"    # hirescam | gradcam
    explain_levels: str = "finest"      # finest | all (encoder levels the diagnosis head pools)
    num_processes: int = 1              # background threads reading/preprocessing the next cases (0: inline)
    tile_batch: int = 0                 # sliding-window tiles per forward pass (0: 1 on CPU, 4 on CUDA)
    overview: bool = True               # {CASE}_overview.png
    progress: bool = True

    @property
    def mirror_axes(self) -> Tuple[int, ...]:
        return (0, 1, 2) if self.tta else ()


@dataclass
class CasePrediction:
    """Everything predicted for one case, on the input's original grids (the Python API returns this)."""

    case_id: str
    views_used: List[str] = field(default_factory=list)
    segmentation_view: Optional[str] = None
    segmentation: Optional[sitk.Image] = None          # label map on the segmentation view's original grid
    probabilities: Optional[np.ndarray] = None          # (K, z, y, x) softmax on that grid (if requested)
    diagnoses: Optional[CaseDiagnoses] = None           # probability, decision, ensemble std, review flag
    member_probabilities: Optional[np.ndarray] = None   # (n_members, D) per ensemble member
    saliency: Dict[str, Dict[str, sitk.Image]] = field(default_factory=dict)   # view -> diagnosis -> map
    attention: Dict[str, Dict[str, sitk.Image]] = field(default_factory=dict)  # whole-exam models' attention-MIL
    problems: List[str] = field(default_factory=list)   # found while predicting (discovery's are in the case)
    notes: List[str] = field(default_factory=list)

    @property
    def predicted(self) -> bool:
        return self.segmentation is not None or self.diagnoses is not None

    def most_probable_finding(self) -> Optional[str]:
        if self.diagnoses is None:
            return None
        probs = {d: p for d, p in self.diagnoses.probabilities.items() if p is not None and np.isfinite(p)}
        return max(probs, key=lambda d: probs[d]) if probs else None


@dataclass
class RoleModels:
    """The ensemble used for one role (segmentation or diagnosis) and the preprocessing it needs."""

    models: List[LoadedModel]
    key: Tuple[str, str]                 # (model folder's plans name, configuration): one preprocessing

    @property
    def plans(self) -> Dict:
        return self.models[0].plans

    @property
    def configuration(self) -> str:
        return self.models[0].configuration

    @property
    def views(self) -> List[str]:
        return sorted({v for m in self.models for v in m.config.views})


@dataclass
class CaseOutcome:
    """One case's line in problems.json and the report."""

    case: InputCase
    prediction: Optional[CasePrediction]
    files: Dict[str, List[str]] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)    # prediction-time problems (discovery's: case.problems)

    @property
    def predicted(self) -> bool:
        return self.prediction is not None and self.prediction.predicted

    @property
    def all_problems(self) -> List[str]:
        return list(self.case.problems) + [p for p in self.problems if p not in self.case.problems]


@dataclass
class PredictionRun:
    output_dir: Path
    outcomes: List[CaseOutcome]

    @property
    def num_predicted(self) -> int:
        return sum(1 for o in self.outcomes if o.predicted)


def _one_line(error: Exception) -> str:
    return str(error).replace("\n  fix: ", "; fix: ").replace("\n", " ")


def _load_ensemble(spec: ModelSpec, device: torch.device) -> List[LoadedModel]:
    return [load_trained_model(d, device, spec.checkpoint) for d in spec.fold_dirs()]


def assign_roles(selection: ModelSelection, device: torch.device) -> Dict[str, RoleModels]:
    """``{'seg': RoleModels, 'diag': RoleModels}`` (either may be absent): which loaded ensemble does what."""
    roles: Dict[str, RoleModels] = {}
    for spec in selection.models:
        models = _load_ensemble(spec, device)
        can = {"seg": all(has_segmentation(m.config) for m in models),
               "diag": all(has_diagnosis(m.config) for m in models)}
        wanted = spec.roles or tuple(r for r, ok in can.items() if ok)
        key = (str(models[0].plans.get("plans_name")), models[0].configuration)
        for role in wanted:
            if not can.get(role):
                raise OrthoError(f"model {spec.name} cannot be used for {role} (its task is "
                                 f"'{models[0].config.task}')", spec.folder,
                                 fix="fix the roles in inference_instructions.json or rerun "
                                     "ortho_find_best_configuration")
            if role in roles:
                raise OrthoError(f"two models are selected for {role}", spec.folder,
                                 fix="give each model distinct roles in inference_instructions.json")
            roles[role] = RoleModels(models, key)
    if not roles:
        raise OrthoError("the selected models can neither segment nor diagnose")
    return roles


class Predictor:
    """Predict cases with an ensemble of trained folds (segmentation and/or diagnosis).

    Build it with :meth:`from_dataset` (or from a :class:`ModelSelection`), then call :meth:`predict_case` (an
    :class:`InputCase`), :meth:`predict_images` (SimpleITK images in memory) or :meth:`predict_folder` (files on
    disk -> OUT). Each step is a method that a subclass may override (e.g. :meth:`prepare`).
    """

    def __init__(self, selection: ModelSelection, settings: Optional[PredictionSettings] = None,
                 device: Union[str, torch.device, None] = None):
        self.selection = selection
        self.settings = settings or PredictionSettings()
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.spec: DatasetSpec = selection.dataset_spec()
        self.roles = assign_roles(selection, self.device)
        self.thresholds = {d: float(selection.thresholds.get(d, 0.5)) for d in self.spec.diagnoses}
        if self.settings.explain and "diag" not in self.roles:
            raise OrthoError("--explain needs a model with a diagnosis head; the selected model only segments",
                             fix="drop --explain or pick a diag/multitask model")

    @classmethod
    def from_dataset(cls, dataset: Union[int, str, None] = None, configuration: Optional[str] = None,
                     trainer: Optional[str] = None, folds: Optional[Sequence[Union[int, str]]] = None,
                     plans_name: Optional[str] = None, checkpoint: str = "checkpoint_final.pt",
                     model_folder: Optional[PathLike] = None, device: Union[str, torch.device, None] = None,
                     **settings) -> "Predictor":
        """Resolve the models like ``ortho_predict`` does; ``settings`` are :class:`PredictionSettings` fields."""
        selection = resolve_models(dataset, configuration, trainer, plans_name, folds, checkpoint, model_folder)
        return cls(selection, PredictionSettings(**settings), device)

    # ---- describing ---------------------------------------------------------------------------------------
    @property
    def segmentation_view(self) -> Optional[str]:
        return self.roles["seg"].models[0].config.segmentation_view if "seg" in self.roles else None

    def preprocessing_groups(self) -> Dict[Tuple[str, str], RoleModels]:
        groups: Dict[Tuple[str, str], RoleModels] = {}
        for role in self.roles.values():
            if role.key in groups and groups[role.key].models is not role.models:
                groups[role.key] = RoleModels(groups[role.key].models + role.models, role.key)
            elif role.key not in groups:
                groups[role.key] = role
        return groups

    def describe(self) -> Dict:
        return {"dataset": self.selection.dataset_name, "selection": self.selection.to_dict(),
                "roles": {r: {"models": [str(m.fold_dir) for m in rm.models], "configuration": rm.configuration,
                              "views": rm.views} for r, rm in self.roles.items()},
                "device": str(self.device), "tta": self.settings.tta, "step_size": self.settings.step_size,
                "thresholds": self.thresholds}

    # ---- one case -----------------------------------------------------------------------------------------
    def prepare(self, case: InputCase) -> Dict[Tuple[str, str], PreparedCase]:
        """Read and preprocess the views each preprocessing group needs (one group unless the seg and diag
        models were trained with different plans/configurations)."""
        return {key: prepare_case(case, group.plans, group.configuration, group.views)
                for key, group in self.preprocessing_groups().items()}

    def predict_prepared(self, case: InputCase, prepared: Mapping[Tuple[str, str], PreparedCase]) -> CasePrediction:
        """Ensemble prediction of one prepared case, mapped back to its original grids."""
        pred = CasePrediction(case.case_id, segmentation_view=self.segmentation_view)
        for p in prepared.values():
            pred.problems += [x for x in p.problems if x not in pred.problems]
        pred.views_used = [v for v in self.spec.views if any(v in p.views for p in prepared.values())]
        if not pred.views_used:
            raise OrthoError(f"case {case.case_id}: no view could be read", fix="see the problems listed for it")
        seg, diag = self.roles.get("seg"), self.roles.get("diag")
        shared = seg is not None and diag is not None and seg.models is diag.models
        seg_result = diag_result = None
        if seg is not None:
            p = prepared[seg.key]
            if self.segmentation_view in p.views:
                seg_result = predict_preprocessed_case(
                    seg.models, p.data_by_view(), self.settings.mirror_axes, self.settings.step_size,
                    properties_by_view=p.properties_by_view(), segmentation=True, diagnosis=shared,
                    tile_batch=self.settings.tile_batch)
            elif not any("segmentation" in x for x in case.problems + pred.problems):
                pred.notes.append(f"no segmentation: the segmentation view '{self.segmentation_view}' is not "
                                  f"available")
        if diag is not None:
            p = prepared[diag.key]
            used = [v for v in diag.views if v in p.views]
            if shared and seg_result is not None:
                diag_result = seg_result
            elif used:
                diag_result = predict_preprocessed_case(
                    diag.models, p.data_by_view(), self.settings.mirror_axes, self.settings.step_size,
                    properties_by_view=p.properties_by_view(), segmentation=False, diagnosis=True)
            if used and len(used) < len(diag.views):
                pred.notes.append(f"diagnoses from {len(used)} of {len(diag.views)} views ({', '.join(used)}): "
                                  f"degraded, less reliable than with every view")
            if not used:
                pred.problems.append(f"no diagnosis: none of the model's views ({', '.join(diag.views)}) is "
                                     f"available")
        if seg_result is not None and seg_result["seg_probabilities"] is not None:
            self._set_segmentation(pred, seg_result["seg_probabilities"],
                                   prepared[seg.key].views[self.segmentation_view].properties)
        if diag_result is not None and diag_result["diag_probabilities"] is not None:
            self._set_diagnoses(pred, np.asarray(diag_result["diag_probabilities"], np.float64))
            if self.settings.explain:
                p = prepared[diag.key]
                cams = ensemble_grad_cam(diag.models, p.data_by_view(), self.settings.explain_method,
                                         self.settings.explain_levels)
                pred.saliency = saliency_images(cams, p.properties_by_view(),
                                                {v: p.views[v].data.shape[1:] for v in cams}, self.spec.diagnoses)
                attention = ensemble_attention(diag.models, p.data_by_view())
                pred.attention = saliency_images(attention, p.properties_by_view(),
                                                 {v: p.views[v].data.shape[1:] for v in attention},
                                                 self.spec.diagnoses)
        return pred

    def _set_segmentation(self, pred: CasePrediction, probabilities: torch.Tensor, properties: Dict) -> None:
        restored = restore_original_geometry(probabilities.numpy(), properties, is_probabilities=True)
        labels = np.argmax(restored, axis=0).astype(np.uint8 if restored.shape[0] <= 256 else np.uint16)
        pred.segmentation = array_to_image(labels, original_geometry(properties))
        if self.settings.save_probabilities:
            pred.probabilities = restored.astype(np.float32, copy=False)

    def _set_diagnoses(self, pred: CasePrediction, members: np.ndarray) -> None:
        pred.member_probabilities = members
        mean = members.mean(0)
        std = dict(zip(self.spec.diagnoses, members.std(0).tolist())) if len(members) > 1 else None
        pred.diagnoses = make_case_diagnoses(pred.case_id, dict(zip(self.spec.diagnoses, mean.tolist())),
                                             self.thresholds, std)

    def predict_case(self, case: InputCase) -> CasePrediction:
        """Prepare and predict one case in memory (nothing is written)."""
        if not case.usable:
            raise OrthoError(f"case {case.case_id} has no usable view: " + " | ".join(case.problems))
        return self.predict_prepared(case, self.prepare(case))

    def predict_images(self, images: Mapping[str, Union[sitk.Image, Sequence[sitk.Image]]],
                       case_id: str = "case") -> CasePrediction:
        """Python API: ``{view: image or [channel images]}`` in memory -> :class:`CasePrediction`."""
        case = self.for_models(input_case_from_images(case_id, dict(images), self.spec))
        pred = self.predict_case(case)
        pred.problems = list(case.problems) + pred.problems
        pred.notes = list(case.notes) + pred.notes
        return pred

    # ---- many cases ---------------------------------------------------------------------------------------
    def _safe_prepare(self, case: InputCase):
        if not case.usable:
            return None, None
        try:
            return self.prepare(case), None
        except Exception as e:  # reported per case by the consumer (OrthoError or not)
            return None, e

    def prepared_stream(self, cases: Sequence[InputCase]) -> Iterator[Tuple[InputCase, object, Optional[Exception]]]:
        """Yield ``(case, prepared, error)`` in order while up to ``num_processes`` background threads read and
        preprocess the next cases (at most ``num_processes + 1`` prepared cases are held)."""
        n = int(self.settings.num_processes)
        if n <= 0:
            for case in cases:
                yield (case, *self._safe_prepare(case))
            return
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="ortho-prepare") as pool:
            it = iter(cases)
            pending = deque((c, pool.submit(self._safe_prepare, c)) for c in itertools.islice(it, n + 1))
            while pending:
                case, future = pending.popleft()
                prepared, error = future.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(self._safe_prepare, nxt)))
                yield case, prepared, error

    def predict_folder(self, input_path: PathLike, output_dir: PathLike) -> PredictionRun:
        """Discover the cases under ``input_path`` and predict them into ``output_dir``."""
        cases = [self.for_models(c) for c in discover_inputs(input_path, self.spec)]
        return self.predict_cases(cases, output_dir, source=str(input_path))

    @property
    def model_views(self) -> List[str]:
        """The views at least one selected model reads."""
        return [v for v in self.spec.views if any(v in rm.views for rm in self.roles.values())]

    def for_models(self, case: InputCase) -> InputCase:
        """Discovery reports every dataset view a case lacks; keep what matters to the selected models."""
        return restrict_to_models(case, self.spec, self.model_views, segments="seg" in self.roles)

    def predict_cases(self, cases: Sequence[InputCase], output_dir: PathLike, source: str = "") -> PredictionRun:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        log = get_logger("predict", out / LOG_FILE)
        self._log_header(log, cases, source)
        save_json({**self.describe(), "input": source, "cases": [c.case_id for c in cases]},
                  out / "prediction_info.json")
        outcomes: List[CaseOutcome] = []
        bar = tqdm(total=len(cases), desc="predict", unit="case", disable=not self.settings.progress)
        try:
            for case, prepared, error in self.prepared_stream(cases):
                outcomes.append(self._predict_and_write(case, prepared, error, out, log))
                bar.update(1)
        finally:
            bar.close()
        run = PredictionRun(out, outcomes)
        self.write_summaries(run)
        self._log_footer(log, run)
        return run

    def _predict_and_write(self, case: InputCase, prepared, error: Optional[Exception], out: Path,
                           log: logging.Logger) -> CaseOutcome:
        outcome = CaseOutcome(case, None)
        clear_case_outputs(out, case.case_id, self.spec)
        if not case.usable:
            log.info(f"{case.case_id}: NOT PREDICTED — " + " | ".join(case.problems))
            return outcome
        try:
            if error is not None:
                raise error
            pred = self.predict_prepared(case, prepared)
            outcome.prediction = pred
            outcome.problems = list(pred.problems)
            outcome.files = write_case_outputs(out, pred, self.spec)
            if self.settings.overview:
                images = {v: (pv.image, pv.geometry) for p in prepared.values() for v, pv in p.views.items()}
                png = render_overview(pred, images, out / overview_file_name(case.case_id), self.spec,
                                      self.thresholds)
                if png is not None:
                    outcome.files["overview"] = [png.name]
        except OrthoError as e:
            outcome.problems.append(f"not predicted: {_one_line(e)}")
        except Exception as e:  # a bug or an unforeseen input: report it for this case, go on with the others
            if os.environ.get("ORTHO_DEBUG"):
                raise
            with open(out / LOG_FILE, "a", encoding="utf-8") as f:
                f.write(traceback.format_exc())
            outcome.problems.append(f"not predicted: unexpected error ({type(e).__name__}: {e}); details in "
                                    f"{LOG_FILE} (set ORTHO_DEBUG=1 to stop at the error)")
        if outcome.prediction is not None and not outcome.predicted:
            outcome.problems.append("not predicted: the available views were not enough for any model")
        self._log_case(log, outcome)
        return outcome

    def write_summaries(self, run: PredictionRun) -> None:
        """diagnoses.csv/.json (predicted cases with diagnoses), problems.json and report.html."""
        out = run.output_dir
        rows = [o.prediction.diagnoses for o in run.outcomes if o.prediction and o.prediction.diagnoses]
        if "diag" in self.roles:
            write_diagnoses_csv(out / "diagnoses.csv", rows, self.spec.diagnoses)
            write_diagnoses_json(out / "diagnoses.json", rows, self.spec.diagnoses, self.thresholds)
        problems = {o.case.case_id: {"predicted": o.predicted, "problems": o.all_problems,
                                     "notes": list(o.case.notes) + (o.prediction.notes if o.prediction else [])}
                    for o in run.outcomes if o.all_problems or not o.predicted}
        save_json({"num_cases": len(run.outcomes), "num_predicted": run.num_predicted,
                   "not_predicted": [o.case.case_id for o in run.outcomes if not o.predicted],
                   "cases": problems}, out / "problems.json")
        reports = []
        for o in run.outcomes:
            pred = o.prediction
            r = case_report(o.case, pred.diagnoses if pred else None, first_file(o.files, "segmentation"),
                            [p for p in o.problems if p not in o.case.problems])
            if pred is not None:
                r.views_used = list(pred.views_used)
                r.notes = r.notes + [n for n in pred.notes if n not in r.notes]
            r.skipped = not o.predicted
            reports.append(r)
        models = "; ".join(m.describe() for m in self.selection.models)
        write_report(out, reports, self.spec.diagnoses, self.thresholds,
                     title=f"orthonet prediction — {self.selection.dataset_name}",
                     meta={"model": models, "test-time mirroring": "on" if self.settings.tta else "off",
                           "thresholds": "cross-validated" if self.selection.thresholds else "0.5"})

    # ---- console ------------------------------------------------------------------------------------------
    def _log_header(self, log: logging.Logger, cases: Sequence[InputCase], source: str) -> None:
        log.info(f"ortho_predict: {len(cases)} case(s) from {source or 'memory'} on {self.device}")
        for m in self.selection.models:
            log.info(f"  model: {m.describe()}")
        for note in self.selection.notes:
            log.info(f"  {note}")

    @staticmethod
    def _log_case(log: logging.Logger, o: CaseOutcome) -> None:
        status = "predicted" if o.predicted else "NOT PREDICTED"
        problems = o.all_problems
        line = f"{o.case.case_id}: {status}" + (f" — {len(problems)} problem(s): " + " | ".join(problems)
                                                 if problems else "")
        if o.prediction is not None and o.prediction.notes:
            line += " (" + "; ".join(o.prediction.notes) + ")"
        log.info(line)

    @staticmethod
    def _log_footer(log: logging.Logger, run: PredictionRun) -> None:
        bad = [o.case.case_id for o in run.outcomes if not o.predicted]
        with_problems = sum(1 for o in run.outcomes if o.all_problems)
        log.info(f"done: {run.num_predicted} of {len(run.outcomes)} case(s) predicted"
                 + (f"; not predicted: {', '.join(bad)}" if bad else "")
                 + (f"; {with_problems} case(s) with problems (see problems.json)" if with_problems else "")
                 + f"; report: {run.output_dir / 'report.html'}")
