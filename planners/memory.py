"""How much GPU memory a configuration needs: DNA's feature-map count, calibrated against nnU-Net's references.

Why this estimate: activation memory dominates U-Net training and is proportional to the number of feature-map
voxels the network computes for one patch, which every dynamic-network-architectures U-Net reports through
``compute_conv_feature_map_size``. nnU-Net calibrated that count against measured memory: a plain 3D U-Net whose
count is 560e6 trains with batch size 2 in about 8 GB, a 2D one with count 85e6 with batch size 12 (ResEnc: 680e6
and 135e6). We keep those references, so ``estimated_gb = count * batch / ref_batch / ref_count * 8``.
The network is built on PyTorch's ``meta`` device: no weights are allocated, one estimate takes milliseconds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Sequence

from orthonet.networks.build import build_network

REFERENCE_GB = 8.0


@dataclass(frozen=True)
class MemoryReference:
    """Feature-map count that trains with ``batch_size`` in :data:`REFERENCE_GB` GB."""

    count: float
    batch_size: int


@lru_cache(maxsize=4096)
def _count(entry_json: str, patch_size: tuple, input_channels: int, num_classes: int) -> int:
    net = build_network(json.loads(entry_json), input_channels, num_classes, deep_supervision=True, device="meta")
    return int(net.compute_conv_feature_map_size(list(patch_size)))


def feature_map_count(entry: Dict, patch_size: Sequence[int], input_channels: int, num_classes: int) -> int:
    """Feature-map voxels of one forward pass of the network in ``entry`` on one patch (cached)."""
    return _count(json.dumps(entry, sort_keys=True), tuple(int(p) for p in patch_size), int(input_channels),
                  int(num_classes))


def estimated_gb(count: float, batch_size: int, reference: MemoryReference) -> float:
    """Estimated training memory in GB for ``batch_size`` patches."""
    return float(count) * batch_size / reference.batch_size / reference.count * REFERENCE_GB


def max_batch_size(count: float, budget_gb: float, reference: MemoryReference) -> int:
    """Largest batch that fits ``budget_gb`` (may be below the planner's minimum; the caller clamps)."""
    per_sample = estimated_gb(count, 1, reference)
    return int(budget_gb // per_sample) if per_sample > 0 else 10 ** 6
