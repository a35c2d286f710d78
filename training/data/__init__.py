"""Training data: which cases exist (dataset), where patches are cut (sampling), how they are augmented
(augmentation), how one batch is made (sources), background workers (loader) and plan-configured loaders
(factory)."""
from orthonet.training.data.dataset import CaseArrays, PreprocessedCaseStore
from orthonet.training.data.loader import BatchLoader, LoaderError
from orthonet.training.data.sources import ImageBatchSource, LoadTracker, MultiviewBatchSource, SegBatchSource

__all__ = ["CaseArrays", "PreprocessedCaseStore", "BatchLoader", "LoaderError", "ImageBatchSource", "LoadTracker",
           "MultiviewBatchSource", "SegBatchSource"]
