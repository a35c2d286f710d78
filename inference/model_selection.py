"""Which trained model(s) ``ortho_predict`` uses, with which folds and decision thresholds.

Order of precedence (documented in docs/inference.md):

1. explicit: ``--model-folder PATH`` or any of ``-c/-tr/-p/-f`` (the rest default to ``3d_fullres``,
   ``orthoPlans``, the default trainer of the dataset's task and every fold that has a checkpoint);
2. ``$ORTHO_results/DatasetXXX/inference_instructions.json`` written by ``ortho_find_best_configuration``;
3. the default trainer of the dataset's task (multitask when it has labels and diagnoses) with ``3d_fullres`` and
   whichever folds exist.

Why a separate step: "which model" is a decision a user must be able to read back (it is logged and written to
``OUT/prediction_info.json``) and override, independent of how prediction runs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from orthonet.dataset import DatasetSpec, parse_dataset_json
from orthonet.errors import OrthoError
from orthonet.fileio import load_json
from orthonet.paths import raw_root, resolve_dataset_name, results_root

PathLike = Union[str, Path]

INSTRUCTIONS_FILE = "inference_instructions.json"
DEFAULT_CONFIGURATION = "3d_fullres"
DEFAULT_PLANS = "orthoPlans"
DEFAULT_CHECKPOINT = "checkpoint_final.pt"
#: The default trainer of each task (kept in sync with orthonet.training.trainers.DEFAULT_TRAINER_FOR_TASK, not imported
#: so that choosing a model does not import the training stack).
DEFAULT_TRAINER_FOR_TASK = {"seg": "SegTrainer", "diag": "DiagTrainer", "multitask": "MultitaskTrainer"}
#: ... and the default ``ortho_train`` picks when pretrained encoders are loaded (DEFAULT_TRAINER_WITH_PRETRAINING).
DEFAULT_TRAINER_WITH_PRETRAINING = {"seg": "SegTrainerPyramid", "diag": "DiagTrainer",
                                    "multitask": "MultitaskTrainerPyramid"}
ROLES = ("seg", "diag")
_FOLD_RE = re.compile(r"^fold_(\d+|all)$")


@dataclass
class ModelSpec:
    """One trained model folder, the folds to ensemble and what it is used for (``roles``: seg and/or diag;
    None = whatever the model can do)."""

    folder: Path
    folds: List[str]
    checkpoint: str = DEFAULT_CHECKPOINT
    roles: Optional[Tuple[str, ...]] = None

    @property
    def name(self) -> str:
        return self.folder.name

    def fold_dirs(self) -> List[Path]:
        return [self.folder / f"fold_{f}" for f in self.folds]

    def describe(self) -> str:
        roles = f" for {'+'.join(self.roles)}" if self.roles else ""
        return f"{self.name} (folds {', '.join(self.folds)}, {self.checkpoint}){roles}"


@dataclass
class ModelSelection:
    """What to predict with: models, decision thresholds and where the choice came from."""

    dataset_name: str
    models: List[ModelSpec]
    thresholds: Dict[str, float] = field(default_factory=dict)
    source: str = "default"                    # explicit | instructions | default
    notes: List[str] = field(default_factory=list)

    def dataset_spec(self) -> DatasetSpec:
        """dataset.json as copied next to the (first) model: the labels and diagnoses the model was trained on."""
        folder = self.models[0].folder
        spec, problems = parse_dataset_json(folder)
        if spec is None or problems:
            raise OrthoError("the model folder's dataset.json copy is missing or invalid" +
                             ("".join(f"\n  {p}" for p in problems)), folder / "dataset.json",
                             fix="copy the dataset's dataset.json into the model folder (ortho_train writes it)")
        return spec

    def to_dict(self) -> Dict:
        return {"dataset_name": self.dataset_name, "source": self.source,
                "models": [{"folder": str(m.folder), "folds": list(m.folds), "checkpoint": m.checkpoint,
                            "roles": list(m.roles) if m.roles else None} for m in self.models],
                "thresholds": dict(self.thresholds), "notes": list(self.notes)}


# ------------------------------------------------------------------------------------------------------------
# what exists
# ------------------------------------------------------------------------------------------------------------
def _fold_sort_key(fold: str) -> Tuple[int, int]:
    return (1, 0) if fold == "all" else (0, int(fold))


def available_folds(folder: Path, checkpoint: str = DEFAULT_CHECKPOINT) -> List[str]:
    """Folds of a model folder that hold ``checkpoint`` (``checkpoint_final.pt`` falls back to ``_best``, as
    :func:`orthonet.inference.predict_core.load_trained_model` does), sorted 0, 1, ..., all."""
    folds = []
    for sub in folder.iterdir() if folder.is_dir() else []:
        m = _FOLD_RE.match(sub.name)
        if m and sub.is_dir() and _has_checkpoint(sub, checkpoint):
            folds.append(m.group(1))
    return sorted(folds, key=_fold_sort_key)


def _has_checkpoint(fold_dir: Path, checkpoint: str) -> bool:
    if (fold_dir / checkpoint).is_file():
        return True
    return checkpoint == DEFAULT_CHECKPOINT and (fold_dir / "checkpoint_best.pt").is_file()


def list_trained_models(results_dir: Path, checkpoint: str = DEFAULT_CHECKPOINT) -> Dict[str, List[str]]:
    """``{model folder name: [folds with a checkpoint]}`` for every ``{Trainer}__{plans}__{config}...`` folder."""
    out: Dict[str, List[str]] = {}
    for sub in sorted(results_dir.iterdir()) if results_dir.is_dir() else []:
        if sub.is_dir() and "__" in sub.name and not sub.name.startswith("Pretrain__"):
            out[sub.name] = available_folds(sub, checkpoint)
    return out


def describe_trained_models(results_dir: Path, checkpoint: str = DEFAULT_CHECKPOINT) -> str:
    found = list_trained_models(results_dir, checkpoint)
    if not found:
        return f"no trained model in {results_dir}"
    return "trained models in " + str(results_dir) + ": " + "; ".join(
        f"{name} (folds {', '.join(f) if f else 'none with ' + checkpoint})" for name, f in found.items())


def dataset_task(spec: DatasetSpec) -> str:
    """What the dataset has labels for: multitask, seg or diag."""
    if spec.has_segmentation and spec.diagnoses:
        return "multitask"
    return "diag" if spec.diagnoses else "seg"


def find_dataset_spec(dataset_name: str) -> DatasetSpec:
    """dataset.json from the raw dataset, else from any trained model folder (prediction on a results-only
    machine)."""
    candidates = [raw_root() / dataset_name] + sorted((results_root() / dataset_name).glob("*/"))
    for folder in candidates:
        if (folder / "dataset.json").is_file():
            spec, problems = parse_dataset_json(folder)
            if spec is not None and not problems:
                return spec
    raise OrthoError(f"no dataset.json for {dataset_name} (looked in {raw_root() / dataset_name} and the model "
                     f"folders in {results_root() / dataset_name})",
                     fix="set ORTHO_raw / ORTHO_results to where the dataset and the trained models are")


# ------------------------------------------------------------------------------------------------------------
# choosing
# ------------------------------------------------------------------------------------------------------------
def _check_folds(folder: Path, folds: Optional[Sequence[Union[int, str]]], checkpoint: str) -> List[str]:
    results_dir = folder.parent
    if not folder.is_dir():
        raise OrthoError(f"no trained model folder {folder.name}; {describe_trained_models(results_dir, checkpoint)}",
                         folder, fix="pick one of them with -tr/-c/-p (or --model-folder), or train it first "
                                     "(ortho_train DATASET CONFIG FOLD -tr TRAINER)")
    have = available_folds(folder, checkpoint)
    if folds is None or len(folds) == 0:
        numeric = [f for f in have if f != "all"]
        chosen = numeric or have
        if not chosen:
            raise OrthoError(f"model {folder.name} has no fold with {checkpoint}; "
                             f"{describe_trained_models(results_dir, checkpoint)}", folder,
                             fix="finish training at least one fold, or pass --checkpoint checkpoint_best.pt / "
                                 "checkpoint_latest.pt")
        return chosen
    wanted = [str(f) for f in folds]
    missing = [f for f in wanted if f not in have]
    if missing:
        raise OrthoError(f"model {folder.name}: fold(s) {', '.join(missing)} have no {checkpoint} "
                         f"(available: {', '.join(have) or 'none'})", folder,
                         fix="pass only trained folds with -f, or train the missing ones")
    return wanted


def instructions_path(dataset_name: str) -> Path:
    return results_root() / dataset_name / INSTRUCTIONS_FILE


def load_instructions(path: Path) -> Dict:
    """Read and check inference_instructions.json (written by ortho_find_best_configuration)."""
    data = load_json(path, "inference instructions")
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) and "folder" in m and "folds" in m
                                                              for m in models):
        raise OrthoError("inference instructions lack a 'models' list of {folder, folds}", path,
                         fix="rerun ortho_find_best_configuration, or delete the file to use the default model")
    if not isinstance(data.get("thresholds", {}), dict):
        raise OrthoError("'thresholds' must map diagnosis names to numbers", path,
                         fix="rerun ortho_find_best_configuration")
    return data


def _selection_from_instructions(dataset_name: str, path: Path, checkpoint: str) -> ModelSelection:
    data = load_instructions(path)
    base = path.parent
    models = []
    for m in data["models"]:
        folder = Path(m["folder"])
        folder = folder if folder.is_absolute() else base / folder
        folds = _check_folds(folder, [str(f) for f in m["folds"]], checkpoint)
        roles = tuple(r for r in m.get("roles", ROLES) if r in ROLES) or None
        models.append(ModelSpec(folder, folds, checkpoint, roles))
    thresholds = {str(k): float(v) for k, v in (data.get("thresholds") or {}).items()}
    return ModelSelection(dataset_name, models, thresholds, "instructions",
                          [f"model chosen by {path} (ortho_find_best_configuration)"])


def _thresholds_for(dataset_name: str, model: ModelSpec) -> Tuple[Dict[str, float], List[str]]:
    """Thresholds from the instructions when they were chosen for this very model folder, else none (0.5)."""
    spec, _ = parse_dataset_json(model.folder)
    if spec is not None and not spec.diagnoses:
        return {}, []
    path = instructions_path(dataset_name)
    if path.is_file():
        try:
            data = load_instructions(path)
        except OrthoError as e:
            return {}, [f"ignored {path}: {e.message}"]
        diag_models = [m for m in data["models"] if "diag" in m.get("roles", ROLES)]
        if any(Path(m["folder"]).name == model.folder.name for m in diag_models):
            thresholds = {str(k): float(v) for k, v in (data.get("thresholds") or {}).items()}
            return thresholds, [f"decision thresholds from {path}"]
    return {}, ["no cross-validated thresholds for this model (run ortho_find_best_configuration): diagnoses "
                "are decided at 0.5"]


def resolve_models(dataset: Union[int, str, None] = None, configuration: Optional[str] = None,
                   trainer: Optional[str] = None, plans_name: Optional[str] = None,
                   folds: Optional[Sequence[Union[int, str]]] = None, checkpoint: str = DEFAULT_CHECKPOINT,
                   model_folder: Optional[PathLike] = None) -> ModelSelection:
    """The models to predict with (see the module docstring for the order of precedence)."""
    if model_folder is not None:
        folder = Path(model_folder).expanduser().resolve()
        name = folder.parent.name if dataset is None else resolve_dataset_name(dataset)
        spec = ModelSpec(folder, _check_folds(folder, folds, checkpoint), checkpoint)
        thresholds, notes = _thresholds_for(name, spec)
        return ModelSelection(name, [spec], thresholds, "explicit", notes)
    if dataset is None:
        raise OrthoError("no dataset given", fix="pass -d DATASET (id or name) or --model-folder PATH")
    name = resolve_dataset_name(dataset)
    results_dir = results_root() / name
    explicit = any(x is not None for x in (configuration, trainer, plans_name)) or bool(folds)
    if not explicit and instructions_path(name).is_file():
        return _selection_from_instructions(name, instructions_path(name), checkpoint)
    suffix = f"__{plans_name or DEFAULT_PLANS}__{configuration or DEFAULT_CONFIGURATION}"
    if trainer is None:
        folder, found_note = _default_trainer_folder(results_dir, dataset_task(find_dataset_spec(name)), suffix,
                                                     folds, checkpoint)
    else:
        folder, found_note = _trained_variant(results_dir, trainer if "__" in trainer else trainer + suffix, folds,
                                              checkpoint)
    spec = ModelSpec(folder, _check_folds(folder, folds, checkpoint), checkpoint)
    thresholds, notes = _thresholds_for(name, spec)
    return ModelSelection(name, [spec], thresholds, "explicit" if explicit else "default", found_note + notes)


def _default_trainer_folder(results_dir: Path, task: str, suffix: str, folds: Optional[Sequence[Union[int, str]]],
                            checkpoint: str) -> Tuple[Path, List[str]]:
    """The model ``ortho_train`` wrote without ``-tr``: the plain default trainer's folder or the pyramid one it
    uses with pretrained encoders (or their only trained variant). Both trained: the user says which."""
    names = list(dict.fromkeys([DEFAULT_TRAINER_FOR_TASK[task], DEFAULT_TRAINER_WITH_PRETRAINING[task]]))
    found = []
    for name in names:
        folder, note = _trained_variant(results_dir, name + suffix, folds, checkpoint)
        if folder.is_dir() and available_folds(folder, checkpoint):
            found.append((folder, note))
    if len(found) > 1:
        raise OrthoError(f"the default trainers of this task were both trained: {', '.join(f.name for f, _ in found)}",
                         results_dir, fix="pick one with -tr (or run ortho_find_best_configuration, which compares "
                                          "them and writes inference_instructions.json)")
    if found:
        return found[0]
    return _trained_variant(results_dir, names[0] + suffix, folds, checkpoint)


def _trained_variant(results_dir: Path, folder_name: str, folds: Optional[Sequence[Union[int, str]]],
                     checkpoint: str) -> Tuple[Path, List[str]]:
    """``folder_name`` itself, or else its only trained variant (``__scratch``, ``__lf0.1`` ...: the suffixes
    ``ortho_train`` adds for --pretrained none and label fractions) that has the requested folds. With several
    variants the caller's error lists them all: which one is meant is the user's call."""
    folder = results_dir / folder_name
    if folder.is_dir() or not results_dir.is_dir():
        return folder, []
    wanted = [str(f) for f in folds] if folds else None
    matches = []
    for sub in sorted(results_dir.glob(folder_name + "__*")):
        have = available_folds(sub, checkpoint) if sub.is_dir() else []
        if have and (wanted is None or all(f in have for f in wanted)):
            matches.append(sub)
    if len(matches) != 1:
        return folder, []
    return matches[0], [f"model folder {folder_name} does not exist; using {matches[0].name}, the only trained "
                        f"model of that trainer, plans and configuration"]
