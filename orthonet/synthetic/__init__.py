"""Synthetic multi-view MSK exams: continuous phantoms in physical millimetres, sampled per view like a scanner.

Public API::

    from orthonet.synthetic import make_dataset, generate_case
    make_dataset(raw / "Dataset101_Knee", joint="knee", n_train=20, n_test=5, size="small")
    case = generate_case("knee", seed=3, size="tiny", lesions={"acl_tear": True})
    case.views["sagittal"].image, case.views["sagittal"].labels, case.views["sagittal"].geometry

Modules: ``shapes`` (signed-distance primitives), ``intensities`` (PD-FS tissue signal, centres), ``phantom``
(structures in bone frames), ``acquisition`` (partial-volume slices, bias, Rician noise, size presets),
``knee`` / ``ankle`` / ``shoulder`` (anatomy and lesions), ``case`` (one exam), ``writer`` (a dataset folder),
``cli`` (``ortho_make_synthetic``), ``views`` (scanner view grids).
"""
from orthonet.synthetic.acquisition import PRESETS, SizePreset, resolve_preset
from orthonet.synthetic.case import SEGMENTATION_VIEW, VIEWS, SyntheticCase, ViewData, generate_case
from orthonet.synthetic.intensities import CENTERS, CenterProfile, center_profile
from orthonet.synthetic.joints import JointModel, get_joint, joint_names
from orthonet.synthetic.writer import EXTRA_FILES, case_id, case_seed, make_dataset

__all__ = ["make_dataset", "generate_case", "SyntheticCase", "ViewData", "VIEWS", "SEGMENTATION_VIEW", "PRESETS",
           "SizePreset", "resolve_preset", "CENTERS", "CenterProfile", "center_profile", "JointModel", "get_joint",
           "joint_names", "EXTRA_FILES", "case_id", "case_seed"]
