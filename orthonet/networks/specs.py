"""Small, plans-like network entries for tests and examples.

Why: tests of the networks must not wait for (or depend on) the planner; these entries have exactly the shape the
planner writes into plans.json (nnU-Net v2 ``architecture`` format), just tiny.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

_PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
_RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def make_test_spec(dim: int = 3, n_stages: int = 3, features: Sequence[int] = (8, 16, 32), resenc: bool = False,
                   anisotropic: bool = False, strides: Optional[Sequence[Sequence[int]]] = None,
                   kernel_sizes: Optional[Sequence[Sequence[int]]] = None) -> Dict:
    """A plans.json ``network`` entry for a tiny U-Net.

    ``anisotropic`` (3D only) gives the first stage in-plane-only kernels and the first downsampling in-plane only,
    as the planner does for thick-slice views.
    """
    if len(features) != n_stages:
        raise ValueError("features must have n_stages entries")
    if strides is None:
        strides = [[1] * dim] + [[2] * dim for _ in range(n_stages - 1)]
        if anisotropic and dim == 3 and n_stages > 1:
            strides[1] = [1, 2, 2]
    if kernel_sizes is None:
        kernel_sizes = [[3] * dim for _ in range(n_stages)]
        if anisotropic and dim == 3:
            kernel_sizes[0] = [1, 3, 3]
    conv = f"torch.nn.modules.conv.Conv{dim}d"
    norm = f"torch.nn.modules.instancenorm.InstanceNorm{dim}d"
    kwargs = {
        "n_stages": n_stages,
        "features_per_stage": list(features),
        "conv_op": conv,
        "kernel_sizes": [list(k) for k in kernel_sizes],
        "strides": [list(s) for s in strides],
        "n_conv_per_stage_decoder": [1] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": norm,
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    if resenc:
        kwargs["n_blocks_per_stage"] = [1] + [2] * (n_stages - 1)
    else:
        kwargs["n_conv_per_stage"] = [2] * n_stages
    return {"class_name": _RESENC if resenc else _PLAIN, "kwargs": kwargs,
            "kwargs_requiring_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
