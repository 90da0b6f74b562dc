from .box_prompted import BoxPromptedSegmenter, annotate_dataset

__all__ = ["BoxPromptedSegmenter", "annotate_dataset"]
