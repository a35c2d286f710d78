"""Turn a plans.json ``network`` entry into modules.

Why one place: the diffusion pretrainer, the segmentation/diagnosis trainers and inference must all build *the same*
encoder from the same entry, or pretrained weights stop loading. The entry is nnU-Net v2's ``architecture`` format::

    {"class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
     "kwargs": {...}, "kwargs_requiring_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}

``kwargs`` never holds ``input_channels``, ``num_classes`` or ``deep_supervision``: the consumer supplies them.
"""
from __future__ import annotations

import copy
import pydoc
from typing import Any, Dict, List, Optional, Sequence

from torch import nn

from orthonet.errors import OrthoError

#: Keys the consumer supplies; a spec that carries them is rejected (they would silently fight the caller).
CONSUMER_KEYS = ("input_channels", "num_classes", "deep_supervision")


def _locate(name: str, what: str) -> Any:
    obj = pydoc.locate(name)
    if obj is None:
        raise OrthoError(f"cannot import {what} '{name}' named in the plans' network entry",
                         fix="correct the dotted path in plans.json (e.g. torch.nn.modules.conv.Conv3d) or "
                             "install the package that provides it")
    return obj


def _check_spec(spec: Dict) -> None:
    if not isinstance(spec, dict) or "class_name" not in spec or "kwargs" not in spec:
        raise OrthoError("network entry must be a dict with 'class_name' and 'kwargs'",
                         fix="re-run ortho_plan_and_preprocess or repair the 'network' entry of plans.json")
    bad = [k for k in CONSUMER_KEYS if k in spec["kwargs"]]
    if bad:
        raise OrthoError(f"network kwargs must not contain {bad}: they are supplied by the trainer",
                         fix="remove these keys from the 'network' entry of plans.json")


def network_spec(plans: Dict, view: str, configuration: str) -> Dict:
    """The ``network`` entry of ``plans['views'][view]['configurations'][configuration]`` with clear errors."""
    views = plans.get("views", {})
    if view not in views:
        raise OrthoError(f"view '{view}' is not in the plans (have: {sorted(views)})",
                         fix="pick one of the planned views or re-plan the dataset")
    configs = views[view].get("configurations", {})
    if configuration not in configs:
        raise OrthoError(f"configuration '{configuration}' is not planned for view '{view}' "
                         f"(have: {sorted(configs)})", fix="pick one of the planned configurations")
    spec = configs[configuration].get("network")
    _check_spec(spec)
    return spec


def resolve_network_kwargs(spec: Dict) -> Dict:
    """Copy of ``spec['kwargs']`` with every entry named in ``kwargs_requiring_import`` imported (None stays None)."""
    _check_spec(spec)
    kwargs = copy.deepcopy(spec["kwargs"])
    for key in spec.get("kwargs_requiring_import", []):
        value = kwargs.get(key)
        if isinstance(value, str):
            kwargs[key] = _locate(value, key)
    return kwargs


def network_class(spec: Dict) -> type:
    """The architecture class named by ``spec['class_name']``."""
    _check_spec(spec)
    cls = _locate(spec["class_name"], "network class")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise OrthoError(f"'{spec['class_name']}' is not a torch.nn.Module class",
                         fix="name a dynamic_network_architectures architecture in the plans' network entry")
    return cls


def initialize_network(network: nn.Module) -> nn.Module:
    """Initialise as nnU-Net does: ``network.apply(network.initialize)`` when the class defines it (He init,
    plus zero-init of the last norm before each residual add for residual encoders)."""
    if hasattr(network, "initialize"):
        network.apply(network.initialize)
    return network


