"""Residual-encoder planner: the default policy with dynamic-network-architectures' ResidualEncoderUNet.

As nnU-Net's ResEnc presets: more blocks in the deeper encoder stages (1, 3, 4, 6, 6, ...), one conv per decoder
stage, and a larger memory reference (a ResEnc U-Net with feature-map count 680e6 trains with batch 2 in ~8 GB).
"""
from __future__ import annotations

from typing import Dict

from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

from orthonet.planners.memory import MemoryReference
from orthonet.planners.planner import DefaultPlanner
from orthonet.planners.topology import Topology


class ResEncPlanner(DefaultPlanner):
    network_class = ResidualEncoderUNet
    default_plans_name = "orthoResEncPlans"
    encoder_blocks_per_stage = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6)
    decoder_blocks_per_stage = (1,) * 12
    reference_3d = MemoryReference(680e6, 2)
    reference_2d = MemoryReference(135e6, 12)

    def network_kwargs(self, topology: Topology, dim: int) -> Dict:
        kwargs = super().network_kwargs(topology, dim)
        blocks = kwargs.pop("n_conv_per_stage")
        # keep DNA's argument order readable: n_blocks_per_stage where PlainConvUNet has n_conv_per_stage
        out = {}
        for key, value in kwargs.items():
            out[key] = value
            if key == "strides":
                out["n_blocks_per_stage"] = blocks
        return out
