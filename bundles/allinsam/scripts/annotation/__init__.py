from .box_prompted import BoxPromptedSegmenter, annotate_dataset
from .marker_classes import assign_marker_classes, class_map, write_marker_labels
from .prompts import Prompts, perturb_boxes, read_prompts

__all__ = ["BoxPromptedSegmenter", "Prompts", "annotate_dataset", "assign_marker_classes", "class_map", "perturb_boxes",
           "read_prompts", "write_marker_labels"]