def build_network(spec: Dict, input_channels: int, num_classes: int, deep_supervision: bool = False,
                  device: Optional[str] = None) -> nn.Module:
    """The plain DNA segmentation network of a plans ``network`` entry, initialised as DNA/nnU-Net does.

    The one resolver of plans' network entries: the trainers, the pretrainer, the predictor and the planner's
    memory estimate all build through it. ``device='meta'`` builds the module without allocating (or
    initialising) weights, which is all the planner needs to count feature-map voxels.
    """
    import torch
    cls = network_class(spec)
    kwargs = resolve_network_kwargs(spec)
    try:
        with torch.device(device or "cpu"):
            network = cls(input_channels=input_channels, num_classes=num_classes, deep_supervision=deep_supervision,
                          **kwargs)
    except (TypeError, AssertionError, ValueError) as e:
        raise OrthoError(f"cannot build {spec['class_name'].rsplit('.', 1)[-1]} from the plans' network entry: {e}",
                         fix="repair the network kwargs in plans.json (or re-plan the dataset)") from None
    return network if device == "meta" else initialize_network(network)


def build_encoder(spec: Dict, input_channels: int) -> nn.Module:
    """The DNA encoder of the spec's architecture alone (PlainConvEncoder / ResidualEncoder, ``return_skips=True``).

    Built through the full architecture and detached from it so that any DNA class with an ``encoder`` attribute
    works and its parameter names and initialisation are exactly those of ``build_network(...).encoder``.
    """
    network = build_network(spec, input_channels, num_classes=1, deep_supervision=False)
    encoder = getattr(network, "encoder", None)
    if encoder is None:
        raise OrthoError(f"{spec['class_name']} has no 'encoder' submodule",
                         fix="use a U-Net architecture from dynamic_network_architectures in plans.json")
    encoder.return_skips = True
    return encoder


def encoder_output_channels(spec: Dict) -> List[int]:
    """Feature channels of each encoder stage (the skips, bottleneck last)."""
    kwargs = spec["kwargs"]
    n_stages = int(kwargs["n_stages"])
    feats = kwargs["features_per_stage"]
    if isinstance(feats, int):
        return [feats] * n_stages
    return [int(f) for f in feats]


def encoder_strides(spec: Dict) -> List[List[int]]:
    """Per-stage stride (list per axis) and, through :func:`cumulative_strides`, each level's downsampling."""
    kwargs = spec["kwargs"]
    n_stages = int(kwargs["n_stages"])
    dim = conv_dim(spec)
    strides = kwargs["strides"]
    if isinstance(strides, int):
        strides = [strides] * n_stages
    return [[int(s)] * dim if isinstance(s, int) else [int(v) for v in s] for s in strides]


def cumulative_strides(spec: Dict) -> List[List[int]]:
    """Total downsampling of each encoder level relative to the input (voxel j of level l sits at input voxel
    j * cumulative_strides[l])."""
    out, acc = [], None
    for s in encoder_strides(spec):
        acc = list(s) if acc is None else [a * b for a, b in zip(acc, s)]
        out.append(acc)
    return out


def conv_dim(spec: Dict) -> int:
    """2 or 3, from the spec's conv_op."""
    op = spec["kwargs"].get("conv_op")
    name = op if isinstance(op, str) else getattr(op, "__name__", str(op))
    if name.endswith("Conv3d"):
        return 3
    if name.endswith("Conv2d"):
        return 2
    raise OrthoError(f"unsupported conv_op '{name}' in the plans' network entry",
                     fix="use torch.nn.modules.conv.Conv2d or Conv3d")


#: Encoder levels used for global (diagnosis) features by default: the last three stages. Diffusion features are
#: most informative in the deeper, semantic half of the U-Net; very shallow levels mostly encode texture/noise.
DEFAULT_FEATURE_LEVELS = (-3, -2, -1)


def resolve_levels(levels: Optional[Sequence[int]], n_stages: int) -> List[int]:
    """Normalise (possibly negative) encoder level indices to ``0..n_stages-1``, keeping order, no duplicates.

    ``None`` means :data:`DEFAULT_FEATURE_LEVELS`, clipped to the stages the network has.
    """
    if levels is None:
        return list(range(max(0, n_stages - len(DEFAULT_FEATURE_LEVELS)), n_stages))
    out: List[int] = []
    for lv in levels:
        i = int(lv) + n_stages if int(lv) < 0 else int(lv)
        if not 0 <= i < n_stages:
            raise ValueError(f"level {lv} out of range for {n_stages} encoder stages")
        if i not in out:
            out.append(i)
    return out
