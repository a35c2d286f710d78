"""Training data: which cases exist (dataset), where patches are cut (sampling), how they are augmented
(augmentation), how one batch is made (sources), background workers (loader) and plan-configured loaders
(factory)."""
from training.data.dataset import CaseArrays, PreprocessedCaseStore
from training.data.loader import BatchLoader, LoaderError
from training.data.sources import ImageBatchSource, LoadTracker, MultiviewBatchSource, SegBatchSource

__all__ = ["CaseArrays", "PreprocessedCaseStore", "BatchLoader", "LoaderError", "ImageBatchSource", "LoadTracker",
           "MultiviewBatchSource", "SegBatchSource"]
