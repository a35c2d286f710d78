"""Every nn.Module of orthonet, built from a plans.json ``network`` entry and dynamic-network-architectures blocks.

See docs/networks.md for the state-dict naming and how pretrained diffusion weights flow into the task models.
"""
from orthonet.networks.build import (DEFAULT_FEATURE_LEVELS, build_encoder, build_network, cumulative_strides,
                                     encoder_output_channels, network_spec, resolve_levels, resolve_network_kwargs)
from orthonet.networks.cross_view import (CrossViewBottleneckFusion, feature_affine, patch_affine,
                                          preprocessed_index_to_physical, sample_into_grid)
from orthonet.networks.diagnosis import DiagnosisHead, MultiViewDiagnosisModel
from orthonet.networks.diffusion_unet import DiffusionUNet
from orthonet.networks.fusion import ConcatMLPFusion, CrossViewAttentionFusion
from orthonet.networks.heads import AttentionPool, MeanPool, MultiLevelPooling, ViewDiagnosisHead
from orthonet.networks.multitask import (SEG_HEADS, LoadReport, MultiTaskModel, SegmentationModel,
                                         load_pretrained_decoder, load_pretrained_encoder)
from orthonet.networks.pyramid_head import PyramidSegmentationHead
from orthonet.networks.specs import make_test_spec

__all__ = ["DEFAULT_FEATURE_LEVELS", "build_encoder", "build_network", "cumulative_strides", "encoder_output_channels",
           "network_spec", "resolve_levels", "resolve_network_kwargs", "CrossViewBottleneckFusion", "feature_affine",
           "patch_affine", "preprocessed_index_to_physical", "sample_into_grid", "DiagnosisHead",
           "MultiViewDiagnosisModel", "DiffusionUNet", "ConcatMLPFusion", "CrossViewAttentionFusion",
           "AttentionPool", "MeanPool", "MultiLevelPooling", "ViewDiagnosisHead", "SEG_HEADS", "LoadReport",
           "MultiTaskModel", "PyramidSegmentationHead",
           "SegmentationModel", "load_pretrained_decoder", "load_pretrained_encoder", "make_test_spec"]
