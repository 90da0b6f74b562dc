from .box_prompted import BoxPromptedSegmenter, annotate_dataset
from .prompts import Prompts, perturb_boxes, read_prompts

__all__ = ["BoxPromptedSegmenter", "Prompts", "annotate_dataset", "perturb_boxes", "read_prompts"]
